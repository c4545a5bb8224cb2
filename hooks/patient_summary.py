"""patient-summary: at chart open, what are this patient's active problems, medications and allergies?"""

from __future__ import annotations

from cds_service.registry import service
from cds_service.wire import HookCall
from cds_service.wire import HookResponse
from fhir_mappings.summary import summary_cards


@service(
    id="patient-summary",
    hook="patient-view",
    title="Patient summary",
    description="Active problems, active medications and allergies of the patient in context.",
    prefetch={
        "patient": "Patient/{{context.patientId}}",
        "conditions": "Condition?patient={{context.patientId}}&clinical-status=active",
        "medications": "MedicationRequest?patient={{context.patientId}}&status=active",
        "allergies": "AllergyIntolerance?patient={{context.patientId}}",
    },
)
def patient_summary(call: HookCall) -> HookResponse:
    """Answer one info card that counts and lists the active record."""
    p = call.prefetch
    return HookResponse(cards=summary_cards(p["patient"], p["conditions"], p["medications"], p["allergies"]))
