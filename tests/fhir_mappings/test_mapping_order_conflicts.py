"""Rule cards for selected draft medication orders: allergy conflicts and duplicate therapy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from cds_service.wire import Card
from fhir_mappings.order_conflicts import order_conflict_cards
from fhir_mappings.order_conflicts import selected_medication_orders

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"


def order(order_id: str, text: str, code: str | None = None, status: str = "draft") -> dict[str, Any]:
    """A MedicationRequest as an EHR puts it in draftOrders (RxNorm-coded when ``code`` is given)."""
    concept: dict[str, Any] = {"text": text}
    if code:
        concept["coding"] = [{"system": RXNORM, "code": code, "display": text}]
    return {
        "resourceType": "MedicationRequest",
        "id": order_id,
        "status": status,
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": concept,
    }


def allergy(
    allergy_id: str,
    code: dict[str, Any],
    *,
    criticality: str | None = "low",
    clinical: str = "active",
    verification: str = "confirmed",
) -> dict[str, Any]:
    """An AllergyIntolerance with the given substance concept and statuses."""
    data: dict[str, Any] = {
        "resourceType": "AllergyIntolerance",
        "id": allergy_id,
        "patient": {"reference": "Patient/p1"},
        "code": code,
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                    "code": clinical,
                }
            ]
        },
        "verificationStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                    "code": verification,
                }
            ]
        },
    }
    if criticality:
        data["criticality"] = criticality
    return data


PENICILLIN_ALLERGY = allergy(
    "pen",
    {"coding": [{"system": SNOMED, "code": "91936005", "display": "Allergy to penicillin"}]},
    criticality="high",
)


def _assert_rule_card(card: Card, order_ref: str) -> dict[str, Any]:
    """Check what every rule card must carry; return its wire JSON."""
    body = card.wire()
    Card.model_validate(body)
    assert len(body["summary"]) < 140
    assert body["source"] == {"label": "MedGemma CDS rules"}
    assert body["selectionBehavior"] == "at-most-one"
    assert len(body["suggestions"]) == 1
    suggestion = body["suggestions"][0]
    assert suggestion["isRecommended"] is True
    assert suggestion["actions"] == [
        {"type": "delete", "description": "Remove the draft order", "resourceId": order_ref}
    ]
    assert body["overrideReasons"]
    for reason in body["overrideReasons"]:
        assert reason["code"] and reason["system"] and reason["display"]
    return body


def test_allergy_conflict_by_rxnorm_code(bundle_of: Callable[..., Any]) -> None:
    # The allergy names the substance by code only, so only the code can match.
    coded = allergy("rx", {"coding": [{"system": RXNORM, "code": "1049630"}]})
    drafts = bundle_of([order("d1", "Diphenhydramine Hydrochloride 25 MG Oral Tablet", "1049630")])

    cards = order_conflict_cards(drafts, ["MedicationRequest/d1"], bundle_of([coded]), None)

    assert len(cards) == 1
    body = _assert_rule_card(cards[0], "MedicationRequest/d1")
    assert body["summary"].startswith("Allergy conflict: Diphenhydramine Hydrochloride 25 MG Oral Tablet")
    assert body["indicator"] == "warning"
    assert "criticality: low" in body["detail"]
    assert {r["code"] for r in body["overrideReasons"]} == {
        "tolerated-before",
        "benefit-outweighs-risk",
        "allergy-recorded-in-error",
    }


def test_allergy_conflict_by_substance_name(bundle_of: Callable[..., Any]) -> None:
    by_name = allergy(
        "ibu", {"coding": [{"system": SNOMED, "code": "293619005", "display": "Allergy to ibuprofen"}]}
    )
    drafts = bundle_of([order("d2", "Ibuprofen 400 MG Oral Tablet", "197806")])

    cards = order_conflict_cards(drafts, ["MedicationRequest/d2"], bundle_of([by_name]), None)

    assert [c.summary for c in cards] == [
        "Allergy conflict: Ibuprofen 400 MG Oral Tablet vs recorded allergy to Allergy to ibuprofen"
    ]
    _assert_rule_card(cards[0], "MedicationRequest/d2")


def test_penicillin_allergy_flags_amoxicillin_by_class(bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of([order("amox", "Amoxicillin 500 MG Oral Capsule", "308191")])

    cards = order_conflict_cards(drafts, ["MedicationRequest/amox"], bundle_of([PENICILLIN_ALLERGY]), None)

    assert len(cards) == 1
    body = _assert_rule_card(cards[0], "MedicationRequest/amox")
    # A high-criticality allergy makes the card critical (AllergyIntolerance.criticality).
    assert body["indicator"] == "critical"
    assert "Allergy to penicillin" in body["summary"]
    assert "criticality: high" in body["detail"]


def test_class_rule_does_not_cross_classes(bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of([order("cef", "Cefalexin 500 MG Oral Capsule", "309114")])
    assert (
        order_conflict_cards(drafts, ["MedicationRequest/cef"], bundle_of([PENICILLIN_ALLERGY]), None) == []
    )


def test_duplicate_therapy_by_code_on_kermits_chart(kermit: Any, bundle_of: Callable[..., Any]) -> None:
    # Same RxNorm code as Kermit's active hydrochlorothiazide, but a name sharing no word with it.
    drafts = bundle_of([order("hctz", "HCTZ 25mg tab", "316049")])

    cards = order_conflict_cards(
        drafts,
        ["MedicationRequest/hctz"],
        kermit.search("AllergyIntolerance"),
        kermit.search("MedicationRequest"),
    )

    assert len(cards) == 1
    body = _assert_rule_card(cards[0], "MedicationRequest/hctz")
    assert body["summary"] == "Duplicate therapy: HCTZ 25mg tab duplicates active Hydrochlorothiazide 25 MG"
    assert body["indicator"] == "warning"
    assert {r["code"] for r in body["overrideReasons"]} == {"intended-combination", "replacing-existing"}


def test_duplicate_therapy_by_ingredient_word_on_kermits_chart(
    kermit: Any, bundle_of: Callable[..., Any]
) -> None:
    # Another loratadine product: other code, other form; the ingredient word matches.
    drafts = bundle_of([order("lor", "Loratadine 10 MG Oral Tablet", "311372")])

    cards = order_conflict_cards(
        drafts,
        ["MedicationRequest/lor"],
        kermit.search("AllergyIntolerance"),
        kermit.search("MedicationRequest"),
    )

    assert [c.summary for c in cards] == [
        "Duplicate therapy: Loratadine 10 MG Oral Tablet duplicates active Loratadine 5 MG Chewable Tablet"
    ]
    _assert_rule_card(cards[0], "MedicationRequest/lor")


def test_clean_order_on_kermits_chart_gives_no_card(kermit: Any, bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of([order("amox", "Amoxicillin 500 MG Oral Capsule", "308191")])
    cards = order_conflict_cards(
        drafts,
        ["MedicationRequest/amox"],
        kermit.search("AllergyIntolerance"),
        kermit.search("MedicationRequest"),
    )
    assert cards == []


def test_only_selected_orders_are_checked(bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of(
        [
            order("amox", "Amoxicillin 500 MG Oral Capsule", "308191"),
            order("ampi", "Ampicillin 500 MG Oral Capsule", "789980"),
            order("para", "Acetaminophen 500 MG Oral Tablet", "198440"),
        ]
    )
    allergies = bundle_of([PENICILLIN_ALLERGY])

    cards = order_conflict_cards(
        drafts, ["MedicationRequest/para", "MedicationRequest/ampi"], allergies, None
    )

    assert len(cards) == 1
    _assert_rule_card(cards[0], "MedicationRequest/ampi")
    assert order_conflict_cards(drafts, ["MedicationRequest/para"], allergies, None) == []
    # A selection naming another resource type, or an order not in draftOrders, selects nothing.
    assert (
        order_conflict_cards(drafts, ["ServiceRequest/amox", "MedicationRequest/gone"], allergies, None) == []
    )


def test_selected_medication_orders_keeps_bundle_order(bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of([order("a", "A drug"), order("b", "B drug"), order("c", "C drug")])
    picked = selected_medication_orders(drafts, ["MedicationRequest/c", "MedicationRequest/a"])
    assert [o.id for o in picked] == ["a", "c"]


@pytest.mark.parametrize(
    ("clinical", "verification"),
    [
        ("active", "refuted"),
        ("active", "entered-in-error"),
        ("inactive", "confirmed"),
        ("resolved", "confirmed"),
    ],
)
def test_refuted_or_inactive_allergy_is_ignored(
    bundle_of: Callable[..., Any], clinical: str, verification: str
) -> None:
    stale = allergy(
        "pen", PENICILLIN_ALLERGY["code"], clinical=clinical, verification=verification, criticality="high"
    )
    drafts = bundle_of([order("amox", "Amoxicillin 500 MG Oral Capsule", "308191")])
    assert order_conflict_cards(drafts, ["MedicationRequest/amox"], bundle_of([stale]), None) == []


def test_stopped_medication_is_no_duplicate(bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of([order("lor", "Loratadine 10 MG Oral Tablet", "311372")])
    stopped = bundle_of([order("old", "Loratadine 10 MG Oral Tablet", "311372", status="stopped")])
    assert order_conflict_cards(drafts, ["MedicationRequest/lor"], None, stopped) == []


def test_allergy_and_duplicate_on_one_order_give_two_cards(bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of([order("amox", "Amoxicillin 500 MG Oral Capsule", "308191")])
    active = bundle_of([order("amox-old", "Amoxicillin 250 MG Oral Capsule", "308182", status="active")])

    cards = order_conflict_cards(drafts, ["MedicationRequest/amox"], bundle_of([PENICILLIN_ALLERGY]), active)

    assert [c.summary.split(":")[0] for c in cards] == ["Allergy conflict", "Duplicate therapy"]
    for card in cards:
        _assert_rule_card(card, "MedicationRequest/amox")


def test_shared_salt_is_not_duplicate_therapy(bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of([order("dph", "Diphenhydramine Hydrochloride 25 MG Oral Tablet", "1049630")])
    active = bundle_of(
        [
            order(
                "met", "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet", "860975", "active"
            )
        ]
    )
    assert order_conflict_cards(drafts, ["MedicationRequest/dph"], None, active) == []
