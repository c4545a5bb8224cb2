"""Discovery, errors, CORS, feedback and health over the Flask test client."""

from __future__ import annotations

import uuid

from support import PUBLIC_URL

from cds_service.store import Store

SUMMARY = "/cds-services/patient-summary"


def test_discovery_lists_services_sorted_with_prefetch(client) -> None:
    response = client.get("/cds-services")
    assert response.status_code == 200
    services = {s["id"]: s for s in response.json["services"]}
    assert {"patient-summary", "order-review"} <= set(services)
    ids = [s["id"] for s in response.json["services"]]
    assert ids == sorted(ids)
    summary = services["patient-summary"]
    assert summary["hook"] == "patient-view"
    assert summary["prefetch"]["patient"] == "Patient/{{context.patientId}}"
    assert services["order-review"]["hook"] == "order-select"
    for service in services.values():
        assert None not in service.values() and "" not in service.values()


def test_discovery_answers_cors_preflight_with_authorization(client) -> None:
    response = client.options(
        "/cds-services",
        headers={
            "Origin": "https://sandbox.cds-hooks.org",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] in ("*", "https://sandbox.cds-hooks.org")
    assert "authorization" in response.headers["Access-Control-Allow-Headers"].lower()


def test_hook_preflight_allows_post_with_both_headers(client) -> None:
    response = client.options(
        SUMMARY,
        headers={
            "Origin": "https://sandbox.cds-hooks.org",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert response.status_code == 200
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert "POST" in response.headers["Access-Control-Allow-Methods"]


def test_unknown_service_is_404(client, issuer, hook_body) -> None:
    response = client.post("/cds-services/nope", json=hook_body("patient-view", "p1"))
    assert response.status_code == 404
    assert response.json["error"] == "not-found"


def test_get_on_hook_is_405_json(client) -> None:
    response = client.get(SUMMARY)
    assert response.status_code == 405
    assert response.json["error"] == "method-not-allowed"


def test_not_json_is_415(client, issuer) -> None:
    response = client.post(SUMMARY, data="hook=patient-view", headers=issuer.headers(SUMMARY))
    assert response.status_code == 415


def test_malformed_json_is_400(client, issuer) -> None:
    response = client.post(
        SUMMARY, data="{not json", content_type="application/json", headers=issuer.headers(SUMMARY)
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json["message"]


def test_too_deep_json_is_400(client, issuer) -> None:
    body = "[" * 5000 + "]" * 5000
    response = client.post(
        SUMMARY, data=body, content_type="application/json", headers=issuer.headers(SUMMARY)
    )
    assert response.status_code == 400


def test_body_over_limit_is_413(client, issuer, settings) -> None:
    body = '{"pad": "' + "x" * settings.max_body_bytes + '"}'
    response = client.post(
        SUMMARY, data=body, content_type="application/json", headers=issuer.headers(SUMMARY)
    )
    assert response.status_code == 413
    assert response.json["error"] == "request-entity-too-large"


def test_missing_field_is_400_naming_it_without_echoing_values(client, issuer, hook_body) -> None:
    body = hook_body("patient-view", "p1")
    del body["context"]["userId"]
    body["context"]["patientId"] = "Smith John <script>"
    response = client.post(SUMMARY, json=body, headers=issuer.headers(SUMMARY))
    assert response.status_code == 400
    fields = {d["field"] for d in response.json["details"]}
    assert fields == {"context.userId", "context.patientId"}
    assert "Smith" not in response.get_data(as_text=True)


def test_wrong_hook_for_service_is_400(client, issuer, hook_body) -> None:
    response = client.post(SUMMARY, json=hook_body("order-select", "p1"), headers=issuer.headers(SUMMARY))
    assert response.status_code == 400
    assert "patient-view" in response.json["message"]


def test_fhir_authorization_without_fhir_server_is_400(client, issuer, hook_body) -> None:
    authorization = {
        "access_token": "t0k",
        "token_type": "Bearer",
        "expires_in": 1,
        "scope": "x",
        "subject": "y",
    }
    body = hook_body("patient-view", "p1", fhirAuthorization=authorization)
    response = client.post(SUMMARY, json=body, headers=issuer.headers(SUMMARY))
    assert response.status_code == 400
    assert "t0k" not in response.get_data(as_text=True)


def test_prefetch_that_is_not_a_resource_is_400_naming_the_key(client, issuer, hook_body) -> None:
    body = hook_body("patient-view", "p1", prefetch={"patient": {"gender": "female"}})
    response = client.post(SUMMARY, json=body, headers=issuer.headers(SUMMARY))
    assert response.status_code == 400
    assert response.json["message"].startswith("prefetch 'patient' is not a FHIR resource")


def test_a_malformed_element_in_prefetch_is_read_tolerantly(client, issuer, hook_body) -> None:
    # gender as a number is invalid R4; the element is dropped, the chart still gets its summary card.
    empty = {"resourceType": "Bundle", "type": "searchset"}
    prefetch = {"patient": {"resourceType": "Patient", "id": "p1", "gender": 7}, "conditions": empty}
    prefetch |= {"medications": empty, "allergies": empty, "observations": None}
    response = client.post(
        SUMMARY, json=hook_body("patient-view", "p1", prefetch=prefetch), headers=issuer.headers(SUMMARY)
    )
    assert response.status_code == 200, response.json
    assert response.json["cards"][0]["summary"] == "0 active problems, 0 active medications, 0 allergies"


def test_missing_jwt_is_bare_401(client, hook_body) -> None:
    response = client.post(SUMMARY, json=hook_body("patient-view", "p1"))
    assert response.status_code == 401
    assert response.json == {"error": "unauthorized", "message": "Unauthorized"}


def test_jwt_for_another_endpoint_is_401(client, issuer, hook_body) -> None:
    headers = {"Authorization": f"Bearer {issuer.token(PUBLIC_URL + '/cds-services/order-review')}"}
    response = client.post(SUMMARY, json=hook_body("patient-view", "p1"), headers=headers)
    assert response.status_code == 401


def test_feedback_round_trip_and_summary(client, issuer, settings) -> None:
    path = "/cds-services/order-review/feedback"
    card = str(uuid.uuid4())
    body = {
        "feedback": [
            {
                "card": card,
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": "s1"}],
                "outcomeTimestamp": "2026-11-27T10:00:00Z",
            },
            {
                "card": card,
                "outcome": "overridden",
                "outcomeTimestamp": "2026-11-27T10:01:00Z",
                "overrideReason": {
                    "reason": {"code": "benefit-outweighs-risk", "system": "x"},
                    "userComment": "ok",
                },
            },
        ]
    }
    before = (
        Store(settings.database_url).feedback_summary().get("order-review", {"accepted": 0, "overridden": 0})
    )
    response = client.post(path, json=body, headers=issuer.headers(path))
    assert response.status_code == 200
    after = client.get("/feedback/summary").json["services"]["order-review"]
    assert after["accepted"] == before["accepted"] + 1
    assert after["overridden"] == before["overridden"] + 1


def test_invalid_feedback_is_400(client, issuer) -> None:
    path = "/cds-services/order-review/feedback"
    body = {"feedback": [{"card": "c", "outcome": "ignored", "outcomeTimestamp": "yesterday"}]}
    response = client.post(path, json=body, headers=issuer.headers(path))
    assert response.status_code == 400
    fields = {d["field"] for d in response.json["details"]}
    assert fields == {"feedback.0.outcome", "feedback.0.outcomeTimestamp"}


def test_health_and_readiness(client) -> None:
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json["checks"] == {"services": True, "database": True, "redis": True}
    assert set(ready.json["workers"]) == {"text", "image"}
    if ready.json["status"] == "degraded":
        assert {"workers:text", "workers:image"} & set(ready.json["missing"])


def test_readiness_says_what_is_missing_when_redis_is_down(settings) -> None:
    from support import free_port

    from cds_service.app import create_app

    app = create_app(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.json["missing"] == ["redis"]


def test_job_status_answers_503_not_500_while_redis_is_down(settings, issuer) -> None:
    from support import free_port

    from cds_service.app import create_app

    app = create_app(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    path = "/jobs/" + "a" * 64
    response = app.test_client().get(path, headers=issuer.headers(path))
    assert response.status_code == 503
    assert response.json["error"] == "store-unavailable"
    assert "temporarily unavailable" in response.json["message"]


def test_redis_down_still_answers_rule_cards_within_budget(settings, issuer, hook_body) -> None:
    import time

    from support import free_port

    from cds_service.app import create_app

    app = create_app(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    penicillin_allergy = {
        "resourceType": "AllergyIntolerance",
        "id": "a1",
        "criticality": "high",
        "code": {"text": "Penicillin"},
    }
    body = hook_body(
        "order-select",
        "p1",
        prefetch={
            "allergies": {
                "resourceType": "Bundle",
                "type": "searchset",
                "entry": [{"resource": penicillin_allergy}],
            },
            # null is "no data": the patient checks have nothing to say (a key not sent would be a card).
            **dict.fromkeys(("medications", "patient", "conditions", "observations", "labs")),
        },
    )
    body["context"] |= {
        "selections": ["MedicationRequest/d1"],
        "draftOrders": {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {
                    "resource": {
                        "resourceType": "MedicationRequest",
                        "id": "d1",
                        "status": "draft",
                        "intent": "order",
                        "medicationCodeableConcept": {"text": "Amoxicillin 500 MG Oral Capsule"},
                        "subject": {"reference": "Patient/p1"},
                    }
                }
            ],
        },
    }
    started = time.perf_counter()
    response = app.test_client().post(
        "/cds-services/order-review", json=body, headers=issuer.headers("/cds-services/order-review")
    )
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.json
    # The rules need no Redis: the allergy card is there; the AI card, which does, says it is unavailable.
    rules = [c for c in response.json["cards"] if c["source"]["label"] == "MedGemma CDS rules"]
    assert [c["summary"] for c in response.json["cards"] if c not in rules] == [
        "Order review: AI analysis unavailable"
    ]
    (card,) = rules
    assert card["indicator"] == "critical"
    assert card["summary"].startswith("Allergy conflict: Amoxicillin 500 MG Oral Capsule")
    # Not a benchmark: only that a dead Redis doesn't make the hook hang past its budget.
    assert elapsed < settings.hook_budget_ms / 1000 + 3
