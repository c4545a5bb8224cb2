"""The SMART test server driven by httpx alone: discovery, EHR and standalone launch, PKCE, id_token, FHIR."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import httpx
import pytest
from fhirclient import client
from fhirclient.models.patient import Patient
from joserfc import jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import KeySet
from smart_server import CONFIDENTIAL_CLIENT_ID
from smart_server import CONFIDENTIAL_CLIENT_SECRET
from smart_server import SmartServer
from smart_server import scope_permits
from smart_server import smart_server  # noqa: F401
from support import FhirServer

REDIRECT_URI = "http://127.0.0.1:9/app/callback"
PRACTITIONER = "Practitioner/smart-test-practitioner"


@pytest.fixture
def smart(smart_server: SmartServer) -> Iterator[SmartServer]:  # noqa: F811
    """The session's SMART server, reset so no launch, token or tamper leaks between tests."""
    smart_server.reset()
    yield smart_server
    smart_server.reset()


@pytest.fixture
def patient_id(fhir_server: FhirServer) -> str:
    """The id of one sample patient."""
    return sorted(fhir_server.patients.values())[0]


def authorize(smart: SmartServer, scope: str, **params: str) -> tuple[httpx.Response, str]:
    """Send the browser's authorization request (PKCE S256); return the answer and the code verifier."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    query = {
        "response_type": "code",
        "client_id": smart.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": scope,
        "state": "state-1",
        "aud": smart.iss,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    return httpx.get(f"{smart.base_url}/authorize", params=query | params), verifier


def redirected(response: httpx.Response) -> dict[str, str]:
    """Return the query parameters of a redirect back to the app."""
    assert response.status_code == 302, response.text
    location = response.headers["Location"]
    assert location.startswith(REDIRECT_URI + "?")
    return {name: values[0] for name, values in parse_qs(urlsplit(location).query).items()}


def redeem(
    smart: SmartServer, code: str, verifier: str | None, auth: tuple[str, str] | None = None
) -> httpx.Response:
    """Exchange a code at the token endpoint: as the public client, or as ``auth`` (HTTP Basic)."""
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI}
    if auth is None:
        form["client_id"] = smart.client_id
    if verifier is not None:
        form["code_verifier"] = verifier
    return httpx.post(f"{smart.base_url}/token", data=form, auth=auth)


def launch_token(smart: SmartServer, scope: str, **params: str) -> dict[str, Any]:
    """Run authorize and token for a scope; return the token response."""
    response, verifier = authorize(smart, scope, **params)
    answer = redeem(smart, redirected(response)["code"], verifier)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def id_token_claims(smart: SmartServer, id_token: str) -> dict[str, Any]:
    """Verify an id_token against the published JWKS, as an app must; return its claims."""
    keys = KeySet.import_key_set(httpx.get(smart.smart_configuration()["jwks_uri"]).json())
    token = jwt.decode(id_token, keys, algorithms=["RS256"])
    assert "kid" not in token.header
    return dict(token.claims)


def test_discovery_publishes_endpoints_and_capabilities(smart: SmartServer) -> None:
    configuration = httpx.get(f"{smart.iss}/.well-known/smart-configuration").json()
    assert configuration["code_challenge_methods_supported"] == ["S256"]
    assert {"launch-ehr", "sso-openid-connect", "permission-v2"} <= set(configuration["capabilities"])
    assert {"openid", "fhirUser", "launch/patient", "patient/*.rs"} <= set(configuration["scopes_supported"])
    # /metadata is open (clients read it before they have a token) and names the OAuth endpoints.
    statement = httpx.get(f"{smart.iss}/metadata").json()
    (oauth_uris,) = statement["rest"][0]["security"]["extension"]
    endpoints = {uri["url"]: uri["valueUri"] for uri in oauth_uris["extension"]}
    assert endpoints == {
        "authorize": configuration["authorization_endpoint"],
        "token": configuration["token_endpoint"],
    }


def test_ehr_launch_issues_tokens_for_the_launch_context(smart: SmartServer, patient_id: str) -> None:
    launch = smart.mint_launch(patient_id, PRACTITIONER)
    response, verifier = authorize(smart, "launch openid fhirUser patient/*.rs", launch=launch, nonce="n-1")
    parameters = redirected(response)
    assert parameters["state"] == "state-1"
    answer = redeem(smart, parameters["code"], verifier).json()
    assert answer["token_type"] == "Bearer" and answer["expires_in"] == 3600
    assert answer["patient"] == patient_id and answer["scope"] == "launch openid fhirUser patient/*.rs"
    claims = id_token_claims(smart, answer["id_token"])
    assert claims["iss"] == smart.iss and claims["aud"] == smart.client_id and claims["nonce"] == "n-1"
    assert claims["fhirUser"] == PRACTITIONER and claims["exp"] > time.time() >= claims["iat"] - 5
    assert smart.issued_tokens[-1].access_token == answer["access_token"]


def test_codes_redeem_twice_like_the_smart_launcher(smart: SmartServer, patient_id: str) -> None:
    response, verifier = authorize(
        smart, "launch patient/*.rs", launch=smart.mint_launch(patient_id, PRACTITIONER)
    )
    code = redirected(response)["code"]
    first, second = redeem(smart, code, verifier), redeem(smart, code, verifier)
    assert first.status_code == second.status_code == 200
    assert first.json()["access_token"] != second.json()["access_token"]
    assert redeem(smart, code, "x" * 43).json()["error"] == "invalid_grant"  # the verifier still counts


def test_standalone_launch_uses_the_configured_user_and_patient(smart: SmartServer, patient_id: str) -> None:
    smart.set_user(f"Patient/{patient_id}", patient_id)
    answer = launch_token(smart, "launch/patient openid fhirUser patient/*.rs")
    assert answer["patient"] == patient_id
    assert id_token_claims(smart, answer["id_token"])["fhirUser"] == f"Patient/{patient_id}"
    assert "nonce" not in id_token_claims(smart, answer["id_token"])
    assert "patient" not in launch_token(smart, "openid fhirUser user/*.rs")


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"aud": "http://127.0.0.1:1/fhir"}, "invalid_request"),
        ({"launch": "never-minted"}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": ""}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
    ],
)
def test_bad_authorization_requests_redirect_with_an_error(
    smart: SmartServer, params: dict[str, str], error: str
) -> None:
    """RFC 6749 §4.1.2.1: with a valid client and redirect_uri the error goes back to the app, with state."""
    parameters = redirected(authorize(smart, "launch/patient patient/*.rs", **params)[0])
    assert parameters["error"] == error and parameters["state"] == "state-1" and "code" not in parameters


@pytest.mark.parametrize("params", [{"client_id": "stranger"}, {"redirect_uri": "http://evil.test/cb"}])
def test_unknown_client_or_redirect_uri_is_never_redirected_to(
    smart: SmartServer, params: dict[str, str]
) -> None:
    response, _ = authorize(smart, "launch/patient patient/*.rs", **params)
    assert response.status_code == 400 and "Location" not in response.headers


def test_token_endpoint_checks_pkce_and_client_authentication(smart: SmartServer) -> None:
    response, verifier = authorize(smart, "launch/patient patient/*.rs")
    code = redirected(response)["code"]
    assert redeem(smart, code, secrets.token_urlsafe(48)).json()["error"] == "invalid_grant"
    assert redeem(smart, code, None).json()["error"] == "invalid_request"
    # The confidential client authenticates with HTTP Basic; a wrong secret is a 401.
    response, verifier = authorize(smart, "launch/patient patient/*.rs", client_id=CONFIDENTIAL_CLIENT_ID)
    code = redirected(response)["code"]
    assert redeem(smart, code, verifier, auth=(CONFIDENTIAL_CLIENT_ID, "wrong")).status_code == 401
    granted = redeem(smart, code, verifier, auth=(CONFIDENTIAL_CLIENT_ID, CONFIDENTIAL_CLIENT_SECRET))
    assert granted.status_code == 200 and granted.json()["patient"]


@pytest.mark.parametrize(
    ("tamper", "claim", "value"),
    [
        ({"aud": "someone-else"}, "aud", "someone-else"),
        ({"iss": "https://elsewhere.test/fhir"}, "iss", "https://elsewhere.test/fhir"),
        ({"nonce": "wrong"}, "nonce", "wrong"),
        ({"drop_nonce": True}, "nonce", None),
        ({"exp": 1_000_000}, "exp", 1_000_000),
    ],
)
def test_tamper_spoils_the_next_id_token_once(
    smart: SmartServer, tamper: dict[str, Any], claim: str, value: object
) -> None:
    smart.tamper(**tamper)
    spoiled = launch_token(smart, "launch/patient openid fhirUser patient/*.rs", nonce="n-1")
    assert id_token_claims(smart, spoiled["id_token"]).get(claim) == value
    sound = id_token_claims(smart, launch_token(smart, "openid fhirUser", nonce="n-1")["id_token"])
    assert sound["aud"] == smart.client_id and sound["iss"] == smart.iss and sound["nonce"] == "n-1"


def test_tamper_foreign_key_fails_verification(smart: SmartServer) -> None:
    smart.tamper(foreign_key=True)
    spoiled = launch_token(smart, "openid fhirUser")["id_token"]
    with pytest.raises(BadSignatureError):
        id_token_claims(smart, spoiled)


def test_fhir_proxy_requires_a_token_and_records_who_called(smart: SmartServer, patient_id: str) -> None:
    token = launch_token(smart, "launch/patient patient/*.rs")["access_token"]
    read = httpx.get(f"{smart.iss}/Patient/{patient_id}", headers={"Authorization": f"Bearer {token}"})
    assert read.status_code == 200 and read.json()["id"] == patient_id
    search = httpx.get(f"{smart.iss}/Patient?_count=50", headers={"Authorization": f"Bearer {token}"}).json()
    assert all(entry["fullUrl"].startswith(smart.iss + "/") for entry in search["entry"])
    assert httpx.get(f"{smart.iss}/Patient/{patient_id}").status_code == 401
    assert httpx.get(f"{smart.iss}/Patient", headers={"Authorization": "Bearer forged"}).status_code == 401
    seen = [(r.method, r.path, r.query, r.token, r.status) for r in smart.requests]
    assert seen == [
        ("GET", f"Patient/{patient_id}", "", token, 200),
        ("GET", "Patient", "_count=50", token, 200),
        ("GET", f"Patient/{patient_id}", "", None, 401),
        ("GET", "Patient", "", "forged", 401),
    ]


def test_fhir_proxy_enforces_write_scopes(smart: SmartServer) -> None:
    basic = {"resourceType": "Basic", "code": {"text": "smart-server test"}}
    reader = launch_token(smart, "launch/patient patient/*.rs")["access_token"]
    writer = launch_token(smart, "user/Basic.cud")["access_token"]
    refused = httpx.post(f"{smart.iss}/Basic", json=basic, headers={"Authorization": f"Bearer {reader}"})
    assert refused.status_code == 403
    created = httpx.post(f"{smart.iss}/Basic", json=basic, headers={"Authorization": f"Bearer {writer}"})
    assert created.status_code == 201 and created.headers["Location"].startswith(f"{smart.iss}/Basic/")
    basic_id = created.json()["id"]
    assert (
        httpx.get(f"{smart.iss}/Basic/{basic_id}", headers={"Authorization": f"Bearer {writer}"}).status_code
        == 403
    )
    deleted = httpx.delete(f"{smart.iss}/Basic/{basic_id}", headers={"Authorization": f"Bearer {writer}"})
    assert deleted.status_code in (200, 204)
    assert [(r.method, r.token, r.status) for r in smart.requests][:2] == [
        ("POST", reader, 403),
        ("POST", writer, 201),
    ]


@pytest.mark.parametrize(
    ("scope", "resource_type", "interaction", "allowed"),
    [
        ("patient/DiagnosticReport.cu", "DiagnosticReport", "c", True),
        ("user/DiagnosticReport.write", "DiagnosticReport", "c", True),
        ("patient/*.*", "DiagnosticReport", "u", True),
        ("patient/*.rs", "DiagnosticReport", "c", False),
        ("patient/*.read", "Observation", "s", True),
        ("patient/Observation.rs", "DiagnosticReport", "r", False),
        ("patient/Observation.rs?category=laboratory", "Observation", "s", True),
        ("patient/*.sr", "Observation", "r", False),  # v2 letters must come in the order c r u d s
        ("launch/patient", "Patient", "r", False),
        ("user/*.cruds", "*", "c", True),
    ],
)
def test_scope_permits_v1_and_v2_scopes(
    scope: str, resource_type: str, interaction: str, allowed: bool
) -> None:
    assert scope_permits(scope, resource_type, interaction) is allowed


def test_fhirclient_completes_an_ehr_launch(smart: SmartServer, patient_id: str) -> None:
    """fhirclient finds the endpoints in /metadata, as the review app does, and reads through the proxy."""
    settings = {"app_id": smart.client_id, "api_base": smart.iss, "redirect_uri": REDIRECT_URI}
    settings |= {
        "scope": "openid fhirUser patient/*.rs",
        "launch_token": smart.mint_launch(patient_id, PRACTITIONER),
    }
    fhir = client.FHIRClient(settings=settings)
    fhir.handle_callback(httpx.get(fhir.authorize_url).headers["Location"])
    assert fhir.patient_id == patient_id
    assert Patient.read(patient_id, fhir.server).id == patient_id
    assert smart.requests[-1].token == smart.issued_tokens[-1].access_token
