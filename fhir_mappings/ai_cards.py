"""Model output → CDS cards, always marked as an AI draft that needs a clinician's review."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from cds_service.wire import Card
from cds_service.wire import JobRecord
from cds_service.wire import Link
from cds_service.wire import Source
from fhir_mappings.markdown import markdown_list
from fhir_mappings.markdown import md_text
from fhir_mappings.model_outputs import PatientSummaryOutput

AI_DISCLAIMER = (
    "_AI-generated draft — requires clinician review. MedGemma is not a clinical-grade model; "
    "do not act on this text without checking the record._"
)
MAX_EVIDENCE_LINKS = 5
#: The names clinicians know Google's checkpoints by.
KNOWN_MODELS = {
    "google/medgemma-4b-it": "MedGemma 4B",
    "google/medgemma-4b-pt": "MedGemma 4B (pre-trained)",
    "google/medgemma-27b-it": "MedGemma 27B",
    "google/medgemma-27b-text-it": "MedGemma 27B (text)",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

log = logging.getLogger(__name__)


def model_identifier(model: str | None) -> str:
    """Return the model's identifier for the record: its Hub id, or a local checkpoint's folder name.

    A configured local path is never shown or written: it says nothing to a clinician and something to an
    attacker.
    """
    if not model:
        return "model"
    if _HUB_ID.match(model):
        return model
    return re.split(r"[\\/]", model.rstrip("/\\"))[-1] or "local model"


def model_display_name(model: str | None) -> str:
    """Return the model as people know it: MedGemma's name ("MedGemma 4B"), else its identifier."""
    return KNOWN_MODELS.get(model or "", model_identifier(model))


def model_source(record: JobRecord) -> Source:
    """Return a card source naming the model (as people know it) and its version."""
    version = f" ({record.model_version})" if record.model_version else ""
    return Source(label=f"MedGemma AI draft: {model_display_name(record.model)}{version}"[:200])


def guarded_ai_cards(service_id: str, build: Callable[[], list[Card]]) -> list[Card]:
    """Return the AI cards ``build`` makes, or none when it fails: an AI error never costs the rule cards.

    A cached result that no longer validates, an image that isn't what it says, a record the prompt
    builder can't read: the clinician still gets every rule card, and the error is logged (its type only).
    """
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - whatever broke, the rules must still be answered
        log.error("%s: AI card dropped after %s", service_id, type(exc).__name__)
        return []


def cited_evidence(cited: list[str], offered: list[str]) -> list[str]:
    """Return the cited ids that were really in the model's context, in citation order (drops inventions)."""
    allowed = set(offered)
    return [ref for ref in dict.fromkeys(cited) if ref in allowed]


def evidence_links(evidence: list[str], fhir_server: str | None) -> list[Link]:
    """Return absolute links to the first cited resources on the EHR's FHIR server, if one is known."""
    if not fhir_server:
        return []
    base = fhir_server.rstrip("/")
    return [
        Link(label=f"Evidence: {ref}", url=f"{base}/{ref}", type="absolute")
        for ref in evidence[:MAX_EVIDENCE_LINKS]
    ]


def pending_card(what: str, job_url: str) -> Card:
    """Return the info card that says a model job is still running, linking to its status."""
    return Card(
        summary=f"{what}: AI analysis is running",
        detail=f"The model is still working. Reopen the chart to see the result.\n\n{AI_DISCLAIMER}",
        indicator="info",
        source=Source(label="MedGemma CDS"),
        links=[Link(label="AI analysis status", url=job_url, type="absolute")],
    )


def summary_ai_card(
    output: PatientSummaryOutput, record: JobRecord, offered: list[str], fhir_server: str | None
) -> Card:
    """Return the AI pre-visit summary card: the summary, problems, concerns, follow-up and cited evidence."""
    evidence = cited_evidence(output.evidence_ids, offered)
    detail = "\n\n".join(
        [
            md_text(output.summary),
            f"**Key problems**\n\n{markdown_list(output.key_problems)}",
            f"**Medication concerns**\n\n{markdown_list(output.medication_concerns)}",
            f"**Follow-up**\n\n{markdown_list(output.follow_up)}",
            f"**Evidence used**\n\n{markdown_list(evidence)}",
            AI_DISCLAIMER,
        ]
    )
    return Card(
        summary="AI pre-visit summary (draft, needs clinician review)",
        detail=detail,
        indicator="info",
        source=model_source(record),
        links=evidence_links(evidence, fhir_server),
    )


def job_cards(
    record: JobRecord | None,
    what: str,
    job_url: Callable[[str], str],
    done: Callable[[JobRecord], Card | None],
) -> list[Card]:
    """Return the card for a model job's state: its result when done, "running" while pending.

    A failed job (e.g. output cut at max_new_tokens) shows no card; its error stays on the job record.
    ``done`` may return None when the finished result has nothing to say.
    """
    if record is None or record.state == "failed":
        return []
    if record.state == "done":
        card = done(record) if record.result is not None else None
        return [card] if card is not None else []
    return [pending_card(what, job_url(record.id))]


def summary_job_cards(
    record: JobRecord | None, offered: list[str], fhir_server: str | None, job_url: Callable[[str], str]
) -> list[Card]:
    """Return the AI pre-visit summary card, the "running" card, or nothing, for a summary job."""

    def done(finished: JobRecord) -> Card:
        output = PatientSummaryOutput.model_validate(finished.result)
        return summary_ai_card(output, finished, offered, fhir_server)

    return job_cards(record, "Pre-visit summary", job_url, done)
