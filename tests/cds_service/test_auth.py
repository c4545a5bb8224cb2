"""JWT verification of CDS Clients (CDS Hooks 2.0 §Trusting CDS Clients) with real keys, Redis and HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from joserfc import jwt
from joserfc.jwk import ECKey
from joserfc.jwk import RSAKey
from redis.backoff import NoBackoff
from redis.retry import Retry

from cds_service.auth import JwtVerifier
from cds_service.auth import TrustConfig
from cds_service.auth import load_trust_config
from cds_service.errors import Unauthorized
from cds_service.fhir_guard import is_loopback_host
from cds_service.jwks import find_key
from cds_service.jwks import load_jwks_file

ROOT = Path(__file__).resolve().parents[2]
SANDBOX_TRUST = ROOT / "cds_service" / "data" / "trusted-issuers.sandbox.json"
SANDBOX_ISS = "https://sandbox.cds-hooks.org"
SANDBOX_KID = "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
ISS = "https://ehr.example.org"
AUDIENCE = "https://cds.example.org/cds-services/patient-summary"

EC_KEY = ECKey.generate_key("P-384", parameters={"kid": "ec-1", "alg": "ES384", "use": "sig"})
RSA_KEY = RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "alg": "RS384", "use": "sig"})
OTHER_EC_KEY = ECKey.generate_key("P-384", parameters={"kid": "ec-2"})


def jwks(*keys: ECKey | RSAKey) -> dict[str, Any]:
    """Return the public JWK Set of ``keys``."""
    return {"keys": [key.as_dict(private=False) for key in keys]}


def b64url(data: bytes) -> str:
    """Return unpadded base64url text, as JWS segments are written."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    """Return valid claims from ISS for AUDIENCE with ``overrides`` applied; a None value drops the claim."""
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": ISS,
        "aud": AUDIENCE,
        "exp": now + 300,
        "iat": now,
        "jti": uuid.uuid4().hex,
    }
    body.update(overrides)
    return {name: value for name, value in body.items() if value is not None}


def sign(key: ECKey | RSAKey, alg: str, body: dict[str, Any], **header: Any) -> str:
    """Return a JWT signed with ``key``; ``kid`` defaults to the key's."""
    return jwt.encode({"alg": alg, "kid": key.kid, **header}, body, key, algorithms=[alg])


def bearer(token: str) -> str:
    """Return an Authorization header value carrying ``token``."""
    return f"Bearer {token}"


