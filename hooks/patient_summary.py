"""patient-summary: at chart open, what are this patient's active problems, medications and allergies?

The rule card is always answered; MedGemma's pre-visit summary joins it once the model has finished.
"""

from __future__ import annotations

from cds_service.registry import Prefetch
from cds_service.registry import service
from cds_service.wire import Card
from cds_service.wire import HookCall
from cds_service.wire import HookResponse
from cds_service.wire import JobRecord
from fhir_mappings.ai_cards import guarded_ai_cards
from fhir_mappings.ai_cards import summary_job_cards
from fhir_mappings.prompts import SYSTEM_PROMPT
from fhir_mappings.prompts import summary_prompt
from fhir_mappings.record_context import record_context
from fhir_mappings.summary import summary_cards

CONTEXT_TOKENS = 1500
#: What the summary reads; the precompute triggers declare and read exactly this, so their jobs are its jobs.
SUMMARY_PREFETCH = {
    "patient": Prefetch("Patient/{{context.patientId}}"),
    "conditions": Prefetch("Condition?patient={{context.patientId}}&clinical-status=active"),
    "medications": Prefetch("MedicationRequest?patient={{context.patientId}}&status=active"),
    "allergies": Prefetch("AllergyIntolerance?patient={{context.patientId}}"),
    # Labs and vitals enrich the AI summary; without them the rule card still stands. The newest 30 are the
    # answer: their next pages are not read, so the sweep's job is the one a chart open's prefetch asks for.
    "observations": Prefetch(
        "Observation?patient={{context.patientId}}&_sort=-date&_count=30", "omit", first_page_only=True
    ),
}


def request_summary_job(call: HookCall) -> tuple[JobRecord | None, list[str]]:
    """Ask for the patient's AI summary job, the one patient-summary's chart open asks for; return its record
    (None: no patient or no model workers) and the resources its context offers as evidence."""
    p = call.prefetch
    if call.jobs is None or p["patient"] is None:
        return None, []
    record = record_context(
        p["patient"], p["conditions"], p["medications"], p["allergies"], p["observations"],
        token_budget=CONTEXT_TOKENS, today=call.today, content_hashes=call.content_hashes,
    )  # fmt: skip
    job = call.jobs.for_service("patient-summary").request(
        "patient-summary", "text", SYSTEM_PROMPT, summary_prompt(record.text),
        evidence=record.evidence, input_hashes=record.input_hashes,
    )  # fmt: skip
    return job, record.evidence


@service(
    id="patient-summary",
    hook="patient-view",
    title="Patient summary",
    description="Active problems, medications and allergies, plus an AI pre-visit summary (MedGemma draft).",
    prefetch=SUMMARY_PREFETCH,
    potentially_long_running=True,
)
def patient_summary(call: HookCall) -> HookResponse:
    """Answer the rule summary card, and the AI summary card when ready (a "running" card until then)."""
    p = call.prefetch
    cards = summary_cards(p["patient"], p["conditions"], p["medications"], p["allergies"])

    def ai_cards() -> list[Card]:
        job, evidence = request_summary_job(call)
        return (
            summary_job_cards(job, evidence, call.request.fhir_server, call.jobs.job_url) if call.jobs else []
        )

    return HookResponse(cards=cards + guarded_ai_cards(call.service_id, ai_cards))
