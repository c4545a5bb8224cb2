"""A SMART on FHIR authorization server (authlib) in front of the test FHIR server, for tests of SMART apps.

It behaves like the SMART launcher measured in ``shared/notes-smart-launcher.md`` where an app could notice:
auto-approval as the launch's user, an RS256 id_token whose header has no ``kid``, and authorization codes
that can be redeemed twice (an app must refuse replay itself). Unlike that launcher, its FHIR proxy at
``{base}/fhir`` demands one of its access tokens and checks SMART v1/v2 scopes, so a test can see which
token reached the FHIR server on each request (``requests``). Everything lives in memory until ``reset()``.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.integrations.flask_oauth2 import ResourceProtector
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import ClientMixin
from authlib.oauth2.rfc6749 import InvalidRequestError
from authlib.oauth2.rfc6749 import TokenMixin
from authlib.oauth2.rfc6749 import scope_to_list
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant
from authlib.oauth2.rfc6750 import BearerTokenValidator
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oidc.core import AuthorizationCodeMixin
from authlib.oidc.core import UserInfo
from authlib.oidc.core.grants import OpenIDCode
from flask import Flask
from flask import Response
from flask import request
from joserfc.jwk import RSAKey
from support import FhirServer
from werkzeug.serving import make_server

DEFAULT_CLIENT_ID = "medgemma-cds"
DEFAULT_USER = "Practitioner/COREPRACTITIONER1"
CONFIDENTIAL_CLIENT_ID = "medgemma-cds-confidential"
CONFIDENTIAL_CLIENT_SECRET = "smart-test-client-secret"
# SMART App Launch 2.2 §Scopes: v1 ``read``/``write``/``*``, v2 letters in the order c r u d s.
_SCOPE = re.compile(r"(patient|user|system)/(\*|[A-Z][A-Za-z]*)\.(read|write|\*|c?r?u?d?s?)(\?.*)?")
_V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}
_FORWARDED_HEADERS = ("Accept", "Content-Type", "Prefer", "If-Match", "If-None-Match", "If-None-Exist")
_RETURNED_HEADERS = ("Content-Type", "Location", "Content-Location", "ETag", "Last-Modified")
SECURITY_SERVICE_SYSTEM = "http://terminology.hl7.org/CodeSystem/restful-security-service"
OAUTH_URIS_URL = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
SCOPES_SUPPORTED = [
    *("openid", "fhirUser", "profile", "launch", "launch/patient", "offline_access"),
    *("patient/*.rs", "patient/*.cu", "patient/*.*", "user/*.rs", "user/*.cu", "user/*.*"),
]
CAPABILITIES = [
    *("launch-ehr", "launch-standalone", "client-public", "client-confidential-symmetric"),
    *("sso-openid-connect", "context-ehr-patient", "context-standalone-patient"),
    *("permission-v1", "permission-v2", "permission-patient", "permission-user"),
]


@dataclass(frozen=True)
class LaunchContext:
    """The end user authlib sees: who approved (``fhir_user``) and the patient in context, if any."""

    fhir_user: str
    patient: str | None


@dataclass(frozen=True)
class Client(ClientMixin):
    """A registered client: public (no secret, auth ``none``) or confidential (``client_secret_basic``)."""

    client_id: str
    secret: str | None
    redirect_uri_prefix: str

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        return None

    def get_allowed_scope(self, scope: str | None) -> str:
        return scope or ""

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri.startswith(self.redirect_uri_prefix)

    def check_client_secret(self, client_secret: str) -> bool:
        return self.secret is not None and secrets.compare_digest(client_secret, self.secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == ("none" if self.secret is None else "client_secret_basic")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


@dataclass(frozen=True)
class AuthorizationCode(AuthorizationCodeMixin):
    """An issued code with what the token request is checked against and what the id_token carries."""

    client_id: str
    redirect_uri: str
    scope: str
    user: LaunchContext
    nonce: str | None
    code_challenge: str
    code_challenge_method: str
    auth_time: int

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time


@dataclass(frozen=True)
class IssuedToken(TokenMixin):
    """An access token this server issued, with its scope and launch context."""

    access_token: str
    client_id: str
    scope: str
    user: LaunchContext
    issued_at: int
    expires_in: int

    def get_scope(self) -> str:
        return self.scope

    def is_expired(self) -> bool:
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return False


@dataclass(frozen=True)
class FhirRequest:
    """One request the FHIR proxy answered; ``path`` is relative to ``iss`` (``Patient/1``)."""

    method: str
    path: str
    query: str
    token: str | None
    status: int


def scope_permits(scope: str, resource_type: str, interaction: str) -> bool:
    """Whether a SMART scope allows an interaction (v2 letter of ``cruds``) on a resource type (or ``*``)."""
    match = _SCOPE.fullmatch(scope)
    if match is None:
        return False
    _, scoped_type, permission, _ = match.groups()
    return scoped_type in ("*", resource_type) and interaction in _V1_PERMISSIONS.get(permission, permission)


def fhir_interaction(method: str, path: str) -> tuple[str, str]:
    """Return the resource type (``*`` at system level) and SMART v2 interaction letter of a FHIR request."""
    parts = [part for part in path.split("/") if part]
    resource_type = parts[0] if parts and parts[0][:1].isupper() else "*"
    if method in ("GET", "HEAD"):
        return resource_type, "r" if len(parts) > 1 and parts[1][:1] not in "_$" else "s"
    if method == "POST":
        return resource_type, "s" if parts[-1:] == ["_search"] else "c"
    return resource_type, "d" if method == "DELETE" else "u"


def transaction_permitted(scope: str, bundle: dict[str, Any]) -> bool:
    """Whether a scope allows every entry of a transaction or batch Bundle (create, update, delete, read)."""
    granted = scope_to_list(scope) or []
    for entry in bundle.get("entry") or []:
        method = (entry.get("request") or {}).get("method", "POST")
        resource_type, interaction = fhir_interaction(method, (entry.get("request") or {}).get("url", ""))
        if resource_type == "*":
            resource_type = (entry.get("resource") or {}).get("resourceType", "*")
        if not any(scope_permits(one, resource_type, interaction) for one in granted):
            return False
    return True


class _CodeGrant(AuthorizationCodeGrant):
    """The authorization code grant over the SMART server's in-memory codes, with SMART's launch rules."""

    TOKEN_ENDPOINT_AUTH_METHODS = ["none", "client_secret_basic"]

    def validate_authorization_request(self) -> str:
        """SMART App Launch §Launch: ``aud`` must be iss, and a ``launch`` must be one the test minted."""
        redirect_uri: str = super().validate_authorization_request()
        data = self.request.payload.data
        if data.get("aud") != self.server.smart.iss:
            message = f"'aud' must be the FHIR base URL {self.server.smart.iss}."
            raise InvalidRequestError(message, redirect_uri=redirect_uri)
        if data.get("launch") and data["launch"] not in self.server.smart.launches:
            raise InvalidRequestError("Unknown 'launch'.", redirect_uri=redirect_uri)
        return redirect_uri

    def create_token_response(self) -> tuple[int, dict[str, Any], Any]:
        """Add the SMART launch context (``patient``) to authlib's token response."""
        status, token, headers = super().create_token_response()
        if self.request.user.patient:
            token["patient"] = self.request.user.patient
        return status, token, headers

    def save_authorization_code(self, code: str, oauth_request: Any) -> None:
        data = oauth_request.payload.data
        self.server.smart.codes[code] = AuthorizationCode(
            client_id=oauth_request.client.get_client_id(),
            redirect_uri=oauth_request.payload.redirect_uri,
            scope=oauth_request.scope,
            user=oauth_request.user,
            nonce=data.get("nonce"),
            code_challenge=data["code_challenge"],
            code_challenge_method=data["code_challenge_method"],
            auth_time=int(time.time()),
        )

    def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
        found: AuthorizationCode | None = self.server.smart.codes.get(code)
        return found if found is not None and found.client_id == client.client_id else None

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        """Keep the code: the SMART launcher's codes redeem twice, so apps must refuse replay themselves."""

    def authenticate_user(self, authorization_code: AuthorizationCode) -> LaunchContext:
        return authorization_code.user


