"""order-sign-review: as the clinician signs, do any of the orders clash with allergies or current drugs?

The same checks as order-review (its rules and AI review), over every draft medication order being signed.
"""

from __future__ import annotations

from cds_service.registry import service
from cds_service.wire import HookCall
from cds_service.wire import HookResponse
from hooks.order_review import ORDER_PREFETCH
from hooks.order_review import review_orders


@service(
    id="order-sign-review",
    hook="order-sign",
    title="Order sign review",
    description=(
        "Checks every medication order being signed: allergies, duplicates, interactions, kidney function, "
        "potassium, conditions, pregnancy, dose and age; AI review too."
    ),
    prefetch=ORDER_PREFETCH,
    potentially_long_running=True,
)
def order_sign_review(call: HookCall) -> HookResponse:
    """Answer a rule card per conflict or unchecked order (none when checked and clean), and the AI card."""
    return review_orders(call, None)
