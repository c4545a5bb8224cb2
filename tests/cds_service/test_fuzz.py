"""Fuzzing with valid JWTs: schemathesis from the OpenAPI document, then hostile hook bodies from hypothesis.

Neither may ever produce a 5xx, and every answer must be one the document describes. The app under test has
no FHIR server allowlist and no loopback exception, so no generated ``fhirServer`` can cause a connection.
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import unquote

import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance
from schemathesis.specs.openapi.checks import response_headers_conformance
from schemathesis.specs.openapi.checks import response_schema_conformance
from schemathesis.specs.openapi.checks import status_code_conformance
from support import PUBLIC_URL
from support import Issuer
from support import RedisServer

from cds_service.app import create_app
from cds_service.settings import Settings

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Modest budgets keep the whole file well under a minute; the database is off so no .hypothesis/ appears.
FUZZ = hypothesis_settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
OPERATIONS = [
    ("/cds-services", "GET", [GenerationMode.POSITIVE]),
    ("/cds-services/{service_id}", "POST", list(GenerationMode)),
    ("/cds-services/{service_id}/feedback", "POST", list(GenerationMode)),
    ("/feedback/summary", "GET", [GenerationMode.POSITIVE]),
    ("/healthz", "GET", [GenerationMode.POSITIVE]),
    ("/readyz", "GET", [GenerationMode.POSITIVE]),
    ("/jobs/{job_id}", "GET", list(GenerationMode)),
    ("/drafts", "GET", list(GenerationMode)),
    ("/drafts/{draft_id}", "GET", list(GenerationMode)),
    ("/drafts/{draft_id}/review", "GET", list(GenerationMode)),
    ("/drafts/{draft_id}/sign", "POST", list(GenerationMode)),
    ("/drafts/{draft_id}/reject", "POST", list(GenerationMode)),
    ("/review/launch", "GET", list(GenerationMode)),
    ("/review/callback", "GET", list(GenerationMode)),
    ("/review/", "GET", [GenerationMode.POSITIVE]),
    # Only a string path parameter: there is no invalid input to generate for these two.
    ("/review/drafts/{draft_id}", "GET", [GenerationMode.POSITIVE]),
    ("/review/drafts/{draft_id}/sign", "POST", list(GenerationMode)),
    ("/review/drafts/{draft_id}/reject", "POST", list(GenerationMode)),
    ("/review/drafts/{draft_id}/write-back", "POST", [GenerationMode.POSITIVE]),
]
SERVICES = [
    "/cds-services/patient-summary",
    "/cds-services/imaging-report-draft",
    "/cds-services/order-review",
    "/cds-services/order-sign-review",
]


@pytest.fixture(scope="module")
def fuzz_redis_url(redis_server: RedisServer) -> str:
    """A Redis database of the fuzzing app's own, so no test worker picks up the model jobs it enqueues."""
    return redis_server.new_database()


@pytest.fixture
def fuzz_app(settings: Settings, fuzz_redis_url: str) -> Flask:
    """The app with every fhirServer refused (no allowlist, no loopback) and a short hook budget."""
    update = {"fhir_allow_http_loopback": False, "hook_budget_ms": 50, "redis_url": fuzz_redis_url}
    return create_app(settings.model_copy(update=update))


@pytest.mark.parametrize(
    ("path", "method", "mode"),
    [(path, method, mode) for path, method, modes in OPERATIONS for mode in modes],
    ids=lambda value: str(value),
)
def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    fuzz_app: Flask, issuer: Issuer, path: str, method: str, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app)
    if path not in schema:
        pytest.skip(f"this app does not serve {path}")
    operation = schema[path][method]

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def exercise(case: schemathesis.Case) -> None:
        # Each call gets its own JWT: its aud is the exact URL called and its jti is single-use.
        token = issuer.token(PUBLIC_URL + unquote(case.formatted_path))
        case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)

    exercise()


def junk() -> st.SearchStrategy[Any]:
    """Any JSON value: unicode (lone surrogates included), huge strings, NaN and deep nesting."""
    leaves = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=40)
        | st.sampled_from(["", "\x00", "\u202e", "\ud800", "😷" * 50, "Patient/", "../../etc", "x" * 100_000])
    )
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
        ),
        max_leaves=24,
    )


def nested(depth: int) -> Any:
    """Return a list nested ``depth`` levels deep."""
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