class _S256Required(CodeChallenge):
    """PKCE (RFC 7636) required on every authorization request, S256 only (``plain`` refused)."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant: _CodeGrant, redirect_uri: str | None) -> None:
        if grant.request.payload.data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("PKCE is required, with 'code_challenge_method=S256'.")
        super().validate_code_challenge(grant, redirect_uri)


class _SmartOpenIDCode(OpenIDCode):
    """OpenID Connect for the code grant: an RS256 id_token with ``fhirUser``; the one-shot tamper."""

    def __init__(self, smart: SmartServer) -> None:
        super().__init__(require_nonce=False)
        self.smart = smart

    def resolve_client_private_key(self, client: Client) -> RSAKey:
        return self.smart.foreign_key if self.smart.pending_tamper.get("foreign_key") else self.smart.key

    def get_client_algorithm(self, client: Client) -> str:
        return "RS256"

    def get_encode_header(self, client: Client) -> dict[str, str]:
        return {"alg": "RS256", "typ": "JWT"}  # no kid, as the SMART launcher signs (its JWKS key has one)

    def get_client_claims(self, client: Client) -> dict[str, Any]:
        return {"iss": self.smart.iss, "aud": client.get_client_id()}

    def exists_nonce(self, nonce: str, oauth_request: Any) -> bool:
        return False

    def get_authorization_code_claims(self, authorization_code: AuthorizationCode) -> dict[str, Any]:
        claims: dict[str, Any] = super().get_authorization_code_claims(authorization_code)
        if self.smart.pending_tamper.get("drop_nonce"):
            claims.pop("nonce", None)
        return claims

    def generate_user_info(self, user: LaunchContext, scope: str) -> UserInfo:
        # authlib merges these claims last, so the test's claim overrides win over iss, aud, exp and nonce.
        claims = {"sub": user.fhir_user, "fhirUser": user.fhir_user, "profile": user.fhir_user}
        return UserInfo(claims | self.smart.pending_tamper.get("claims", {}))

    def process_token(self, grant: _CodeGrant, response: Any) -> Any:
        try:
            return super().process_token(grant, response)
        finally:
            if "openid" in scope_to_list(grant.request.authorization_code.get_scope()):
                self.smart.pending_tamper = {}


class _SmartTokenValidator(BearerTokenValidator):
    """Bearer tokens (RFC 6750) of this server, each required scope a ``<type>.<interaction>`` pair."""

    def __init__(self, smart: SmartServer) -> None:
        super().__init__()
        self.smart = smart

    def authenticate_token(self, token_string: str) -> IssuedToken | None:
        return self.smart.tokens.get(token_string)

    def scope_insufficient(self, token_scopes: str, required_scopes: list[str] | None) -> bool:
        if not required_scopes:
            return False
        granted = scope_to_list(token_scopes) or []
        needed = [tuple(required.split(".")) for required in required_scopes]
        return not any(scope_permits(scope, *pair) for scope in granted for pair in needed)


class SmartServer:
    """A SMART on FHIR server on a loopback port: ``/authorize``, ``/token``, ``/jwks`` and ``/fhir`` (iss).

    Auto-approves as the launch's user (EHR launch) or ``user`` with ``patient`` (standalone launch).
    """

    def __init__(
        self,
        fhir: FhirServer,
        *,
        client_id: str = DEFAULT_CLIENT_ID,
        redirect_uri_prefix: str = "http://127.0.0.1:",
        user: str = DEFAULT_USER,
        patient: str | None = None,
    ) -> None:
        self.fhir = fhir
        self.client_id = client_id
        self._defaults = (redirect_uri_prefix, user, patient or sorted(fhir.patients.values())[0])
        self.key = RSAKey.generate_key(2048, parameters={"alg": "RS256", "use": "sig"}, auto_kid=True)
        self.foreign_key = RSAKey.generate_key(2048)
        self._http = httpx.Client(timeout=30)
        self._server = make_server("127.0.0.1", 0, self._create_app(), threaded=True)
        self.base_url = f"http://127.0.0.1:{self._server.server_port}"
        self.iss = f"{self.base_url}/fhir"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.reset()

    def reset(self) -> None:
        """Forget launches, codes, tokens, recorded requests and tampering; restore the default user."""
        self.redirect_uri_prefix, self.user, self.patient = self._defaults
        self.launches: dict[str, LaunchContext] = {}
        self.codes: dict[str, AuthorizationCode] = {}
        self.tokens: dict[str, IssuedToken] = {}
        self.issued_tokens: list[IssuedToken] = []
        self.requests: list[FhirRequest] = []
        self.pending_tamper: dict[str, Any] = {}

    def issue_token(self, patient_id: str, scope: str = "patient/*.rs") -> str:
        """Return an access token as the EHR issues one to a CDS service (``fhirAuthorization``)."""
        token = IssuedToken(
            access_token=secrets.token_urlsafe(32),
            client_id="cds-hooks-client",
            scope=scope,
            user=LaunchContext(fhir_user=self.user, patient=patient_id),
            issued_at=int(time.time()),
            expires_in=3600,
        )
        self.tokens[token.access_token] = token
        return token.access_token

    def mint_launch(self, patient_id: str, practitioner_ref: str) -> str:
        """Return a new opaque ``launch`` for an EHR launch of ``patient_id`` by ``practitioner_ref``."""
        launch = secrets.token_urlsafe(16)
        self.launches[launch] = LaunchContext(fhir_user=practitioner_ref, patient=patient_id)
        return launch

    def set_user(self, fhir_user: str, patient_id: str | None = None) -> None:
        """Set the user (``Practitioner/…`` or ``Patient/…``) and, if given, patient for standalone launch."""
        self.user = fhir_user
        self.patient = patient_id or self.patient

    def tamper(self, *, foreign_key: bool = False, drop_nonce: bool = False, **claims: Any) -> None:
        """Spoil the next id_token once: override claims (``aud=``, ``iss=``, ``nonce=``, ``exp=``), drop the
        nonce, or sign with a key that is not in the JWKS."""
        self.pending_tamper = {"foreign_key": foreign_key, "drop_nonce": drop_nonce, "claims": claims}

    def jwks(self) -> dict[str, Any]:
        """Return the public JWKS (RFC 7517) that verifies this server's id_tokens."""
        return {"keys": [self.key.as_dict(private=False)]}

    def smart_configuration(self) -> dict[str, Any]:
        """Return ``{iss}/.well-known/smart-configuration`` (SMART App Launch 2.2 §Conformance)."""
        return {
            "issuer": self.iss,
            "authorization_endpoint": f"{self.base_url}/authorize",
            "token_endpoint": f"{self.base_url}/token",
            "jwks_uri": f"{self.base_url}/jwks",
            "grant_types_supported": ["authorization_code"],
            "response_types_supported": ["code"],
            "token_endpoint_auth_methods_supported": ["none", "client_secret_basic"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": SCOPES_SUPPORTED,
            "capabilities": CAPABILITIES,
        }

    def start(self) -> SmartServer:
        """Serve in a daemon thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and the upstream client."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        self._http.close()

    def _query_client(self, client_id: str) -> Client | None:
        secret = {self.client_id: None, CONFIDENTIAL_CLIENT_ID: CONFIDENTIAL_CLIENT_SECRET}
        if client_id not in secret:
            return None
        return Client(client_id, secret[client_id], self.redirect_uri_prefix)

    def _save_token(self, token: dict[str, Any], oauth_request: Any) -> None:
        issued = IssuedToken(
            access_token=token["access_token"],
            client_id=oauth_request.client.get_client_id(),
            scope=token.get("scope", ""),
            user=oauth_request.user,
            issued_at=int(time.time()),
            expires_in=token["expires_in"],
        )
        self.tokens[issued.access_token] = issued
        self.issued_tokens.append(issued)

    def _end_user(self) -> LaunchContext | None:
        """The user to approve as: the launch's, or for a standalone launch the configured user."""
        if launch := request.args.get("launch"):
            return self.launches.get(launch)
        in_context = "launch/patient" in (scope_to_list(request.args.get("scope")) or [])
        return LaunchContext(fhir_user=self.user, patient=self.patient if in_context else None)

    def _create_app(self) -> Flask:
        app = Flask(__name__)
        app.config["OAUTH2_TOKEN_EXPIRES_IN"] = {"authorization_code": 3600}
        oauth = AuthorizationServer(app, query_client=self._query_client, save_token=self._save_token)
        oauth.smart = self
        oauth.register_grant(_CodeGrant, [_S256Required(), _SmartOpenIDCode(self)])
        protector = ResourceProtector()
        protector.register_token_validator(_SmartTokenValidator(self))

        @app.get("/authorize")
        def authorize() -> Response:
            user = self._end_user()
            try:
                grant = oauth.get_consent_grant(end_user=user)
            except OAuth2Error as error:
                # RFC 6749 §4.1.2.1: authlib redirects only once client and redirect_uri are known good.
                return oauth.handle_error_response(None, error)
            return oauth.create_authorization_response(grant_user=user, grant=grant)

        @app.post("/token")
        def token() -> Response:
            return oauth.create_token_response()

        @app.get("/jwks")
        def jwks() -> dict[str, Any]:
            return self.jwks()

        @app.get("/fhir/.well-known/smart-configuration")
        def smart_configuration() -> dict[str, Any]:
            return self.smart_configuration()

        @app.get("/fhir/metadata")
        def metadata() -> Response:
            # fhirclient finds the OAuth endpoints here (oauth-uris extension), before it has a token.
            statement = self._forward("metadata").get_json()
            endpoints = [
                {"url": "authorize", "valueUri": f"{self.base_url}/authorize"},
                {"url": "token", "valueUri": f"{self.base_url}/token"},
            ]
            statement["rest"][0]["security"] = {
                "service": [{"coding": [{"system": SECURITY_SERVICE_SYSTEM, "code": "SMART-on-FHIR"}]}],
                "extension": [{"url": OAUTH_URIS_URL, "extension": endpoints}],
            }
            return Response(json.dumps(statement), content_type="application/fhir+json")

        @app.route("/fhir", defaults={"path": ""}, methods=["GET", "POST"])
        @app.route("/fhir/<path:path>", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
        def fhir(path: str) -> Response:
            try:
                if request.method == "POST" and not path:
                    # A transaction or batch is judged entry by entry: each needs its own scope.
                    token = protector.acquire_token()
                    if not transaction_permitted(token.scope, request.get_json(silent=True) or {}):
                        return Response(
                            '{"error": "insufficient_scope"}', 403, content_type="application/json"
                        )
                else:
                    protector.acquire_token(".".join(fhir_interaction(request.method, path)))
            except OAuth2Error as error:
                protector.raise_error_response(error)
            return self._forward(path)

        @app.after_request
        def record(response: Response) -> Response:
            if request.path == "/fhir" or request.path.startswith("/fhir/"):
                scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
                self.requests.append(
                    FhirRequest(
                        method=request.method,
                        path=request.path.removeprefix("/fhir").lstrip("/"),
                        query=request.query_string.decode(),
                        token=credential if scheme.lower() == "bearer" else None,
                        status=response.status_code,
                    )
                )
            return response

        return app

    def _forward(self, path: str) -> Response:
        """Send the current request to the FHIR server with its own token; point URLs in the answer at iss."""
        headers = {name: request.headers[name] for name in _FORWARDED_HEADERS if name in request.headers}
        headers["Authorization"] = f"Bearer {self.fhir.token}"
        upstream = self._http.request(
            request.method,
            f"{self.fhir.base_url}/{path}",
            params=request.query_string.decode(),
            content=request.get_data(),
            headers=headers,
        )
        body = upstream.content.replace(self.fhir.base_url.encode(), self.iss.encode())
        returned = {name: upstream.headers[name] for name in _RETURNED_HEADERS if name in upstream.headers}
        returned = {name: value.replace(self.fhir.base_url, self.iss) for name, value in returned.items()}
        return Response(body, status=upstream.status_code, headers=returned)


@pytest.fixture(scope="session")
def smart_server(fhir_server: FhirServer) -> Iterator[SmartServer]:
    """A SMART server in front of the session's FHIR server, started once per run (``reset()`` per test)."""
    server = SmartServer(fhir_server).start()
    try:
        yield server
    finally:
        server.stop()
