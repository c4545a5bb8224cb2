"""order-review: do the selected draft medications clash with allergies or current drugs? AI review joins.

The rule cards always stand: an order or list that can't be read gives a "not checked" card, and an error
in the AI part drops only the AI card. When the model and the rules disagree, the rules win.
"""

from __future__ import annotations

from datetime import date

from cds_service.registry import Prefetch
from cds_service.registry import service
from cds_service.wire import Card
from cds_service.wire import HookCall
from cds_service.wire import HookResponse
from cds_service.wire import JobRecord
from cds_service.wire import OrderSelectContext
from fhir_mappings.ai_cards import guarded_ai_cards
from fhir_mappings.ai_cards import job_cards
from fhir_mappings.model_outputs import OrderReviewOutput
from fhir_mappings.order_ai import order_review_card
from fhir_mappings.order_ai import orders_context
from fhir_mappings.order_conflicts import order_check_cards
from fhir_mappings.prompts import SYSTEM_PROMPT
from fhir_mappings.prompts import order_review_prompt
from fhir_mappings.record_context import record_context

#: What both order services read; a safety list that can't be read is a card, never a 412 or silence.
ORDER_PREFETCH = {
    "allergies": Prefetch("AllergyIntolerance?patient={{context.patientId}}", "omit"),
    "medications": Prefetch("MedicationRequest?patient={{context.patientId}}&status=active", "omit"),
    "patient": Prefetch("Patient/{{context.patientId}}", "omit"),
    "conditions": Prefetch("Condition?patient={{context.patientId}}&clinical-status=active", "omit"),
    "observations": Prefetch("Observation?patient={{context.patientId}}&_sort=-date&_count=30", "omit"),
}


def review_orders(call: HookCall, selections: list[str] | None) -> HookResponse:
    """Answer the rule cards for the orders (selected ones, or all when None) and the AI review card."""
    p = call.prefetch
    cards = order_check_cards(
        call.draft_orders, selections, p["allergies"], p["medications"], call.unavailable
    )
    flagged = {a.resource_id for c in cards for s in c.suggestions for a in s.actions if a.resource_id}

    def ai_cards() -> list[Card]:
        orders_text, reviewed = orders_context(call.draft_orders, selections)
        if call.jobs is None or not reviewed:
            return []
        record = record_context(
            p["patient"], p["conditions"], p["medications"], p["allergies"], p["observations"],
            token_budget=1200, today=date.today(), content_hashes=call.content_hashes,
        )  # fmt: skip
        job = call.jobs.request(
            "order-review", "text", SYSTEM_PROMPT, order_review_prompt(orders_text, record.text),
            evidence=reviewed + record.evidence, input_hashes=record.input_hashes + [orders_text],
        )  # fmt: skip

        def done(finished: JobRecord) -> Card | None:
            output = OrderReviewOutput.model_validate(finished.result)
            return order_review_card(output, finished, reviewed, flagged)

        return job_cards(job, "Order review", call.jobs.job_url, done)

    return HookResponse(cards=cards + guarded_ai_cards(call.service_id, ai_cards))


@service(
    id="order-review",
    hook="order-select",
    title="Order review",
    description="Checks selected draft medication orders against allergies and active drugs; AI review too.",
    prefetch=ORDER_PREFETCH,
    potentially_long_running=True,
)
def order_review(call: HookCall) -> HookResponse:
    """Answer a rule card per conflict or unchecked order (none when checked and clean), and the AI card."""
    selections = call.context.selections if isinstance(call.context, OrderSelectContext) else []
    return review_orders(call, selections)
