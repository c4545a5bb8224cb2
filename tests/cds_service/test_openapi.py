"""``GET /openapi.json``: a valid OpenAPI 3.1 document, and every answer of the sample calls matches it."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator
from jsonschema import FormatChecker
from openapi_spec_validator import validate as validate_openapi
from support import PUBLIC_URL
from support import FhirServer
from support import Issuer
from support import fhir_access
from werkzeug.test import TestResponse

from cds_service.app import create_app
from cds_service.settings import Settings
from cds_service.wire import ModelJobRequest

HOOK = "/cds-services/{service_id}"
FEEDBACK = "/cds-services/{service_id}/feedback"
SUMMARY = "/cds-services/patient-summary"


@pytest.fixture
def document(client: FlaskClient) -> dict[str, Any]:
    """The served OpenAPI document."""
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return dict(response.json)


class Conformance:
    """Checks answers against the document: documented status, JSON body valid against its schema."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.seen: set[tuple[str, str, int]] = set()

    def check(self, template: str, method: str, response: TestResponse) -> None:
        """Fail unless ``response`` is documented for ``method template`` and its body matches the schema."""
        responses = self.document["paths"][template][method]["responses"]
        status = str(response.status_code)
        assert status in responses, f"{method.upper()} {template} answered undocumented {status}"
        answer = responses[status]
        if "$ref" in answer:
            answer = self.document["components"]["responses"][answer["$ref"].rsplit("/", 1)[-1]]
        assert response.mimetype in answer["content"], response.mimetype
        schema = answer["content"][response.mimetype]["schema"]
        # $refs point into components, so the schema is checked with the whole document as its root.
        validator = Draft202012Validator(
            {**schema, "components": self.document["components"]}, format_checker=FormatChecker()
        )
        body = response.get_data(as_text=True) if response.mimetype == "text/html" else response.json
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)]
        assert not errors, f"{method.upper()} {template} {status}: {errors}"
        assert "X-Request-Id" in response.headers
        self.seen.add((template, method, response.status_code))


@pytest.fixture
def conformance(document: dict[str, Any]) -> Conformance:
    """A checker over the served document."""
    return Conformance(document)


class StubFhir(ThreadingHTTPServer):
    """A loopback FHIR stand-in that answers every GET with a fixed status, after an optional delay."""

    def __init__(self, status: int, delay_s: float = 0.0) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                time.sleep(outer.delay_s)
                body = b'{"resourceType": "OperationOutcome", "issue": []}'
                try:
                    self.send_response(outer.status)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the service gave up waiting (the 504 case)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        self.status = status
        self.delay_s = delay_s

    @property
    def base_url(self) -> str:
        """The server's FHIR base URL."""
        return f"http://127.0.0.1:{self.server_address[1]}/fhir"


@pytest.fixture
def stub_fhir() -> Iterator[Callable[..., StubFhir]]:
    """Start stub FHIR servers on demand; all are stopped afterwards."""
    started: list[StubFhir] = []

    def start(status: int, delay_s: float = 0.0) -> StubFhir:
        server = StubFhir(status, delay_s)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validate_openapi(document)
    assert document["openapi"].startswith("3.1.")


def test_document_names_the_operations_and_registered_services(app: Flask, document: dict[str, Any]) -> None:
    operations = {(path, method) for path, item in document["paths"].items() for method in item}
    assert operations >= {
        ("/cds-services", "get"),
        (HOOK, "post"),
        (FEEDBACK, "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/feedback/summary", "get"),
    }
    if any(rule.rule == "/jobs/<job_id>" for rule in app.url_map.iter_rules()):
        assert ("/jobs/{job_id}", "get") in operations
    [service_id] = document["paths"][HOOK]["post"]["parameters"]
    assert service_id["schema"]["enum"] == sorted(app.extensions["cds"].registry.services)
    assert {"patient-summary", "order-review"} <= set(service_id["schema"]["enum"])


