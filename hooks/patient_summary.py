"""patient-summary: at chart open, what are this patient's active problems, medications and allergies?

The rule card is always answered; MedGemma's pre-visit summary joins it once the model has finished.
"""

from __future__ import annotations

from datetime import date

from cds_service.registry import Prefetch
from cds_service.registry import service
from cds_service.wire import Card
from cds_service.wire import HookCall
from cds_service.wire import HookResponse
from fhir_mappings.ai_cards import guarded_ai_cards
from fhir_mappings.ai_cards import summary_job_cards
from fhir_mappings.prompts import SYSTEM_PROMPT
from fhir_mappings.prompts import summary_prompt
from fhir_mappings.record_context import record_context
from fhir_mappings.summary import summary_cards

CONTEXT_TOKENS = 1500


@service(
    id="patient-summary",
    hook="patient-view",
    title="Patient summary",
    description="Active problems, medications and allergies, plus an AI pre-visit summary (MedGemma draft).",
    prefetch={
        "patient": "Patient/{{context.patientId}}",
        "conditions": "Condition?patient={{context.patientId}}&clinical-status=active",
        "medications": "MedicationRequest?patient={{context.patientId}}&status=active",
        "allergies": "AllergyIntolerance?patient={{context.patientId}}",
        # Labs and vitals enrich the AI summary; without them the rule card still stands.
        "observations": Prefetch("Observation?patient={{context.patientId}}&_sort=-date&_count=30", "omit"),
    },
    potentially_long_running=True,
)
def patient_summary(call: HookCall) -> HookResponse:
    """Answer the rule summary card, and the AI summary card when ready (a "running" card until then)."""
    p = call.prefetch
    cards = summary_cards(p["patient"], p["conditions"], p["medications"], p["allergies"])

    def ai_cards() -> list[Card]:
        if call.jobs is None or p["patient"] is None:
            return []
        record = record_context(
            p["patient"], p["conditions"], p["medications"], p["allergies"], p["observations"],
            token_budget=CONTEXT_TOKENS, today=date.today(), content_hashes=call.content_hashes,
        )  # fmt: skip
        job = call.jobs.request(
            "patient-summary", "text", SYSTEM_PROMPT, summary_prompt(record.text),
            evidence=record.evidence, input_hashes=record.input_hashes,
        )  # fmt: skip
        return summary_job_cards(job, record.evidence, call.request.fhir_server, call.jobs.job_url)

    return HookResponse(cards=cards + guarded_ai_cards(call.service_id, ai_cards))
