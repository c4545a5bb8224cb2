"""MedGemma's order review: the orders it is shown, and its concerns → one card that never overrules rules."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC
from datetime import datetime
from typing import Any

from cds_service.wire import Card
from cds_service.wire import JobRecord
from fhir_mappings.model_outputs import OrderReviewOutput
from fhir_mappings.order_ai import order_review_card
from fhir_mappings.order_ai import orders_context

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
AMOX = "MedicationRequest/amox"
IBU = "MedicationRequest/ibu"
PARA = "MedicationRequest/para"


def _order(order_id: str, text: str, dosage: list[str]) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": order_id,
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": {
            "coding": [{"system": RXNORM, "code": "1", "display": text}],
            "text": text,
        },
        "dosageInstruction": [{"text": d} for d in dosage],
    }


def _job() -> JobRecord:
    return JobRecord(
        id="job-2",
        service_id="order-review",
        task="order-review",
        state="done",
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
        model="google/medgemma-27b-text-it",
        model_version="rev-9",
        result={"concerns": [], "evidence_ids": []},
    )


def _concern(order_id: str, severity: str, action: str, issue: str = "An issue.") -> dict[str, Any]:
    return {
        "order_id": order_id,
        "severity": severity,
        "issue": issue,
        "recommendation": "Check it.",
        "action": action,
    }


def _review(*concerns: dict[str, Any]) -> OrderReviewOutput:
    return OrderReviewOutput.model_validate({"concerns": list(concerns), "evidence_ids": []})


def _card(output: OrderReviewOutput, selected: list[str], flagged: set[str]) -> dict[str, Any] | None:
    card = order_review_card(output, _job(), selected, flagged)
    if card is None:
        return None
    body = card.wire()
    Card.model_validate(body)
    assert body["source"]["label"] == "MedGemma AI draft: MedGemma 27B (text) (rev-9)"
    assert "requires clinician review" in body["detail"]
    return body


def test_orders_context_lists_selected_orders_with_dosage(bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of(
        [
            _order("amox", "Amoxicillin 500 MG Oral Capsule", ["500 mg three times daily", "for 7 days"]),
            _order("ibu", "Ibuprofen 400 MG Oral Tablet", []),
            _order("para", "Acetaminophen 500 MG Oral Tablet", ["1 g as needed"]),
        ]
    )

    text, refs = orders_context(drafts, [IBU, AMOX])

    assert refs == [AMOX, IBU]
    assert text.splitlines() == [
        '[MedicationRequest/amox] draft order: "Amoxicillin 500 MG Oral Capsule"'
        ' dosage: "500 mg three times daily; for 7 days"',
        '[MedicationRequest/ibu] draft order: "Ibuprofen 400 MG Oral Tablet"',
    ]
    assert orders_context(drafts, []) == ("", [])
    assert orders_context(None, [AMOX]) == ("", [])


def test_concerns_become_one_card_at_the_highest_severity() -> None:
    output = _review(
        _concern(AMOX, "info", "change", "Dose on the high side."),
        _concern(IBU, "critical", "change", "Ibuprofen with warfarin raises bleeding risk."),
        _concern(PARA, "warning", "keep"),
    )

    body = _card(output, [AMOX, IBU, PARA], set())

    assert body is not None
    assert body["indicator"] == "critical"
    assert body["summary"] == "AI order review: 3 concern(s) to check (draft, needs clinician review)"
    assert (
        "**MedicationRequest/ibu** (critical): Ibuprofen with warfarin raises bleeding risk."
        in body["detail"]
    )
    assert "Recommendation: Check it." in body["detail"]
    assert "suggestions" not in body and "selectionBehavior" not in body


def test_concerns_about_unselected_orders_are_dropped() -> None:
    output = _review(_concern(AMOX, "warning", "change"), _concern(PARA, "critical", "remove"))

    body = _card(output, [AMOX], set())

    assert body is not None
    assert body["indicator"] == "warning"
    assert PARA not in str(body)
    assert _card(_review(_concern(PARA, "critical", "remove")), [AMOX], set()) is None


def test_keep_on_a_rule_flagged_order_is_dropped_and_noted() -> None:
    output = _review(_concern(AMOX, "info", "keep", "Amoxicillin is appropriate here."))

    body = _card(output, [AMOX], {AMOX})

    assert body is not None
    assert "Amoxicillin is appropriate here." not in body["detail"]
    assert (
        "The model saw no problem with MedicationRequest/amox, but the rule check flagged it:"
        " the rule card stands." in body["detail"]
    )
    assert body["summary"].startswith("AI order review: 0 concern(s)")
    assert body["indicator"] == "info"
    assert "suggestions" not in body


def test_keep_on_an_unflagged_order_stays() -> None:
    body = _card(_review(_concern(AMOX, "warning", "keep", "Monitor for rash.")), [AMOX], {IBU})
    assert body is not None
    assert "Monitor for rash." in body["detail"]
    assert "rule card stands" not in body["detail"]


def test_remove_suggests_a_delete_only_where_no_rule_card_already_does() -> None:
    output = _review(
        _concern(AMOX, "critical", "remove"),
        _concern(IBU, "warning", "remove"),
        _concern(PARA, "info", "change"),
    )

    body = _card(output, [AMOX, IBU, PARA], {AMOX})

    assert body is not None
    assert body["selectionBehavior"] == "any"
    (suggestion,) = body["suggestions"]
    assert suggestion["label"] == "Remove MedicationRequest/ibu (AI suggestion)"
    assert "isRecommended" not in suggestion
    assert suggestion["actions"] == [
        {"type": "delete", "description": "Remove the draft order", "resourceId": IBU}
    ]
    # The flagged order's concern is still listed; only the duplicate delete is left to the rule card.
    assert "**MedicationRequest/amox** (critical)" in body["detail"]
    assert body["indicator"] == "critical"


def test_nothing_to_say_gives_no_card() -> None:
    assert _card(_review(), [AMOX], set()) is None
    assert _card(_review(), [AMOX], {AMOX}) is None


def test_an_order_review_cut_at_its_limit_says_so() -> None:
    output = _review(_concern(IBU, "warning", "change", issue="x" * 200))
    cut = _job().model_copy(update={"truncated": ["concerns.0.issue"]})

    card = order_review_card(output, cut, [IBU], set())

    assert card is not None
    assert "**Text cut short:** concerns issue (item 1) reached its length limit" in (card.detail or "")