IDS = st.from_regex(r"\A[A-Za-z0-9\-\.]{1,64}\Z")
TEXT = st.text(max_size=30)
PATIENT = st.fixed_dictionaries(
    {"resourceType": st.just("Patient")},
    optional={
        "id": IDS,
        "name": st.lists(
            st.fixed_dictionaries({"family": TEXT}, optional={"given": st.lists(TEXT, max_size=2)})
        ),
        # Partial dates ("1970", "1970-06") are valid FHIR and once crashed a hook.
        "birthDate": st.dates().map(str)
        | st.integers(min_value=1900, max_value=2026).map(str)
        | st.dates().map(lambda d: d.isoformat()[:7]),
        "gender": st.sampled_from(["male", "female", "other", "unknown"]),
    },
)
CONDITION = st.fixed_dictionaries(
    {"resourceType": st.just("Condition"), "subject": st.just({"reference": "Patient/p1"})},
    optional={"code": st.fixed_dictionaries({"text": TEXT})},
)
CONCEPT = st.fixed_dictionaries(
    {},
    optional={
        "text": TEXT | st.sampled_from(["Amoxicillin 500 MG", "Penicillin", "PCN", "ASA"]),
        "coding": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "system": st.sampled_from(["http://www.nlm.nih.gov/research/umls/rxnorm", "urn:x"]),
                    "code": st.sampled_from(["723", "7980", "308182", "x"]) | TEXT,
                    "display": TEXT,
                },
            ),
            max_size=2,
        ),
    },
)
MEDICATION_REQUEST = st.fixed_dictionaries(
    {"resourceType": st.just("MedicationRequest"), "id": IDS},
    optional={
        "status": st.sampled_from(["draft", "active", "stopped"]),
        "medicationCodeableConcept": CONCEPT,
        "medicationReference": st.fixed_dictionaries(
            {"reference": st.sampled_from(["#m", "Medication/m", "x"])}
        ),
        "authoredOn": st.sampled_from(["2024", "2024-03", "2024-03-05T10:00:00", "junk"]),
    },
)
ALLERGY = st.fixed_dictionaries(
    {"resourceType": st.just("AllergyIntolerance")},
    optional={
        "id": IDS,
        "code": CONCEPT,
        "criticality": st.sampled_from(["high", "low", "unable-to-assess"]),
        "reaction": st.lists(st.fixed_dictionaries({}, optional={"substance": CONCEPT}), max_size=2),
    },
)
BUNDLE = st.fixed_dictionaries(
    {"resourceType": st.just("Bundle")},
    optional={
        "type": st.sampled_from(["searchset", "collection"]),
        "entry": st.lists(
            st.fixed_dictionaries({"resource": PATIENT | CONDITION | MEDICATION_REQUEST | ALLERGY}),
            max_size=3,
        ),
    },
)
HOOKS = {
    "/cds-services/patient-summary": "patient-view",
    "/cds-services/imaging-report-draft": "patient-view",
    "/cds-services/order-review": "order-select",
    "/cds-services/order-sign-review": "order-sign",
}
PREFETCH_KEYS = ["patient", "conditions", "medications", "allergies", "observations"]
# Where a plausible body gets broken: each path is replaced by junk or deleted.
WEAK_SPOTS = [
    ("hook",),
    ("hookInstance",),
    ("context",),
    ("context", "userId"),
    ("context", "patientId"),
    ("context", "encounterId"),
    ("context", "selections"),
    ("context", "draftOrders"),
    ("context", "draftOrders", "entry"),
    ("prefetch",),
    *(("prefetch", key) for key in PREFETCH_KEYS),
    ("prefetch", "patient", "name"),
    ("prefetch", "conditions", "entry"),
    ("fhirServer",),
    ("fhirAuthorization",),
    ("fhirAuthorization", "access_token"),
    ("fhirAuthorization", "expires_in"),
    ("extension",),
]
DELETE = object()


@st.composite
def hook_calls(draw: st.DrawFn) -> tuple[str, Any]:
    """Return a service path and a hook body: plausible for that service, then broken in a few places."""
    path = draw(st.sampled_from(sorted(HOOKS)))
    context: dict[str, Any] = {"userId": f"Practitioner/{draw(IDS)}", "patientId": draw(IDS)}
    if HOOKS[path] in ("order-select", "order-sign"):
        context |= {"draftOrders": draw(BUNDLE)}
    if HOOKS[path] == "order-select":
        selections = st.sampled_from(["MedicationRequest/a", "MedicationRequest/b"]) | TEXT
        context |= {"selections": draw(st.lists(selections, min_size=1, max_size=2))}
    body: dict[str, Any] = {"hook": HOOKS[path], "hookInstance": str(draw(st.uuids())), "context": context}
    resources = st.none() | PATIENT | BUNDLE
    body["prefetch"] = {key: draw(resources) for key in draw(st.sets(st.sampled_from(PREFETCH_KEYS)))}
    if draw(st.booleans()):
        # Every fhirServer is refused by this app's guard, so none of these is ever connected to.
        body["fhirServer"] = draw(st.sampled_from(["https://fhir.example.org/r4", "http://127.0.0.1:9/fhir"]))
        body["fhirAuthorization"] = {
            "access_token": draw(TEXT),
            "token_type": "Bearer",
            "expires_in": draw(st.integers(min_value=0)),
            "scope": "patient/*.read",
            "subject": draw(TEXT),
        }
    for spot in draw(st.lists(st.sampled_from(WEAK_SPOTS), max_size=3, unique=True)):
        parent = body
        for name in spot[:-1]:
            parent = parent.get(name) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            value = draw(st.just(DELETE) | junk())
            if value is DELETE:
                parent.pop(spot[-1], None)
            else:
                parent[spot[-1]] = value
    return path, body


