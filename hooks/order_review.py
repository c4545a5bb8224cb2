"""order-review: are the selected draft medications safe for this patient? Rule checks, and AI review.

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
from fhir_mappings.labs import lab_codes
from fhir_mappings.labs import patient_facts
from fhir_mappings.model_outputs import OrderReviewOutput
from fhir_mappings.order_ai import order_review_card
from fhir_mappings.order_ai import orders_context
from fhir_mappings.order_ai import rule_findings_text
from fhir_mappings.order_conflicts import order_check_cards
from fhir_mappings.prompts import SYSTEM_PROMPT
from fhir_mappings.prompts import order_review_prompt
from fhir_mappings.record_context import record_context

#: The labs the medication rules read (eGFR, creatinine, potassium, pregnancy status, weight), by LOINC code.
LAB_CODES = (
    ",".join(
        f"http://loinc.org|{code}"
        for key in ("creatinine_mg_dl", "creatinine_umol_l", "potassium", "pregnancy_status", "body_weight")
        for code in lab_codes()[key]
    )
    + ","
    + ",".join(f"http://loinc.org|{code}" for code in lab_codes()["egfr"]["loinc"])
)

#: What both order services read; a safety list that can't be read is a card, never a 412 or silence.
#: Active medications come with the Medications they reference (``_include``), so none is dropped.
ORDER_PREFETCH = {
    "allergies": Prefetch("AllergyIntolerance?patient={{context.patientId}}", "omit"),
    "medications": Prefetch(
        "MedicationRequest?patient={{context.patientId}}&status=active"
        "&_include=MedicationRequest:medication&_count=200",
        "omit",
    ),
    "patient": Prefetch("Patient/{{context.patientId}}", "omit"),
    "conditions": Prefetch("Condition?patient={{context.patientId}}&clinical-status=active", "omit"),
    "observations": Prefetch("Observation?patient={{context.patientId}}&_sort=-date&_count=30", "omit"),
    "labs": Prefetch(
        f"Observation?patient={{{{context.patientId}}}}&code={LAB_CODES}&_sort=-date&_count=50", "omit"
    ),
}


def review_orders(call: HookCall, selections: list[str] | None) -> HookResponse:
    """Answer the rule cards for the orders (selected ones, or all when None) and the AI review card."""
    p = call.prefetch
    facts = patient_facts(p["patient"], p["conditions"], [p["labs"], p["observations"]], call.today)
    cards = order_check_cards(
        call.draft_orders, selections, p["allergies"], p["medications"], call.unavailable, facts,
        unchecked_orders=call.unchecked_orders,
    )  # fmt: skip
    flagged = {a.resource_id for c in cards for s in c.suggestions for a in s.actions if a.resource_id}

    def ai_cards() -> list[Card]:
        orders_text, reviewed = orders_context(call.draft_orders, selections)
        if call.jobs is None or not reviewed:
            return []
        record = record_context(
            p["patient"], p["conditions"], p["medications"], p["allergies"], p["observations"],
            token_budget=1200, today=date.today(), content_hashes=call.content_hashes,
        )  # fmt: skip
        findings = rule_findings_text(cards, facts)
        job = call.jobs.request(
            "order-review", "text", SYSTEM_PROMPT, order_review_prompt(orders_text, record.text, findings),
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
    description=(
        "Checks selected draft medication orders: allergies, duplicates, interactions, kidney function, "
        "potassium, conditions, pregnancy, dose and age; AI review too."
    ),
    prefetch=ORDER_PREFETCH,
    potentially_long_running=True,
)
def order_review(call: HookCall) -> HookResponse:
    """Answer a rule card per conflict or unchecked order (none when checked and clean), and the AI card."""
    selections = call.context.selections if isinstance(call.context, OrderSelectContext) else []
    return review_orders(call, selections)