@dataclass
class JwksServer:
    """A loopback HTTP server answering JWKS paths from ``routes`` and recording every requested path."""

    base_url: str
    routes: dict[str, tuple[int, dict[str, str], bytes]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def serve_json(self, path: str, document: dict[str, Any]) -> str:
        """Serve ``document`` at ``path``; return its URL."""
        self.routes[path] = (200, {"Content-Type": "application/json"}, json.dumps(document).encode())
        return self.base_url + path


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    """Run a JwksServer on 127.0.0.1 in a thread for one test."""
    server_state: list[JwksServer] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state = server_state[0]
            state.requests.append(self.path)
            status, headers, body = state.routes.get(self.path, (404, {}, b"not found"))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Keep test output quiet."""

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_state.append(JwksServer(base_url=f"http://127.0.0.1:{httpd.server_address[1]}"))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server_state[0]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def replay_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A Redis key prefix of this test alone; its keys are deleted afterwards."""
    prefix = f"test-auth:{uuid.uuid4().hex}:"
    yield prefix
    for key in redis_client.scan_iter(match=prefix + "*"):
        redis_client.delete(key)


@pytest.fixture
def make_verifier(redis_client: redis.Redis, replay_prefix: str) -> Iterator[Callable[..., JwtVerifier]]:
    """Build JwtVerifiers over this test's replay prefix from an ``issuers`` mapping; closed afterwards."""
    made: list[JwtVerifier] = []

    def build(issuers: dict[str, Any], **options: Any) -> JwtVerifier:
        trust = TrustConfig.model_validate({"issuers": issuers})
        verifier = JwtVerifier(trust, redis_client, replay_key_prefix=replay_prefix, **options)
        made.append(verifier)
        return verifier

    yield build
    for verifier in made:
        verifier.close()


@pytest.fixture
def local_jwks(tmp_path: Path) -> Path:
    """A JWKS file holding the public EC and RSA test keys."""
    path = tmp_path / "ehr.jwks.json"
    path.write_text(json.dumps(jwks(EC_KEY, RSA_KEY)))
    return path


@pytest.fixture
def verifier(make_verifier: Callable[..., JwtVerifier], local_jwks: Path) -> JwtVerifier:
    """A verifier trusting ISS through the local JWKS file."""
    return make_verifier({ISS: {"jwks_file": str(local_jwks)}})


@pytest.fixture
def network_attempts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Refuse and record every name lookup or connection to a non-loopback host during the test."""
    attempts: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not is_loopback_host(str(host)):
            attempts.append(str(host))
            raise socket.gaierror("network access refused by the test")
        return real_getaddrinfo(host, *args, **kwargs)

    def guarded_connect(sock: socket.socket, address: Any) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if not is_loopback_host(str(host)):
            attempts.append(str(host))
            raise OSError("network access refused by the test")
        real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    return attempts


def rejection_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Return the reasons of the WARNING records ``cds_service.auth`` logged."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "cds_service.auth" and record.levelno == logging.WARNING
    ]


def test_es384_token_is_accepted_and_its_jti_remembered_for_its_lifetime(
    verifier: JwtVerifier, redis_client: redis.Redis, replay_prefix: str
) -> None:
    body = claims()
    assert verifier.verify(bearer(sign(EC_KEY, "ES384", body)), AUDIENCE) == body
    [replay_key] = list(redis_client.scan_iter(match=replay_prefix + "*"))
    # The token stays acceptable for exp - now plus the 30 s leeway; the record must last as long.
    assert 300 <= redis_client.ttl(replay_key) <= 331


def test_rs384_token_is_accepted(verifier: JwtVerifier) -> None:
    body = claims()
    assert verifier.verify(bearer(sign(RSA_KEY, "RS384", body)), AUDIENCE)["jti"] == body["jti"]


def test_scheme_is_case_insensitive(verifier: JwtVerifier) -> None:
    verifier.verify("bearer " + sign(EC_KEY, "ES384", claims()), AUDIENCE)


def test_array_aud_containing_the_endpoint_is_accepted(verifier: JwtVerifier) -> None:
    token = sign(EC_KEY, "ES384", claims(aud=["https://other.example.org/cds-services/x", AUDIENCE]))
    verifier.verify(bearer(token), AUDIENCE)


def test_tenant_configured_for_the_issuer_is_accepted(
    make_verifier: Callable[..., JwtVerifier], local_jwks: Path
) -> None:
    verifier = make_verifier({ISS: {"jwks_file": str(local_jwks), "tenant": "hospital-a"}})
    verifier.verify(bearer(sign(EC_KEY, "ES384", claims(tenant="hospital-a"))), AUDIENCE)


NOW = int(time.time())


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        pytest.param({"exp": NOW - 120, "iat": NOW - 420}, "token expired", id="expired"),
        pytest.param({"nbf": NOW + 600}, "token not yet valid (nbf)", id="nbf-in-future"),
        pytest.param({"iat": NOW + 600, "exp": NOW + 900}, "iat in the future", id="iat-in-future"),
        pytest.param({"exp": NOW + 7200}, "exp too far in the future", id="exp-too-far"),
        pytest.param({"exp": None}, "exp or iat missing or not a number", id="no-exp"),
        pytest.param({"exp": "tomorrow"}, "exp or iat missing or not a number", id="exp-not-number"),
        pytest.param({"aud": "https://cds.example.org/cds-services/other"}, "audience", id="wrong-aud"),
        pytest.param({"aud": AUDIENCE + "/"}, "audience", id="aud-not-exact"),
        pytest.param({"aud": ["https://other.example.org/"]}, "audience", id="array-aud-without-endpoint"),
        pytest.param({"aud": None}, "audience", id="no-aud"),
        pytest.param({"iss": "https://evil.example.org"}, "issuer not trusted", id="unknown-iss"),
        pytest.param({"iss": None}, "issuer not trusted", id="no-iss"),
        pytest.param({"jti": None}, "jti missing or invalid", id="no-jti"),
        pytest.param({"jti": ""}, "jti missing or invalid", id="empty-jti"),
    ],
)
def test_invalid_claims_are_rejected(
    verifier: JwtVerifier, caplog: pytest.LogCaptureFixture, overrides: dict[str, Any], reason: str
) -> None:
    token = sign(EC_KEY, "ES384", claims(**overrides))
    with pytest.raises(Unauthorized) as raised:
        verifier.verify(bearer(token), AUDIENCE)
    assert raised.value.message == "Unauthorized"
    [logged] = rejection_reasons(caplog)
    assert reason in logged


def test_wrong_tenant_is_rejected(
    make_verifier: Callable[..., JwtVerifier], local_jwks: Path, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = make_verifier({ISS: {"jwks_file": str(local_jwks), "tenant": "hospital-a"}})
    for body in (claims(tenant="hospital-b"), claims()):
        with pytest.raises(Unauthorized):
            verifier.verify(bearer(sign(EC_KEY, "ES384", body)), AUDIENCE)
    assert (
        rejection_reasons(caplog)
        == ["JWT rejected: tenant does not match the issuer's configured tenant"] * 2
    )


def test_replayed_jti_is_rejected(verifier: JwtVerifier, caplog: pytest.LogCaptureFixture) -> None:
    token = sign(EC_KEY, "ES384", claims())
    verifier.verify(bearer(token), AUDIENCE)
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(token), AUDIENCE)
    assert rejection_reasons(caplog) == ["JWT rejected: jti already used (replay)"]


def test_same_jti_from_another_issuer_is_not_a_replay(
    make_verifier: Callable[..., JwtVerifier], local_jwks: Path
) -> None:
    verifier = make_verifier(
        {ISS: {"jwks_file": str(local_jwks)}, "https://ehr2.example.org": {"jwks_file": str(local_jwks)}}
    )
    jti = uuid.uuid4().hex
    verifier.verify(bearer(sign(EC_KEY, "ES384", claims(jti=jti))), AUDIENCE)
    verifier.verify(bearer(sign(EC_KEY, "ES384", claims(jti=jti, iss="https://ehr2.example.org"))), AUDIENCE)


def test_tampered_payload_is_rejected(verifier: JwtVerifier, caplog: pytest.LogCaptureFixture) -> None:
    header, _, signature = sign(EC_KEY, "ES384", claims()).split(".")
    forged = b64url(json.dumps(claims(tenant="someone-else")).encode())
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(f"{header}.{forged}.{signature}"), AUDIENCE)
    assert rejection_reasons(caplog) == ["JWT rejected: bad signature"]


def test_alg_none_is_rejected(verifier: JwtVerifier, caplog: pytest.LogCaptureFixture) -> None:
    header = b64url(json.dumps({"alg": "none", "kid": EC_KEY.kid, "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims()).encode())
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(f"{header}.{payload}."), AUDIENCE)
    assert rejection_reasons(caplog) == ["JWT rejected: signature algorithm not accepted"]


def test_hs256_keyed_with_the_issuers_public_key_is_rejected(
    verifier: JwtVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    # The classic key-confusion forgery: HMAC "signed" with the public key, which anyone can read.
    header = b64url(json.dumps({"alg": "HS256", "kid": EC_KEY.kid, "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims()).encode())
    secret = EC_KEY.as_pem(private=False)
    mac = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(f"{header}.{payload}.{b64url(mac)}"), AUDIENCE)
    assert rejection_reasons(caplog) == ["JWT rejected: signature algorithm not accepted"]


def test_alg_not_matching_the_key_type_is_rejected(verifier: JwtVerifier) -> None:
    # Signed with the RSA key under the EC key's kid: the EC key must not be tried as an RSA key.
    token = jwt.encode({"alg": "RS384", "kid": EC_KEY.kid}, claims(), RSA_KEY, algorithms=["RS384"])
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(token), AUDIENCE)


def test_missing_kid_is_rejected(verifier: JwtVerifier, caplog: pytest.LogCaptureFixture) -> None:
    token = jwt.encode({"alg": "ES384"}, claims(), EC_KEY, algorithms=["ES384"])
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(token), AUDIENCE)
    assert rejection_reasons(caplog) == ["JWT rejected: kid header missing"]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer   ",
        "Basic dXNlcjpwYXNz",
        "Token abc.def.ghi",
        "Bearer not-a-jwt",
        "Bearer a.b",
        "Bearer a.b.c",
        "Bearer " + b64url(b'{"alg":"ES384"}') + "." + b64url(b"[1, 2]") + ".c2ln",
        "Bearer " + b64url(b"not json") + "." + b64url(b"{}") + ".c2ln",
        "Bearer \u00e9t\u00e9.\u00e9t\u00e9.\u00e9t\u00e9",
        "Bearer " + "a" * 20_000,
    ],
)
def test_missing_or_garbled_authorization_is_rejected(
    verifier: JwtVerifier, authorization: str | None
) -> None:
    with pytest.raises(Unauthorized):
        verifier.verify(authorization, AUDIENCE)


def test_rejection_log_carries_the_reason_but_no_token(
    verifier: JwtVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    token = sign(EC_KEY, "ES384", claims(aud="https://elsewhere.example.org/"))
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(token), AUDIENCE)
    [record] = [record for record in caplog.records if record.name == "cds_service.auth"]
    assert record.levelno == logging.WARNING
    reason = record.reason  # type: ignore[attr-defined]
    # What was expected and which setting sets it: the fix for a wrong PUBLIC_URL, in the log line.
    assert reason.startswith("audience does not name this endpoint") and "MEDGEMMA_CDS_PUBLIC_URL" in reason
    assert f"expected aud {AUDIENCE} " in reason
    for part in token.split("."):
        assert part not in caplog.text


def test_unreachable_replay_store_still_refuses_replays_in_process(local_jwks: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    trust = TrustConfig.model_validate({"issuers": {ISS: {"jwks_file": str(local_jwks)}}})
    unreachable = redis.Redis(port=closed_port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    verifier = JwtVerifier(trust, unreachable)
    token = bearer(sign(EC_KEY, "ES384", claims()))
    try:
        # Degrade, never fail: the hook still answers while Redis is down...
        assert verifier.verify(token, AUDIENCE)["iss"] == ISS
        # ...and the same token replayed to this process is still refused.
        with pytest.raises(Unauthorized):
            verifier.verify(token, AUDIENCE)
    finally:
        verifier.close()


def test_jwks_uri_is_fetched_once_and_cached(
    make_verifier: Callable[..., JwtVerifier], jwks_server: JwksServer
) -> None:
    url = jwks_server.serve_json("/jwks.json", jwks(RSA_KEY))
    verifier = make_verifier({ISS: {"jwks_uri": url}})
    verifier.verify(bearer(sign(RSA_KEY, "RS384", claims())), AUDIENCE)
    verifier.verify(bearer(sign(RSA_KEY, "RS384", claims())), AUDIENCE)
    assert jwks_server.requests == ["/jwks.json"]


def test_unknown_kid_refetches_the_key_set_then_fails_or_finds_a_rotated_key(
    make_verifier: Callable[..., JwtVerifier], jwks_server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = jwks_server.serve_json("/jwks.json", jwks(EC_KEY))
    verifier = make_verifier({ISS: {"jwks_uri": url}}, jwks_refresh_interval_s=0)
    verifier.verify(bearer(sign(EC_KEY, "ES384", claims())), AUDIENCE)
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(sign(OTHER_EC_KEY, "ES384", claims())), AUDIENCE)
    assert jwks_server.requests == ["/jwks.json", "/jwks.json"]
    assert rejection_reasons(caplog) == ["JWT rejected: no key of the issuer has this kid"]
    jwks_server.serve_json("/jwks.json", jwks(EC_KEY, OTHER_EC_KEY))
    verifier.verify(bearer(sign(OTHER_EC_KEY, "ES384", claims())), AUDIENCE)
    assert len(jwks_server.requests) == 3


def test_unknown_kid_refetches_at_most_once_per_interval(
    make_verifier: Callable[..., JwtVerifier], jwks_server: JwksServer
) -> None:
    url = jwks_server.serve_json("/jwks.json", jwks(EC_KEY))
    verifier = make_verifier({ISS: {"jwks_uri": url}})
    for _ in range(3):
        with pytest.raises(Unauthorized):
            verifier.verify(bearer(sign(OTHER_EC_KEY, "ES384", claims())), AUDIENCE)
    assert jwks_server.requests == ["/jwks.json"]


def test_jku_on_the_allowlist_is_fetched(
    make_verifier: Callable[..., JwtVerifier], jwks_server: JwksServer
) -> None:
    url = jwks_server.serve_json("/jku.json", jwks(EC_KEY))
    verifier = make_verifier({ISS: {"jku_allowed": [url]}})
    verifier.verify(bearer(sign(EC_KEY, "ES384", claims(), jku=url)), AUDIENCE)
    assert jwks_server.requests == ["/jku.json"]


def test_jku_off_the_allowlist_is_never_fetched(
    make_verifier: Callable[..., JwtVerifier],
    jwks_server: JwksServer,
    local_jwks: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    allowed = jwks_server.serve_json("/jku.json", jwks(EC_KEY))
    evil = jwks_server.serve_json("/evil.json", jwks(EC_KEY))
    verifier = make_verifier({ISS: {"jku_allowed": [allowed], "jwks_file": str(local_jwks)}})
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(sign(EC_KEY, "ES384", claims(), jku=evil)), AUDIENCE)
    assert jwks_server.requests == []
    assert rejection_reasons(caplog) == ["JWT rejected: jku header not on the issuer's allowlist"]


def test_jku_is_refused_for_an_issuer_without_a_jku_allowlist(
    make_verifier: Callable[..., JwtVerifier], jwks_server: JwksServer
) -> None:
    url = jwks_server.serve_json("/jwks.json", jwks(EC_KEY))
    verifier = make_verifier({ISS: {"jwks_uri": url}})
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(sign(EC_KEY, "ES384", claims(), jku=url)), AUDIENCE)
    assert jwks_server.requests == []


def test_redirect_from_the_jwks_uri_is_not_followed(
    make_verifier: Callable[..., JwtVerifier], jwks_server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    target = jwks_server.serve_json("/jwks.json", jwks(EC_KEY))
    jwks_server.routes["/moved"] = (302, {"Location": target}, b"")
    verifier = make_verifier({ISS: {"jwks_uri": jwks_server.base_url + "/moved"}})
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(sign(EC_KEY, "ES384", claims())), AUDIENCE)
    assert jwks_server.requests == ["/moved"]
    [logged] = rejection_reasons(caplog)
    assert "HTTP 302" in logged


def test_oversized_or_invalid_key_sets_are_refused(
    make_verifier: Callable[..., JwtVerifier], jwks_server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    padded = jwks(EC_KEY) | {"padding": "x" * 100_000}
    big = jwks_server.serve_json("/big.json", padded)
    jwks_server.routes["/text"] = (200, {}, b"<html>not json</html>")
    symmetric = jwks_server.serve_json(
        "/oct.json", {"keys": [{"kty": "oct", "kid": EC_KEY.kid, "k": "c2VjcmV0"}]}
    )
    for url in (big, jwks_server.base_url + "/text", symmetric):
        verifier = make_verifier({ISS: {"jwks_uri": url}})
        with pytest.raises(Unauthorized):
            verifier.verify(bearer(sign(EC_KEY, "ES384", claims())), AUDIENCE)
    reasons = rejection_reasons(caplog)
    assert "larger than" in reasons[0]
    assert "not JSON" in reasons[1]
    assert "no EC or RSA signing key" in reasons[2]


def test_trust_config_loads_json_and_yaml_and_resolves_relative_jwks_files(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "ehr.jwks.json").write_text(json.dumps(jwks(EC_KEY)))
    (tmp_path / "trust.yaml").write_text(
        f"issuers:\n  {ISS}:\n    jwks_file: keys/ehr.jwks.json\n    tenant: hospital-a\n"
    )
    (tmp_path / "trust.json").write_text(json.dumps({"issuers": {ISS: {"jwks_file": "keys/ehr.jwks.json"}}}))
    for name in ("trust.yaml", "trust.json"):
        trust = load_trust_config(tmp_path / name)
        assert trust.issuers[ISS].jwks_file == tmp_path / "keys" / "ehr.jwks.json"
    assert load_trust_config(tmp_path / "trust.yaml").issuers[ISS].tenant == "hospital-a"


@pytest.mark.parametrize(
    "document",
    [
        pytest.param("{not json", id="not-json"),
        pytest.param(json.dumps({"issuers": {ISS: {}}}), id="no-key-source"),
        pytest.param(
            json.dumps({"issuers": {ISS: {"jwks_uri": "http://keys.example.org/jwks"}}}), id="http-uri"
        ),
        pytest.param(
            json.dumps({"issuers": {ISS: {"jku_allowed": ["ftp://keys.example.org/"]}}}), id="ftp-jku"
        ),
        pytest.param(
            json.dumps({"issuers": {ISS: {"jwks_uri": "https://u:p@keys.example.org/"}}}), id="userinfo"
        ),
        pytest.param(json.dumps({"issuers": {ISS: {"jwks_fiel": "x.json"}}}), id="typo"),
        pytest.param(json.dumps({"trusted": {}}), id="no-issuers"),
    ],
)
def test_invalid_trust_config_is_refused(tmp_path: Path, document: str) -> None:
    path = tmp_path / "trust.json"
    path.write_text(document)
    with pytest.raises(ValueError):
        load_trust_config(path)


def test_missing_local_jwks_file_stops_the_verifier_from_starting(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    trust = TrustConfig.model_validate({"issuers": {ISS: {"jwks_file": str(tmp_path / "absent.json")}}})
    with pytest.raises(OSError):
        JwtVerifier(trust, redis_client)


def test_shipped_sandbox_trust_config_holds_the_sandbox_key() -> None:
    trust = load_trust_config(SANDBOX_TRUST)
    sandbox = trust.issuers[SANDBOX_ISS]
    assert sandbox.jku_allowed == (SANDBOX_JKU,)
    assert sandbox.jwks_file == ROOT / "cds_service" / "data" / "jwks" / "cds-hooks-sandbox.jwks.json"
    key = find_key(load_jwks_file(sandbox.jwks_file), SANDBOX_KID, "ES384")
    assert key is not None
    assert key.as_dict(private=False)["crv"] == "P-384"


def test_forged_sandbox_token_fails_on_the_shipped_key_without_network(
    redis_client: redis.Redis,
    replay_prefix: str,
    network_attempts: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    verifier = JwtVerifier(load_trust_config(SANDBOX_TRUST), redis_client, replay_key_prefix=replay_prefix)
    impostor = ECKey.generate_key("P-384")
    token = jwt.encode(
        {"alg": "ES384", "typ": "JWT", "kid": SANDBOX_KID, "jku": SANDBOX_JKU},
        claims(iss=SANDBOX_ISS),
        impostor,
        algorithms=["ES384"],
    )
    try:
        with pytest.raises(Unauthorized):
            verifier.verify(bearer(token), AUDIENCE)
    finally:
        verifier.close()
    # "bad signature" (not "key set unavailable") shows the shipped key was found and tried.
    assert rejection_reasons(caplog) == ["JWT rejected: bad signature"]
    assert network_attempts == []


def test_sandbox_shaped_config_with_a_test_key_verifies_without_network(
    tmp_path: Path,
    redis_client: redis.Redis,
    replay_prefix: str,
    network_attempts: list[str],
) -> None:
    (tmp_path / "jwks").mkdir()
    (tmp_path / "jwks" / "ehr.jwks.json").write_text(json.dumps(jwks(EC_KEY)))
    config = {"issuers": {SANDBOX_ISS: {"jwks_file": "jwks/ehr.jwks.json", "jku_allowed": [SANDBOX_JKU]}}}
    (tmp_path / "trusted-issuers.json").write_text(json.dumps(config))
    verifier = JwtVerifier(
        load_trust_config(tmp_path / "trusted-issuers.json"), redis_client, replay_key_prefix=replay_prefix
    )
    body = claims(iss=SANDBOX_ISS)
    token = sign(EC_KEY, "ES384", body, typ="JWT", jku=SANDBOX_JKU)
    try:
        assert verifier.verify(bearer(token), AUDIENCE) == body
    finally:
        verifier.close()
    assert network_attempts == []
