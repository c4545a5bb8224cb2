"""SMART App Launch 2.0 for the review app: discovery, authorization code with PKCE, the id_token, FHIR reads.

The OAuth 2.0 client is authlib's (PKCE S256, ``state``, ``nonce``, the code exchange); reads of the
clinician and the patient go through fhirclient. What neither does is done here: discovery through
``{iss}/.well-known/smart-configuration`` (fhirclient reads ``/metadata``), and verifying the id_token
(fhirclient does not; the SMART launcher signs it without a ``kid``) with joserfc against the server's JWKS.
"""

from __future__ import annotations

import json
import secrets
import time
import warnings
from typing import Any

import httpx
from authlib.common.security import generate_token
from authlib.deprecate import AuthlibDeprecationWarning
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from fhirclient.models.patient import Patient
from fhirclient.models.practitioner import Practitioner
from fhirclient.models.practitionerrole import PractitionerRole
from fhirclient.server import FHIRServer
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field

# authlib's client prefers httpx2 and, without it, warns at import that it falls back to httpx: the project's
# HTTP client, which is what we want it to use. That warning would greet every `serve`, so it is muted here.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "The httpx module is deprecated", AuthlibDeprecationWarning)
    from authlib.integrations.httpx_client import OAuth2Client

#: What the app reads and writes, in SMART v2 scopes, and the v1 names for servers that speak only v1.
READ_WRITE_SCOPES_V2 = [
    "patient/Patient.rs",
    "patient/DiagnosticReport.rs",
    "patient/DiagnosticReport.cu",
    "patient/Provenance.c",
    "user/Practitioner.rs",
    "user/PractitionerRole.rs",
]
READ_WRITE_SCOPES_V1 = [
    "patient/Patient.read",
    "patient/DiagnosticReport.read",
    "patient/DiagnosticReport.write",
    "patient/Provenance.write",
    "user/Practitioner.read",
    "user/PractitionerRole.read",
]
#: Roles that may sign: SMART's fhirUser names the user's resource (SMART App Launch §fhirUser).
SIGNING_ROLES = ("Practitioner", "PractitionerRole")
CLOCK_SKEW_S = 60


class SmartError(Exception):
    """The launch can't go on; the message says why, for the page a clinician sees (no token in it)."""


class SmartConfiguration(BaseModel):
    """``{iss}/.well-known/smart-configuration`` (SMART App Launch 2.0 §Conformance), what the app uses."""

    model_config = ConfigDict(extra="ignore")

    issuer: str | None = None
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str | None = None
    capabilities: list[str] = Field(default_factory=list)
    code_challenge_methods_supported: list[str] = Field(default_factory=list)


class TokenAnswer(BaseModel):
    """The token response (SMART App Launch §Access token response) as far as the app reads it."""

    model_config = ConfigDict(extra="ignore")

    access_token: str
    token_type: str
    expires_in: int | None = None
    scope: str = ""
    id_token: str | None = None
    patient: str | None = None
    encounter: str | None = None
    # appContext from a CDS card, where the EHR passes it on (the SMART launcher doesn't).
    appContext: str | dict[str, Any] | None = None


def discover(http: httpx.Client, iss: str) -> SmartConfiguration:
    """Return the server's SMART configuration; SmartError when it has none the app can use."""
    try:
        answer = http.get(
            f"{iss.rstrip('/')}/.well-known/smart-configuration", headers={"Accept": "application/json"}
        )
    except httpx.HTTPError:
        raise SmartError("the EHR's FHIR server could not be reached") from None
    if answer.status_code != 200:
        raise SmartError(f"the EHR's FHIR server has no SMART configuration ({answer.status_code})")
    try:
        return SmartConfiguration.model_validate(answer.json())
    except ValueError:
        raise SmartError("the EHR's SMART configuration is not usable") from None


def requested_scope(config: SmartConfiguration, ehr_launch: bool) -> str:
    """Return the scopes to ask for: v2 names unless the server says it speaks only v1."""
    v1_only = "permission-v1" in config.capabilities and "permission-v2" not in config.capabilities
    context = "launch" if ehr_launch else "launch/patient"
    return " ".join(
        [context, "openid", "fhirUser", *(READ_WRITE_SCOPES_V1 if v1_only else READ_WRITE_SCOPES_V2)]
    )


def oauth_client(client_id: str, client_secret: str | None, redirect_uri: str, scope: str) -> OAuth2Client:
    """Return authlib's OAuth 2.0 client: public with PKCE, or confidential (client_secret_basic)."""
    return OAuth2Client(
        client_id=client_id,
        client_secret=client_secret,
        token_endpoint_auth_method="client_secret_basic" if client_secret else "none",
        redirect_uri=redirect_uri,
        scope=scope,
        code_challenge_method="S256",
        timeout=10,
    )


