"""order-review: allergy conflicts, duplicate therapy, no card when nothing conflicts."""

from __future__ import annotations

from typing import Any

from support import waiting

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


#: The patient-specific keys sent as null ("no data"): these tests are about allergies and medications.
NO_PATIENT_DATA = dict.fromkeys(("patient", "conditions", "observations", "labs"))


def order_select(hook_body, orders: list[dict[str, Any]], selections: list[str], prefetch: dict[str, Any]):
    body = hook_body("order-select", "p1", prefetch=NO_PATIENT_DATA | prefetch)
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
        assert card["summary"] in waiting("Order review") or card["source"]["label"].startswith(
            "MedGemma AI draft"
        )


def test_draft_orders_that_is_not_a_bundle_is_400_naming_the_field(client, issuer, hook_body) -> None:
    body = order_select(hook_body, [], ["MedicationRequest/x"], {"allergies": None, "medications": None})
    body["context"]["draftOrders"] = draft("x", "308182", "Amoxicillin 250 MG Oral Capsule")
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 400
    assert "context.draftOrders" in response.json["message"]


def test_draft_orders_strict_r4_rejects_are_read_and_checked(client, issuer, hook_body) -> None:
    # The CDS Hooks sandbox's Rx View: no Bundle.type, no intent, category as one object, coding unwrapped.
    order = draft("d1", "308182", "Amoxicillin 250 MG Oral Capsule")
    del order["intent"]
    order["category"] = {"coding": [{"code": "outpatient"}]}
    order["medicationCodeableConcept"]["coding"] = order["medicationCodeableConcept"]["coding"][0]
    body = order_select(
        hook_body, [order], ["MedicationRequest/d1"], {"allergies": bundle(PENICILLIN_ALLERGY)}
    )
    del body["context"]["draftOrders"]["type"]
    body["prefetch"]["medications"] = None
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 200, response.json
    (card,) = rule_cards(response)
    assert card["indicator"] == "critical"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'medgemma_cds_fhir_tolerated_total{kind="single-value-as-list",service="order-review"}' in metrics


def test_a_partial_birth_date_costs_no_rule_card(client, issuer, hook_body) -> None:
    # Patient.birthDate "1970" is valid FHIR; it once made the AI part crash the whole hook (500).
    order = draft("d1", "308182", "Amoxicillin 250 MG Oral Capsule")
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": "1970", "gender": "female"}
    prefetch = {"allergies": bundle(PENICILLIN_ALLERGY), "medications": None, "patient": patient}
    body = order_select(hook_body, [order], ["MedicationRequest/d1"], prefetch)
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 200, response.json
    assert [c["indicator"] for c in rule_cards(response)] == ["critical"]
    assert [c["summary"] in waiting("Order review") for c in ai_cards(response)] == [True]


def test_an_allergy_list_that_cannot_be_read_is_a_card_not_a_412(client, issuer, hook_body) -> None:
    # No prefetch for allergies and no fhirServer to read them from: nothing was checked, and it says so.
    order = draft("d1", "308182", "Amoxicillin 250 MG Oral Capsule")
    body = order_select(hook_body, [order], ["MedicationRequest/d1"], {"medications": None})
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 200, response.json
    (card,) = rule_cards(response)
    assert card["summary"] == "Not checked: Amoxicillin 250 MG Oral Capsule against allergies"
    assert card["indicator"] == "warning"
    assert "no fhirServer" in card["detail"]


def test_a_cached_ai_result_that_no_longer_validates_costs_no_rule_card(
    client, issuer, hook_body, redis_client
) -> None:
    import re

    order = draft("d1", "308182", "Amoxicillin 250 MG Oral Capsule")
    body = order_select(
        hook_body, [order], ["MedicationRequest/d1"], {"allergies": bundle(PENICILLIN_ALLERGY)}
    )
    body["prefetch"]["medications"] = None
    first = client.post(PATH, json=body, headers=issuer.headers(PATH))
    (running,) = ai_cards(first)
    job_id = re.search(r"/jobs/([0-9a-f]+)", running["links"][0]["url"]).group(1)
    # A result stored by an older schema: the AI card can't be built from it.
    redis_client.hset(
        f"mgcds:job:{job_id}",
        mapping={"state": "done", "result": '{"concerns": "not a list"}', "model": "google/medgemma-4b-it"},
    )

    body["hookInstance"] = hook_body("order-select", "p1")["hookInstance"]
    again = client.post(PATH, json=body, headers=issuer.headers(PATH))

    assert again.status_code == 200, again.json
    assert [c["indicator"] for c in rule_cards(again)] == ["critical"]
    # Not silence: the AI part says it failed, without the error's internals.
    assert [c["summary"] for c in ai_cards(again)] == ["Order review: AI analysis failed"]
