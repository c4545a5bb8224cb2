"""order-review: do the medications being ordered conflict with the patient's allergies or current drugs?"""

from __future__ import annotations

from cds_service.registry import service
from cds_service.wire import HookCall
from cds_service.wire import HookResponse
from cds_service.wire import OrderSelectContext
from fhir_mappings.order_conflicts import order_conflict_cards


@service(
    id="order-review",
    hook="order-select",
    title="Order review",
    description="Checks selected draft medication orders against active allergies and active medications.",
    prefetch={
        "allergies": "AllergyIntolerance?patient={{context.patientId}}",
        "medications": "MedicationRequest?patient={{context.patientId}}&status=active",
    },
)
def order_review(call: HookCall) -> HookResponse:
    """Answer a warning or critical card per conflict; no conflict, no card."""
    context = call.context
    selections = context.selections if isinstance(context, OrderSelectContext) else []
    cards = order_conflict_cards(
        call.draft_orders, selections, call.prefetch["allergies"], call.prefetch["medications"]
    )
    return HookResponse(cards=cards)
