"""order-sign-review: the order-review checks over every medication order being signed."""

from __future__ import annotations

from support import waiting
from test_order_review import NO_PATIENT_DATA
from test_order_review import PENICILLIN_ALLERGY
from test_order_review import ai_cards
from test_order_review import bundle
from test_order_review import draft
from test_order_review import rule_cards

PATH = "/cds-services/order-sign-review"


def order_sign(hook_body, orders, prefetch):
    body = hook_body("order-sign", "p1", prefetch=NO_PATIENT_DATA | prefetch)
    body["context"]["draftOrders"] = bundle(*orders)
    return body


def test_discovery_declares_order_sign_review(client) -> None:
    services = {s["id"]: s for s in client.get("/cds-services").json["services"]}
    declared = services["order-sign-review"]
    assert declared["hook"] == "order-sign"
    assert declared["prefetch"]["allergies"] == "AllergyIntolerance?patient={{context.patientId}}"


def test_every_order_being_signed_is_checked(client, issuer, hook_body) -> None:
    orders = [
        draft("d1", "197361", "Amlodipine 5 MG Oral Tablet"),
        draft("d2", "308182", "Amoxicillin 250 MG Oral Capsule"),
    ]
    body = order_sign(hook_body, orders, {"allergies": bundle(PENICILLIN_ALLERGY), "medications": None})
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 200, response.json
    (card,) = rule_cards(response)
    assert card["indicator"] == "critical"
    assert card["suggestions"][0]["actions"][0]["resourceId"] == "MedicationRequest/d2"
    # MedGemma reviews both orders as one job; its card says where the job stands.
    assert [c["summary"] in waiting("Order review") for c in ai_cards(response)] == [True]


def test_clean_orders_being_signed_give_no_rule_card(client, issuer, hook_body) -> None:
    orders = [draft("d1", "197361", "Amlodipine 5 MG Oral Tablet")]
    body = order_sign(hook_body, orders, {"allergies": bundle(PENICILLIN_ALLERGY), "medications": None})
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 200
    assert rule_cards(response) == []


def test_order_sign_needs_no_selections_but_a_bundle(client, issuer, hook_body) -> None:
    body = order_sign(hook_body, [], {"allergies": None, "medications": None})
    body["context"]["draftOrders"] = {"resourceType": "MedicationRequest"}
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 400
    assert "context.draftOrders" in response.json["message"]
