"""Model output → CDS cards, always marked as an AI draft that needs a clinician's review."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from cds_service.wire import Card
from cds_service.wire import Coding
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
#: Topic codes of the cards that say where an AI analysis stands (``ai-queued``, ``ai-failed``, ...).
AI_STATE_TOPICS = "https://github.com/medgemma-cds/medgemma-cds/ai-state"
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
    """Return the AI cards ``build`` makes, or a card saying the AI analysis failed when it raises.

    A cached result that no longer validates, an image that isn't what it says, a record the prompt
    builder can't read: the clinician still gets every rule card, learns that the AI part failed, and the
    error is logged (its type only). A failure is never silence.
    """
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - whatever broke, the rules must still be answered
        log.error("%s: AI card replaced by a failure card after %s", service_id, type(exc).__name__)
        what = AI_ANALYSES.get(service_id, "AI analysis")
        return [state_card(what, AiState("failed", "AI analysis failed", FAILED_TO_SHOW), None)]


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


@dataclass(frozen=True)
class AiState:
    """A model job's state as a clinician reads it: a key, a headline and what it means for them."""

    key: Literal["queued", "running", "done", "failed", "unavailable"]
    headline: str
    detail: str


def ai_state(record: JobRecord | None) -> AiState:
    """Return the state of a model job in plain words, the same on its card and on its page.

    ``record`` carries the live progress (``workers``, ``ahead``, ``expected_wait_s``) when it waits; no
    record means the job queue itself could not be reached.
    """
    if record is None:
        return AiState("unavailable", "AI analysis unavailable", UNREACHABLE)
    if record.state == "done":
        return AiState("done", "AI analysis done", "The result is a draft that needs clinician review.")
    if record.state == "failed" and "max_new_tokens" in (record.truncated or []):
        return AiState("failed", "AI analysis failed (answer cut short)", CUT_SHORT)
    if record.state == "failed":
        return AiState("failed", "AI analysis failed", failure_words(record.error))
    if record.workers == 0:
        return AiState("unavailable", "AI analysis unavailable", NO_WORKER)
    if record.state == "running":
        return AiState("running", "AI analysis running", "Running: the model is working on it.")
    if record.ahead is None:
        where = "Queued behind many other analyses" if record.workers else "Queued"
    elif record.ahead == 0:
        where = "Queued: next in line"
    else:
        where = f"Queued: {record.ahead} ahead of it"
    if record.expected_wait_s is not None:
        where += f"; expected in about {_duration(record.expected_wait_s)}"
    return AiState("queued", "AI analysis queued", where + ".")


def failure_words(error: str | None) -> str:
    """Return what failed, in words for a clinician (the record's error names internals for operators)."""
    text = (error or "").lower()
    if "secret_key" in text or "decrypt" in text:
        reason = "the model service could not read the request (a configuration problem for its operators)"
    elif "time limit" in text:
        reason = "the model took longer than it is allowed to"
    elif "gave up" in text:
        reason = "the model failed on this record several times"
    else:
        reason = "the model's answer could not be used"
    return f"What failed: {reason}. It is tried again when the chart is reopened in a few minutes."


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} seconds"
    return f"{round(seconds / 60)} minutes"


UNREACHABLE = (
    "The AI job queue can't be reached now, so there is no AI result; it is asked for again next time."
)
NO_WORKER = (
    "No model worker is running for it, so there is no AI result now. The analysis stays queued and runs "
    "once a worker starts; reopen the chart later."
)
FAILED_TO_SHOW = "What failed: the AI result could not be shown."
CUT_SHORT = (
    "What failed: the model's answer did not fit its output budget, even when run again with a larger one. "
    "The same record would be cut the same way, so it is tried again only when the record changes."
)
#: The name of each service's AI analysis, for cards made without the handler's help.
AI_ANALYSES = {
    "patient-summary": "Pre-visit summary",
    "imaging-report-draft": "Imaging report draft",
    "order-review": "Order review",
    "order-sign-review": "Order review",
}


def state_card(what: str, state: AiState, job_url: str | None) -> Card:
    """Return the info card that says where a model job stands, linking to its page when there is one."""
    ending = {
        "queued": "The rule cards stand on their own; reopen the chart to see the result.",
        "running": "The rule cards stand on their own; reopen the chart to see the result.",
        "unavailable": "The rule cards stand on their own.",
        "failed": "The rule cards stand on their own.",
    }.get(state.key, "")
    return Card(
        summary=f"{what}: {state.headline}",
        detail=f"{state.detail} {ending}\n\n{AI_DISCLAIMER}".replace(" \n", "\n"),
        indicator="info",
        source=Source(label="MedGemma CDS", topic=Coding(system=AI_STATE_TOPICS, code=f"ai-{state.key}")),
        links=[Link(label="AI analysis status", url=job_url, type="absolute")] if job_url else [],
    )


def truncation_note(record: JobRecord) -> str | None:
    """Return the sentence that says which AI text was cut at its length limit, or None when none was."""
    cut = [path for path in record.truncated or [] if path != "max_new_tokens"]
    if not cut:
        return None
    fields = ", ".join(_field_name(path) for path in cut)
    return (
        f"**Text cut short:** {md_text(fields)} reached its length limit and ends where the space ran out, "
        "not where the model finished."
    )


def _field_name(path: str) -> str:
    """Return ``key_problems.0`` as "key problems (item 1)"."""
    parts = path.split(".")
    words = " ".join(part.replace("_", " ") for part in parts if not part.isdigit())
    items = [f"item {int(part) + 1}" for part in parts if part.isdigit()]
    return f"{words} ({', '.join(items)})" if items else words


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
            *filter(None, [truncation_note(record)]),
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
    """Return the card for a model job: its result when done, else its state in words (queued, running,
    failed, unavailable), so a job never ends in silence.

    ``done`` may return None when the finished result has nothing to say.
    """
    if record is not None and record.state == "done":
        card = done(record) if record.result is not None else None
        return [card] if card is not None else []
    return [state_card(what, ai_state(record), job_url(record.id) if record is not None else None)]


def summary_job_cards(
    record: JobRecord | None, offered: list[str], fhir_server: str | None, job_url: Callable[[str], str]
) -> list[Card]:
    """Return the AI pre-visit summary card, or the summary job's state in words."""

    def done(finished: JobRecord) -> Card:
        output = PatientSummaryOutput.model_validate(finished.result)
        return summary_ai_card(output, finished, offered, fhir_server)

    return job_cards(record, "Pre-visit summary", job_url, done)