BODY = st.one_of(
    junk(),
    st.integers(min_value=65, max_value=400).map(lambda depth: {"context": nested(depth)}),
)


def assert_well_formed_answer(response: Any, accepted: dict[str, Any] | None = None) -> None:
    """Fail on a 5xx, or on an answer that isn't a 200, an error body, or a 412 OperationOutcome.

    A 200 must carry cards, or equal ``accepted`` where that is given (feedback answers ``{}``).
    """
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    assert response.is_json, response.mimetype
    body = response.json
    if response.status_code == 200:
        assert body == accepted if accepted is not None else isinstance(body.get("cards"), list)
    elif response.status_code == 412:
        assert body["resourceType"] == "OperationOutcome" and body["issue"]
    else:
        assert 400 <= response.status_code < 500
        assert isinstance(body["error"], str) and isinstance(body["message"], str)


@pytest.fixture
def fuzz_client(fuzz_app: Flask) -> FlaskClient:
    """Test client of the fuzzing app."""
    return fuzz_app.test_client()


@hypothesis_settings(FUZZ, max_examples=150)
@given(call=hook_calls())
def test_hostile_hook_bodies_answer_4xx_json_never_5xx(
    fuzz_client: FlaskClient, issuer: Issuer, call: tuple[str, Any]
) -> None:
    path, body = call
    # allow_nan: a NaN or Infinity literal is what a hostile client would send; Python's parser accepts it.
    data = json.dumps(body, allow_nan=True)
    response = fuzz_client.post(
        path, data=data, content_type="application/json", headers=issuer.headers(path)
    )
    assert_well_formed_answer(response)


@FUZZ
@given(path=st.sampled_from(SERVICES), body=BODY)
def test_junk_json_answers_4xx_json(fuzz_client: FlaskClient, issuer: Issuer, path: str, body: Any) -> None:
    data = json.dumps(body, allow_nan=True)
    response = fuzz_client.post(
        path, data=data, content_type="application/json", headers=issuer.headers(path)
    )
    assert_well_formed_answer(response)


@hypothesis_settings(FUZZ, max_examples=40)
@given(path=st.sampled_from(SERVICES), raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_bytes_that_are_not_json_answer_4xx(
    fuzz_client: FlaskClient, issuer: Issuer, path: str, raw: bytes
) -> None:
    response = fuzz_client.post(path, data=raw, content_type="application/json", headers=issuer.headers(path))
    assert_well_formed_answer(response)


def test_feedback_with_hostile_items_answers_4xx(fuzz_client: FlaskClient, issuer: Issuer) -> None:
    path = "/cds-services/patient-summary/feedback"

    @FUZZ
    @given(feedback=st.lists(junk(), max_size=3) | junk())
    def exercise(feedback: Any) -> None:
        data = json.dumps({"feedback": feedback, "id": str(uuid.uuid4())}, allow_nan=True)
        response = fuzz_client.post(
            path, data=data, content_type="application/json", headers=issuer.headers(path)
        )
        assert_well_formed_answer(response, accepted={})

    exercise()


def test_prefetch_of_another_resource_type(fuzz_client: FlaskClient, issuer: Issuer, hook_body) -> None:
    # Found by the fuzzing above: a valid Bundle sent as the "patient" read crashed the handler. A one-match
    # search Bundle is read as its Patient, a bare resource as a one-entry search; anything else for a
    # required key is data the service can't have (412), never a crash.
    path = "/cds-services/patient-summary"
    empty = {"resourceType": "Bundle", "type": "searchset"}
    patient = {"resourceType": "Patient", "id": "p1", "gender": "female"}
    prefetch = {"patient": empty, "conditions": empty, "medications": empty, "allergies": empty}
    response = fuzz_client.post(
        path, json=hook_body("patient-view", "p1", prefetch=prefetch), headers=issuer.headers(path)
    )
    assert response.status_code == 412
    assert "expected a Patient, got a Bundle" in response.json["issue"][0]["diagnostics"]
    allergy = {"resourceType": "AllergyIntolerance", "id": "a1", "code": {"text": "Penicillin"}}
    prefetch |= {"patient": empty | {"entry": [{"resource": patient}]}, "allergies": allergy}
    response = fuzz_client.post(
        path, json=hook_body("patient-view", "p1", prefetch=prefetch), headers=issuer.headers(path)
    )
    assert response.status_code == 200, response.json
    assert response.json["cards"][0]["summary"] == "0 active problems, 0 active medications, 1 allergy"


def test_nul_in_feedback_is_400(fuzz_client: FlaskClient, issuer: Issuer) -> None:
    # Found by schemathesis: a NUL character in a feedback string reached PostgreSQL and answered 500.
    path = "/cds-services/patient-summary/feedback"
    item = {"card": "card\x00", "outcome": "accepted", "outcomeTimestamp": "2026-11-27T10:00:00Z"}
    response = fuzz_client.post(path, json={"feedback": [item]}, headers=issuer.headers(path))
    assert response.status_code == 400
