"""The order hooks never go silent on what they can't read: each path answers with a card, over HTTP."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any

from support import fhir_access

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SELECT = "/cds-services/order-review"
SIGN = "/cds-services/order-sign-review"


def order(order_id: str, concept: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "MedicationRequest", "id": order_id, "status": "draft"}
    resource["intent"] = "order"
    if concept is not None:
        resource["medicationCodeableConcept"] = concept
    return resource | extra


def bundle(*resources: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r} for r in resources],
    } | extra


def allergy(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "AllergyIntolerance",
        "id": "a1",
        "code": {"text": text},
        "criticality": "high",
    } | extra


def active(active_id: str, text: str) -> dict[str, Any]:
    return order(active_id, {"text": text}, status="active")


def call(client, issuer, hook: str, orders: list[dict[str, Any]], prefetch: dict[str, Any], **extra: Any):
    path = SELECT if hook == "order-select" else SIGN
    context: dict[str, Any] = {
        "userId": "Practitioner/COREPRACTITIONER1",
        "patientId": "p1",
        "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": o} for o in orders]},
    }
    if hook == "order-select":
        context["selections"] = [f"MedicationRequest/{orders[0]['id']}"]
    # Every key sent (null: "no data"), so only what a test names is there to check.
    keys = ("allergies", "medications", "patient", "conditions", "observations", "labs")
    prefetch = dict.fromkeys(keys) | prefetch
    body = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context, "prefetch": prefetch} | extra
    return client.post(path, json=body, headers=issuer.headers(path))


def topics(response) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for card in response.json["cards"]:
        if card["source"]["label"] != "MedGemma CDS rules":
            continue
        topic = card["source"].get("topic", {}).get("code")
        if topic:
            found.setdefault(topic, []).append(card)
    return found


def test_misspelled_order_is_read_as_the_drug_and_says_so(client, issuer) -> None:
    drafts = [order("d1", {"text": "Amoxicilin 500 MG"})]
    response = call(client, issuer, "order-select", drafts, {"allergies": bundle(allergy("Penicillin"))})
    assert response.status_code == 200
    found = topics(response)
    (conflict,) = found["allergy-conflict"]
    assert "read as amoxicillin" in conflict["summary"]
    (read_as,) = found["read-as"]
    assert "amoxicilin as amoxicillin" in read_as["detail"]


def test_misspelled_allergy_still_matches_the_order(client, issuer) -> None:
    drafts = [order("d1", {"text": "Amoxicillin 500 MG capsule"})]
    response = call(client, issuer, "order-sign", drafts, {"allergies": bundle(allergy("Penicilin"))})
    assert [c["indicator"] for c in topics(response)["allergy-conflict"]] == ["critical"]


def test_order_text_naming_no_known_drug_is_a_warning_that_quotes_it(client, issuer) -> None:
    drafts = [order("d1", {"text": "Zyntrelix 10 mg tablet"})]
    response = call(client, issuer, "order-select", drafts, {"allergies": bundle(allergy("Penicillin"))})
    (card,) = topics(response)["not-checked"]
    assert card["indicator"] == "warning"
    assert "'Zyntrelix 10 mg tablet'" in card["detail"]


def test_active_medication_by_included_reference_is_checked(client, issuer) -> None:
    reference = active("m1", "x")
    del reference["medicationCodeableConcept"]
    reference["medicationReference"] = {"reference": "Medication/med1"}
    medication = {"resourceType": "Medication", "id": "med1", "code": {"text": "Simvastatin 40 mg tablet"}}
    medications = bundle(reference)
    medications["entry"].append({"resource": medication, "search": {"mode": "include"}})
    drafts = [order("d1", {"text": "Clarithromycin 500 mg tablet"})]
    response = call(client, issuer, "order-select", drafts, {"medications": medications})
    (card,) = topics(response)["drug-interaction"]
    assert card["indicator"] == "critical"
    assert "Simvastatin" in card["summary"] and "Clarithromycin" in card["summary"]
    assert "not-checked" not in topics(response)


def test_active_medication_by_unresolved_reference_is_a_not_checked_card(client, issuer) -> None:
    reference = active("m1", "x")
    del reference["medicationCodeableConcept"]
    reference["medicationReference"] = {"reference": "Medication/elsewhere"}
    drafts = [order("d1", {"text": "Clarithromycin 500 mg tablet"})]
    response = call(client, issuer, "order-sign", drafts, {"medications": bundle(reference)})
    (card,) = topics(response)["not-checked"]
    assert card["indicator"] == "warning" and "MedicationRequest/m1" in card["summary"]


def test_paged_medication_list_is_a_not_checked_card(client, issuer) -> None:
    listed = [active(f"m{i}", "Amlodipine 5 mg") for i in range(20)]
    paged = bundle(*listed, total=25, link=[{"relation": "next", "url": "https://ehr.example/fhir?page=2"}])
    drafts = [order("d1", {"text": "Clarithromycin 500 mg tablet"})]
    response = call(client, issuer, "order-select", drafts, {"medications": paged})
    (card,) = topics(response)["not-checked"]
    assert "pages" in card["detail"] and "every active medication" in card["summary"]


def test_paged_allergy_list_by_total_is_a_not_checked_card(client, issuer) -> None:
    allergies = bundle(allergy("Sulfa"), total=3)
    drafts = [order("d1", {"text": "Amoxicillin 500 mg"})]
    response = call(client, issuer, "order-select", drafts, {"allergies": allergies})
    (card,) = topics(response)["not-checked"]
    assert "1 of 3" in card["detail"]


def test_lab_orders_past_the_limit_never_cost_the_medication_checks(client, issuer) -> None:
    labs = [{"resourceType": "ServiceRequest", "id": f"lab{i}", "status": "draft"} for i in range(100)]
    drafts = [order("d1", {"text": "Amoxicillin 500 mg"}), *labs]
    response = call(client, issuer, "order-sign", drafts, {"allergies": bundle(allergy("Penicillin"))})
    assert response.status_code == 200, response.json
    assert [c["indicator"] for c in topics(response)["allergy-conflict"]] == ["critical"]
    assert "not-checked" not in topics(response)


def test_medication_orders_past_the_limit_are_counted_in_a_card(client, issuer) -> None:
    drafts = [order("d1", {"text": "Amoxicillin 500 mg"})] + [
        order(f"d{i}", {"text": "Acetaminophen 500 mg"}) for i in range(2, 106)
    ]
    response = call(client, issuer, "order-sign", drafts, {"allergies": bundle(allergy("Penicillin"))})
    assert response.status_code == 200, response.json
    found = topics(response)
    assert [c["indicator"] for c in found["allergy-conflict"]] == ["critical"]
    (card,) = found["not-checked"]
    assert card["summary"].startswith("Not checked: 5 more medication orders")


def test_fhir_authorization_read_tolerantly(client, issuer) -> None:
    authorization = {"access_token": "opaque", "token_type": "bearer", "scope": "patient/*.read"}
    drafts = [order("d1", {"text": "Amoxicillin 500 mg"})]
    prefetch = {"allergies": bundle(allergy("Penicillin"))}
    response = call(
        client,
        issuer,
        "order-select",
        drafts,
        prefetch,
        fhirServer="https://ehr.example/fhir",
        fhirAuthorization=authorization,
    )
    assert response.status_code == 200, response.json
    assert topics(response)["allergy-conflict"]
    authorization["token_type"] = "MAC"
    refused = call(client, issuer, "order-select", drafts, prefetch, fhirServer="https://ehr.example/fhir",
                   fhirAuthorization=authorization)  # fmt: skip
    assert refused.status_code == 400 and "token_type" in refused.json["message"] + str(refused.json)


def test_order_naming_no_medication_is_info_at_select_and_a_warning_at_sign(client, issuer) -> None:
    drafts = [order("d1")]
    selected = call(client, issuer, "order-select", drafts, {"allergies": bundle(allergy("Penicillin"))})
    signed = call(client, issuer, "order-sign", drafts, {"allergies": bundle(allergy("Penicillin"))})
    assert [c["indicator"] for c in topics(selected)["not-checked"]] == ["info"]
    assert [c["indicator"] for c in topics(signed)["not-checked"]] == ["warning"]


def test_discovery_asks_for_referenced_medications_and_the_labs(client) -> None:
    services = {s["id"]: s for s in client.get("/cds-services").json["services"]}
    for service in ("order-review", "order-sign-review"):
        prefetch = services[service]["prefetch"]
        assert "_include=MedicationRequest:medication" in prefetch["medications"]
        assert (
            "http://loinc.org|98979-8" in prefetch["labs"] and "http://loinc.org|2823-3" in prefetch["labs"]
        )


def test_without_prefetch_the_templates_read_referenced_medications_and_labs(
    client, issuer, fhir_server
) -> None:
    patient = fhir_server.post({"resourceType": "Patient", "gender": "female", "birthDate": "1948-03-02"})
    subject = {"reference": f"Patient/{patient['id']}"}
    medication = fhir_server.post(
        {"resourceType": "Medication", "code": {"text": "Simvastatin 40 mg tablet"}}
    )
    fhir_server.post(
        {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "subject": subject,
            "medicationReference": {"reference": f"Medication/{medication['id']}"},
        }
    )
    fhir_server.post(
        {
            "resourceType": "Observation",
            "status": "final",
            "subject": subject,
            "code": {"coding": [{"system": "http://loinc.org", "code": "98979-8"}]},
            "effectiveDateTime": date.today().isoformat(),
            "valueQuantity": {"value": 22, "unit": "mL/min/1.73m2"},
        }
    )
    drafts = [
        order("d1", {"text": "Clarithromycin 500 mg tablet"}),
        order("d2", {"text": "Metformin 500 mg"}),
    ]
    context = {
        "userId": "Practitioner/COREPRACTITIONER1",
        "patientId": patient["id"],
        "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": o} for o in drafts]},
    }
    body = {"hook": "order-sign", "hookInstance": str(uuid.uuid4()), "context": context}
    body |= fhir_access(fhir_server.base_url, fhir_server.token)
    response = client.post(SIGN, json=body, headers=issuer.headers(SIGN))
    assert response.status_code == 200, response.json
    found = topics(response)
    assert [c["indicator"] for c in found["drug-interaction"]] == ["critical"]
    assert [c["indicator"] for c in found["renal"]] == ["critical"]
    assert "not-checked" not in found, found.get("not-checked")


def test_patient_data_that_cannot_be_read_is_an_info_card(client, issuer) -> None:
    path = SELECT
    drafts = [order("d1", {"text": "Metformin 500 mg"})]
    context = {
        "userId": "Practitioner/COREPRACTITIONER1",
        "patientId": "p1",
        "selections": ["MedicationRequest/d1"],
        "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": drafts[0]}]},
    }
    body = {
        "hook": "order-select",
        "hookInstance": str(uuid.uuid4()),
        "context": context,
        "prefetch": {"allergies": bundle(), "medications": bundle()},
    }
    response = client.post(path, json=body, headers=issuer.headers(path))
    (card,) = topics(response)["not-checked"]
    assert card["indicator"] == "info"
    assert "kidney function, potassium and pregnancy tests, conditions, age and sex" in card["summary"]


def test_fhir_server_pages_are_followed_on_the_same_server(fhir_server) -> None:
    import httpx

    from cds_service.fhir_client import FhirReader

    patient = fhir_server.post({"resourceType": "Patient", "gender": "male", "birthDate": "1960-01-01"})
    for index in range(12):
        fhir_server.post(
            {
                "resourceType": "MedicationRequest",
                "status": "active",
                "intent": "order",
                "subject": {"reference": f"Patient/{patient['id']}"},
                "medicationCodeableConcept": {"text": f"Drug {index}"},
            }
        )
    with httpx.Client() as http:
        reader = FhirReader(
            http, fhir_server.base_url, fhir_server.token, allowlist=[], allow_http_loopback=True
        )
        query = f"MedicationRequest?patient={patient['id']}&_count=5"
        first, _ = reader.read(query)
        assert len(first["entry"]) == 5 and any(link["relation"] == "next" for link in first["link"])
        whole, _ = reader.read_search(query)
        assert len(whole["entry"]) == 12
        assert not any(link["relation"] == "next" for link in whole["link"])
        bounded, _ = reader.read_search(query, max_pages=2)
        assert len(bounded["entry"]) == 10
        assert any(link["relation"] == "next" for link in bounded["link"])


def test_unknown_allergy_substance_is_said_but_no_allergy_and_foods_are_quiet(client, issuer) -> None:
    drafts = [order("d1", {"text": "Amoxicillin 500 mg"})]
    quiet = bundle(
        allergy("NKDA", id="a1"),
        allergy("No known allergies", id="a2"),
        allergy("Peanuts", id="a3"),
        allergy("Latex", id="a4", category=["environment"]),
    )
    response = call(client, issuer, "order-select", drafts, {"allergies": quiet})
    assert topics(response) == {}
    unknown = call(client, issuer, "order-select", drafts, {"allergies": bundle(allergy("Zyntrelix"))})
    (card,) = topics(unknown)["not-checked"]
    assert card["indicator"] == "info" and "'Zyntrelix'" in card["detail"]


def test_a_prefetched_first_page_is_completed_from_the_fhir_server(client, issuer, fhir_server) -> None:
    patient = fhir_server.post({"resourceType": "Patient", "gender": "male", "birthDate": "1955-05-05"})
    for index in range(8):
        text = "Simvastatin 40 mg tablet" if index == 7 else f"Levothyroxine {25 * (index + 1)} mcg"
        fhir_server.post(
            {
                "resourceType": "MedicationRequest",
                "status": "active",
                "intent": "order",
                "subject": {"reference": f"Patient/{patient['id']}"},
                "medicationCodeableConcept": {"text": text},
            }
        )
    first_page = fhir_server.get(f"MedicationRequest?patient={patient['id']}&_count=3")
    assert len(first_page["entry"]) == 3 and "Simvastatin" not in str(first_page)
    drafts = [order("d1", {"text": "Clarithromycin 500 mg tablet"})]
    keys = ("allergies", "patient", "conditions", "observations", "labs")
    prefetch = dict.fromkeys(keys) | {"medications": first_page}
    response = call(
        client,
        issuer,
        "order-select",
        drafts,
        prefetch,
        **fhir_access(fhir_server.base_url, fhir_server.token),
    )
    assert response.status_code == 200, response.json
    found = topics(response)
    assert [c["indicator"] for c in found["drug-interaction"]] == ["critical"]
    assert "not-checked" not in found, found.get("not-checked")