def test_hook_feedback_jobs_and_drafts_require_the_jwt_and_discovery_does_not(
    document: dict[str, Any],
) -> None:
    scheme = document["components"]["securitySchemes"]["cdsHooksJwt"]
    assert scheme == scheme | {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            # The review page is reached by its signed link, not a JWT (a clinician's browser has none).
            protected = path.startswith(("/cds-services/", "/jobs/", "/drafts")) and not path.endswith(
                "/review"
            )
            assert (operation.get("security") == [{"cdsHooksJwt": []}]) is protected, (method, path)


def test_hook_errors_are_documented_with_their_bodies(document: dict[str, Any]) -> None:
    responses = document["paths"][HOOK]["post"]["responses"]
    assert {"200", "400", "401", "404", "412", "413", "415", "502", "504"} <= set(responses)
    components = document["components"]
    schemas = {
        status: components["responses"][answer["$ref"].rsplit("/", 1)[-1]]["content"]["application/json"][
            "schema"
        ]
        for status, answer in responses.items()
        if "$ref" in answer
    }
    assert schemas["412"] == {"$ref": "#/components/schemas/OperationOutcome"}
    assert all(
        schema == {"$ref": "#/components/schemas/Error"}
        for status, schema in schemas.items()
        if status != "412"
    )
    assert components["schemas"]["Error"]["required"] == ["error", "message"]
    assert "details" in components["schemas"]["Error"]["properties"]


def test_schemas_come_from_the_wire_models(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    hook_request = schemas["HookRequest"]
    assert set(hook_request["required"]) == {"hook", "hookInstance", "context"}
    assert {"fhirServer", "fhirAuthorization", "prefetch"} <= set(hook_request["properties"])
    assert schemas["Card"]["properties"]["summary"]["maxLength"] == 139
    assert schemas["FhirAuthorization"]["properties"]["access_token"]["writeOnly"] is True
    assert schemas["HookResponse"]["required"] == ["cards"]
    assert not any(ref.startswith("#/$defs") for ref in refs_in(document))
    for ref in refs_in(document):
        section, name = ref.removeprefix("#/components/").split("/")
        assert name in document["components"][section], ref


def refs_in(value: Any) -> Iterator[str]:
    """Yield every ``$ref`` in a JSON value."""
    if isinstance(value, dict):
        for key, child in value.items():
            if key == "$ref":
                yield child
            else:
                yield from refs_in(child)
    elif isinstance(value, list):
        for child in value:
            yield from refs_in(child)


def test_document_is_built_once_per_app(app: Flask, client: FlaskClient, settings: Settings) -> None:
    first = client.get("/openapi.json").get_data()
    assert client.get("/openapi.json").get_data() == first
    other = create_app(settings.model_copy(update={"public_url": "https://cds.example.org"}))
    assert json.loads(other.test_client().get("/openapi.json").get_data())["servers"] == [
        {"url": "https://cds.example.org"}
    ]
    assert json.loads(first)["servers"] == [{"url": PUBLIC_URL}]


def test_sample_calls_answer_as_documented(
    client: FlaskClient,
    conformance: Conformance,
    issuer: Issuer,
    fhir_server: FhirServer,
    hook_body: Callable[..., dict[str, Any]],
    settings: Settings,
) -> None:
    check = conformance.check
    check("/cds-services", "get", client.get("/cds-services"))
    check("/healthz", "get", client.get("/healthz"))
    check("/readyz", "get", client.get("/readyz"))
    check("/feedback/summary", "get", client.get("/feedback/summary"))

    patient_id = fhir_server.patients["Trantow"]
    prefetch = {
        "patient": fhir_server.get(f"Patient/{patient_id}"),
        "conditions": fhir_server.get(f"Condition?patient={patient_id}&clinical-status=active"),
        "medications": fhir_server.get(f"MedicationRequest?patient={patient_id}&status=active"),
        "allergies": fhir_server.get(f"AllergyIntolerance?patient={patient_id}"),
    }
    full = hook_body("patient-view", patient_id, prefetch=prefetch)
    answer = client.post(SUMMARY, json=full, headers=issuer.headers(SUMMARY))
    assert answer.status_code == 200 and answer.json["cards"]
    check(HOOK, "post", answer)
    fetched = hook_body("patient-view", patient_id, **fhir_access(fhir_server.base_url, fhir_server.token))
    check(HOOK, "post", client.post(SUMMARY, json=fetched, headers=issuer.headers(SUMMARY)))

    review = "/cds-services/order-review"
    order = hook_body(
        "order-select",
        patient_id,
        prefetch={"allergies": prefetch["allergies"], "medications": prefetch["medications"]},
    )
    order["context"] |= {
        "selections": ["MedicationRequest/x"],
        "draftOrders": {"resourceType": "Bundle", "type": "collection"},
    }
    check(HOOK, "post", client.post(review, json=order, headers=issuer.headers(review)))

    bad = hook_body("patient-view", "not a valid id!")
    check(HOOK, "post", client.post(SUMMARY, json=bad, headers=issuer.headers(SUMMARY)))
    check(HOOK, "post", client.post(SUMMARY, json=full))
    check(
        HOOK,
        "post",
        client.post("/cds-services/nope", json=full, headers=issuer.headers("/cds-services/nope")),
    )
    no_data = hook_body("patient-view", patient_id)
    check(HOOK, "post", client.post(SUMMARY, json=no_data, headers=issuer.headers(SUMMARY)))
    too_big = '{"pad": "' + "x" * settings.max_body_bytes + '"}'
    check(
        HOOK,
        "post",
        client.post(SUMMARY, data=too_big, content_type="application/json", headers=issuer.headers(SUMMARY)),
    )
    check(HOOK, "post", client.post(SUMMARY, data="hook=patient-view", headers=issuer.headers(SUMMARY)))

    feedback_path = "/cds-services/patient-summary/feedback"
    feedback = {
        "feedback": [
            {"card": str(uuid.uuid4()), "outcome": "accepted", "outcomeTimestamp": "2026-11-27T10:00:00Z"}
        ]
    }
    check(FEEDBACK, "post", client.post(feedback_path, json=feedback, headers=issuer.headers(feedback_path)))
    check(
        FEEDBACK,
        "post",
        client.post(feedback_path, json={"feedback": []}, headers=issuer.headers(feedback_path)),
    )
    check(FEEDBACK, "post", client.post(feedback_path, json=feedback))

    assert {status for _, _, status in conformance.seen} >= {200, 400, 401, 404, 412, 413, 415}


def test_gateway_errors_answer_as_documented(
    settings: Settings,
    conformance: Conformance,
    issuer: Issuer,
    stub_fhir: Callable[..., StubFhir],
    hook_body: Callable[..., dict[str, Any]],
) -> None:
    client = create_app(settings.model_copy(update={"fhir_timeout_s": 0.3})).test_client()
    # A 500, a 200 whose body is not the resource asked for (an OperationOutcome), and a stall.
    broken, wrong_type, stalled = stub_fhir(500), stub_fhir(200), stub_fhir(200, delay_s=2.0)
    for server, status in ((broken, 502), (wrong_type, 502), (stalled, 504)):
        body = hook_body("patient-view", "p1", **fhir_access(server.base_url, "stub-token"))
        response = client.post(SUMMARY, json=body, headers=issuer.headers(SUMMARY))
        assert response.status_code == status, response.json
        conformance.check(HOOK, "post", response)


def test_job_answers_as_documented(
    app: Flask, client: FlaskClient, conformance: Conformance, issuer: Issuer
) -> None:
    if not any(rule.rule == "/jobs/<job_id>" for rule in app.url_map.iter_rules()):
        pytest.skip("this app serves no job endpoint")
    job = ModelJobRequest(
        service_id="patient-summary",
        task="patient-summary",
        role="text",
        model="tiny",
        system_prompt="system",
        user_prompt=uuid.uuid4().hex,
        max_new_tokens=16,
    )
    job_id, _ = app.extensions["cds"].jobs.create(job)
    for path in (f"/jobs/{job_id}", f"/jobs/{uuid.uuid4().hex}"):
        conformance.check("/jobs/{job_id}", "get", client.get(path, headers=issuer.headers(path)))
        conformance.check("/jobs/{job_id}", "get", client.get(path))
    # A browser asks for HTML: the page is documented as well as the JSON record.
    path = f"/jobs/{job_id}"
    page = client.get(path, headers=issuer.headers(path) | {"Accept": "text/html"})
    assert page.mimetype == "text/html"
    conformance.check("/jobs/{job_id}", "get", page)
    assert {status for _, _, status in conformance.seen} == {200, 401, 404}
