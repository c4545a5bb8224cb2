"""order-review: allergy conflicts, duplicate therapy, no card when nothing conflicts."""

from __future__ import annotations

from typing import Any

PATH = "/cds-services/order-review"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def draft(order_id: str, code: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": order_id,
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": {
            "coding": [{"system": RXNORM, "code": code, "display": text}],
            "text": text,
        },
        "subject": {"reference": "Patient/p1"},
    }


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


PENICILLIN_ALLERGY = {
    "resourceType": "AllergyIntolerance",
    "id": "a1",
    "clinicalStatus": {"coding": [{"code": "active"}]},
    "criticality": "high",
    "code": {"coding": [{"system": RXNORM, "code": "7980", "display": "Penicillin G"}], "text": "Penicillin"},
    "patient": {"reference": "Patient/p1"},
}
ACTIVE_HCTZ = draft("m1", "316049", "Hydrochlorothiazide 25 MG") | {"status": "active"}


def rule_cards(response) -> list[dict[str, Any]]:
    return [c for c in response.json["cards"] if c["source"]["label"] == "MedGemma CDS rules"]


def ai_cards(response) -> list[dict[str, Any]]:
    return [c for c in response.json["cards"] if c["source"]["label"] != "MedGemma CDS rules"]


def order_select(hook_body, orders: list[dict[str, Any]], selections: list[str], prefetch: dict[str, Any]):
    body = hook_body("order-select", "p1", prefetch=prefetch)
    body["context"] |= {"selections": selections, "draftOrders": bundle(*orders)}
    return body


def test_allergy_conflict_by_class_is_critical_with_delete_suggestion(client, issuer, hook_body) -> None:
    amoxicillin = draft("d1", "308182", "Amoxicillin 250 MG Oral Capsule")
    body = order_select(
        hook_body,
        [amoxicillin],
        ["MedicationRequest/d1"],
        {"allergies": bundle(PENICILLIN_ALLERGY), "medications": bundle()},
    )
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 200, response.json
    (card,) = rule_cards(response)
    assert card["indicator"] == "critical"
    assert card["selectionBehavior"] == "at-most-one"
    action = card["suggestions"][0]["actions"][0]
    assert action == {
        "type": "delete",
        "description": "Remove the draft order",
        "resourceId": "MedicationRequest/d1",
    }
    assert all(r["display"] and r["code"] for r in card["overrideReasons"])


def test_duplicate_of_active_medication_is_warning(client, issuer, hook_body) -> None:
    body = order_select(
        hook_body,
        [draft("d2", "316049", "Hydrochlorothiazide 25 MG")],
        ["MedicationRequest/d2"],
        {"allergies": None, "medications": bundle(ACTIVE_HCTZ)},
    )
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    (card,) = rule_cards(response)
    assert card["indicator"] == "warning"
    assert card["summary"].startswith("Duplicate therapy")


def test_unselected_or_unrelated_orders_give_no_card(client, issuer, hook_body) -> None:
    body = order_select(
        hook_body,
        [draft("d3", "308182", "Amoxicillin 250 MG Oral Capsule"), draft("d4", "197361", "Amlodipine 5 MG")],
        ["MedicationRequest/d4"],
        {"allergies": bundle(PENICILLIN_ALLERGY), "medications": bundle(ACTIVE_HCTZ)},
    )
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 200
    assert rule_cards(response) == []
    # Only MedGemma's review of the selected order is left: running, or finished if a test worker is up.
    for card in ai_cards(response):
        assert card["summary"] == "Order review: AI analysis is running" or card["source"][
            "label"
        ].startswith("MedGemma AI draft")


def test_malformed_draft_orders_is_400_naming_the_field(client, issuer, hook_body) -> None:
    body = order_select(hook_body, [], ["MedicationRequest/x"], {"allergies": None, "medications": None})
    body["context"]["draftOrders"] = {"resourceType": "Bundle", "type": "collection", "entry": "none"}
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 400
    assert "context.draftOrders" in response.json["message"]
