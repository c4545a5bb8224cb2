"""patient-summary over the Flask test client: full, none, partial and null prefetch, and 412."""

from __future__ import annotations

import uuid
from typing import Any

from support import FhirServer
from support import Issuer
from support import fhir_access
from support import waiting

PATH = "/cds-services/patient-summary"


def full_prefetch(fhir: FhirServer, patient_id: str) -> dict[str, Any]:
    return {
        "patient": fhir.get(f"Patient/{patient_id}"),
        "conditions": fhir.get(f"Condition?patient={patient_id}&clinical-status=active"),
        "medications": fhir.get(f"MedicationRequest?patient={patient_id}&status=active"),
        "allergies": fhir.get(f"AllergyIntolerance?patient={patient_id}"),
    }


def test_full_prefetch_gives_rule_card_and_running_ai_card(
    client, issuer: Issuer, fhir_server: FhirServer, hook_body
) -> None:
    patient_id = fhir_server.patients["Trantow"]
    prefetch = full_prefetch(fhir_server, patient_id)
    # A record no earlier test sent, so its model job can't have finished already.
    prefetch["patient"]["text"] = {
        "status": "generated",
        "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{uuid.uuid4()}</div>',
    }
    body = hook_body("patient-view", patient_id, prefetch=prefetch)
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 200, response.json
    card, ai_card = response.json["cards"]
    assert card["indicator"] == "info"
    # The hook doesn't wait (budget 0): the AI card says where the job stands, with a status link.
    assert ai_card["summary"] in waiting("Pre-visit summary")
    assert ai_card["links"][0]["url"].startswith("http://cds.test/jobs/")
    assert card["summary"] == "1 active problem, 3 active medications, 3 allergies"
    assert "Hydrochlorothiazide 25 MG" in card["detail"]
    assert card["source"]["label"]
    assert len(card["uuid"]) == 36


def test_no_prefetch_reads_fhir_server_with_bearer_token(
    client, issuer, fhir_server, hook_body, redis_client
) -> None:
    patient_id = fhir_server.patients["Trantow"]
    body = hook_body("patient-view", patient_id, **fhir_access(fhir_server.base_url, fhir_server.token))
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 200, response.json
    assert response.json["cards"][0]["summary"] == "1 active problem, 3 active medications, 3 allergies"
    # The token was used for the reads only: not in the model job, the Celery message or any other key.
    for key in redis_client.scan_iter():
        kind = redis_client.type(key)
        if kind == b"string":
            values = [redis_client.get(key) or b""]
        elif kind == b"hash":
            values = list(redis_client.hgetall(key).values())
        elif kind == b"list":
            values = redis_client.lrange(key, 0, -1)
        else:
            values = []
        assert all(fhir_server.token.encode() not in value for value in values), key


def test_partial_prefetch_fetches_only_missing_keys(client, issuer, fhir_server, hook_body) -> None:
    patient_id = fhir_server.patients["Trantow"]
    prefetch = full_prefetch(fhir_server, patient_id)
    del prefetch["medications"], prefetch["allergies"]
    body = hook_body(
        "patient-view", patient_id, prefetch=prefetch, **fhir_access(fhir_server.base_url, fhir_server.token)
    )
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 200
    assert response.json["cards"][0]["summary"] == "1 active problem, 3 active medications, 3 allergies"


def test_null_prefetch_means_no_data_and_is_not_refetched(client, issuer, fhir_server, hook_body) -> None:
    patient_id = fhir_server.patients["Trantow"]
    prefetch = full_prefetch(fhir_server, patient_id) | {"allergies": None, "medications": None}
    # No fhirServer at all: a refetch attempt would have to fail with 412.
    body = hook_body("patient-view", patient_id, prefetch=prefetch)
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 200
    assert response.json["cards"][0]["summary"] == "1 active problem, 0 active medications, 0 allergies"


def test_missing_prefetch_without_fhir_server_is_412(client, issuer, fhir_server, hook_body) -> None:
    body = hook_body("patient-view", fhir_server.patients["Trantow"])
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 412
    outcome = response.json
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"][0].startswith("prefetch.")


def test_unreachable_fhir_server_is_412_naming_the_key(client, issuer, hook_body) -> None:
    from support import free_port

    body = hook_body("patient-view", "abc", fhirServer=f"http://127.0.0.1:{free_port()}/fhir")
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 412
    assert "unreachable" in response.json["issue"][0]["diagnostics"]


def test_fhir_server_refusing_the_token_is_412(client, issuer, fhir_server, hook_body) -> None:
    body = hook_body(
        "patient-view", fhir_server.patients["Trantow"], **fhir_access(fhir_server.base_url, "wrong-token")
    )
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 412
    assert "401" in response.json["issue"][0]["diagnostics"]
    assert "wrong-token" not in response.get_data(as_text=True)


def test_unknown_patient_is_412_not_found(client, issuer, fhir_server, hook_body) -> None:
    body = hook_body(
        "patient-view", "no-such-patient", **fhir_access(fhir_server.base_url, fhir_server.token)
    )
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 412
    assert response.json["issue"][0]["code"] == "not-found"