def authorization_request(
    client: OAuth2Client, config: SmartConfiguration, iss: str, launch: str | None
) -> tuple[str, dict[str, str]]:
    """Return the authorize URL and the secrets to keep until the callback (state, nonce, code verifier)."""
    if config.code_challenge_methods_supported and "S256" not in config.code_challenge_methods_supported:
        raise SmartError("the EHR does not support PKCE with S256")
    pending = {"state": generate_token(32), "nonce": generate_token(32), "code_verifier": generate_token(64)}
    extra = {"aud": iss, "nonce": pending["nonce"]}
    if launch:
        extra["launch"] = launch
    url, _ = client.create_authorization_url(
        config.authorization_endpoint,
        state=pending["state"],
        code_verifier=pending["code_verifier"],
        **extra,
    )
    # authlib derives the challenge from the verifier; checked here so a library change can't drop PKCE.
    if f"code_challenge={create_s256_code_challenge(pending['code_verifier'])}" not in url:
        raise SmartError("could not build a PKCE authorization request")
    return url, pending


def exchange_code(
    client: OAuth2Client, config: SmartConfiguration, code: str, code_verifier: str
) -> TokenAnswer:
    """Redeem the authorization code (with the PKCE verifier); SmartError when the server refuses."""
    try:
        token = client.fetch_token(config.token_endpoint, code=code, code_verifier=code_verifier)
    except Exception as exc:  # noqa: BLE001 - authlib raises OAuthError, httpx errors, or JSON errors
        raise SmartError(f"the EHR did not exchange the authorization code ({type(exc).__name__})") from None
    try:
        return TokenAnswer.model_validate(dict(token))
    except ValueError:
        raise SmartError("the EHR's token response is not usable") from None


def verify_id_token(
    http: httpx.Client, config: SmartConfiguration, id_token: str, *, iss: str, client_id: str, nonce: str
) -> dict[str, Any]:
    """Return the id_token's claims once its signature, ``iss``, ``aud``, ``exp`` and ``nonce`` check out.

    The signature is checked against the server's JWKS; a token without ``kid`` (the SMART launcher's) is
    tried against each key. ``iss`` is the OpenID issuer the configuration names, else the FHIR base.
    """
    if not config.jwks_uri:
        raise SmartError("the EHR publishes no key set to verify the id_token with")
    try:
        keys = KeySet.import_key_set(http.get(config.jwks_uri).json())
    except (httpx.HTTPError, ValueError, JoseError):
        raise SmartError("the EHR's key set could not be read") from None
    token = None
    for key in keys.keys:
        try:
            token = jwt.decode(id_token, key, algorithms=["RS256", "RS384", "ES256", "ES384", "PS256"])
            break
        except (JoseError, ValueError):
            continue
    if token is None:
        raise SmartError("the id_token's signature does not verify")
    claims = token.claims
    expected_issuer = (config.issuer or iss).rstrip("/")
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    now = time.time()
    if str(claims.get("iss", "")).rstrip("/") != expected_issuer:
        raise SmartError("the id_token was issued by someone else")
    if client_id not in audiences:
        raise SmartError("the id_token is for another app")
    if not isinstance(claims.get("exp"), int | float) or claims["exp"] < now - CLOCK_SKEW_S:
        raise SmartError("the id_token has expired")
    if not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
        raise SmartError("the id_token does not answer this login (nonce)")
    return claims


def draft_from_app_context(app_context: str | dict[str, Any] | None) -> str | None:
    """Return the draft id an appContext names (``{"draftId": ...}``), or None."""
    if isinstance(app_context, str):
        try:
            app_context = json.loads(app_context)
        except ValueError:
            return None
    draft = app_context.get("draftId") if isinstance(app_context, dict) else None
    return draft if isinstance(draft, str) and draft.isalnum() else None


def fhir_server(iss: str, access_token: str) -> FHIRServer:
    """Return fhirclient's server for the EHR, signing requests with the clinician's access token."""
    # fhirclient joins paths onto the base with urljoin: without the trailing slash "/fhir" would be lost.
    base = iss.rstrip("/") + "/"
    return FHIRServer(
        None, state={"base_uri": base, "auth_type": "oauth2", "auth": {"access_token": access_token}}
    )


def user_name(server: FHIRServer, fhir_user: str) -> str:
    """Return the display name of the signing user (Practitioner, or PractitionerRole's practitioner)."""
    kind, _, user_id = fhir_user.partition("/")
    try:
        if kind == "PractitionerRole":
            role = PractitionerRole.read(user_id, server)
            if role.practitioner is None or not role.practitioner.reference:
                return fhir_user
            kind, _, user_id = role.practitioner.reference.partition("/")
        practitioner = Practitioner.read(user_id, server)
    except Exception:  # noqa: BLE001 - fhirclient raises requests and HTTP errors; the reference stands
        return fhir_user
    return human_name(practitioner.name) or fhir_user


def patient_banner(server: FHIRServer, patient_id: str) -> tuple[str, str]:
    """Return the patient's name and birth date for the page's banner ("" where unknown)."""
    try:
        patient = Patient.read(patient_id, server)
    except Exception:  # noqa: BLE001 - fhirclient raises requests and HTTP errors
        return "", ""
    birth = patient.birthDate.isostring if patient.birthDate is not None else ""
    return human_name(patient.name), birth or ""


def human_name(names: list[Any] | None) -> str:
    """Return a FHIR HumanName list as one display string."""
    for name in names or []:
        if name.text:
            return str(name.text)
        parts = [*(name.prefix or []), *(name.given or []), name.family or ""]
        text = " ".join(part for part in parts if part)
        if text:
            return text
    return ""
