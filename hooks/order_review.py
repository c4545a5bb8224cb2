"""order-review: do drafted medications clash with allergies or current drugs? AI review joins; rules win."""

from __future__ import annotations

from datetime import date

from cds_service.registry import Prefetch
from cds_service.registry import service
from cds_service.wire import Card
from cds_service.wire import HookCall
from cds_service.wire import HookResponse
from cds_service.wire import JobRecord
from cds_service.wire import OrderSelectContext
from fhir_mappings.ai_cards import job_cards
from fhir_mappings.model_outputs import OrderReviewOutput
from fhir_mappings.order_ai import order_review_card
from fhir_mappings.order_ai import orders_context
from fhir_mappings.order_conflicts import order_conflict_cards
from fhir_mappings.prompts import SYSTEM_PROMPT
from fhir_mappings.prompts import order_review_prompt
from fhir_mappings.record_context import record_context


@service(
    id="order-review",
    hook="order-select",
    title="Order review",
    description="Checks selected draft medication orders against allergies and active drugs; AI review too.",
    prefetch={
        "allergies": "AllergyIntolerance?patient={{context.patientId}}",
        "medications": "MedicationRequest?patient={{context.patientId}}&status=active",
        "patient": Prefetch("Patient/{{context.patientId}}", "omit"),
        "conditions": Prefetch("Condition?patient={{context.patientId}}&clinical-status=active", "omit"),
        "observations": Prefetch("Observation?patient={{context.patientId}}&_sort=-date&_count=30", "omit"),
    },
    potentially_long_running=True,
)
def order_review(call: HookCall) -> HookResponse:
    """Answer a rule card per conflict (none when clean), and the AI review card when ready."""
    p = call.prefetch
    selections = call.context.selections if isinstance(call.context, OrderSelectContext) else []
    cards = order_conflict_cards(call.draft_orders, selections, p["allergies"], p["medications"])
    orders_text, selected = orders_context(call.draft_orders, selections)
    if call.jobs is None or not selected:
        return HookResponse(cards=cards)
    record = record_context(
        p["patient"], p["conditions"], p["medications"], p["allergies"], p["observations"],
        token_budget=1200, today=date.today(),
        content_hashes=call.content_hashes,
    )  # fmt: skip
    job = call.jobs.request(
        "order-review", "text", SYSTEM_PROMPT, order_review_prompt(orders_text, record.text),
        evidence=selected + record.evidence, input_hashes=record.input_hashes + [orders_text],
    )  # fmt: skip
    flagged = {a.resource_id for c in cards for s in c.suggestions for a in s.actions if a.resource_id}

    def done(finished: JobRecord) -> Card | None:
        output = OrderReviewOutput.model_validate(finished.result)
        return order_review_card(output, finished, selected, flagged)

    return HookResponse(cards=cards + job_cards(job, "Order review", call.jobs.job_url, done))
