"""Authenticates CDS Clients: verifies the ``Authorization: Bearer <JWT>`` of every call against a trust list.

CDS Hooks 2.0 §Trusting CDS Clients: the client signs a JWT (``iss``, ``aud`` = the endpoint called, ``exp``,
``iat``, ``jti``, optional ``tenant``) with its private key; the service checks, in this order, that ``iss``
is trusted, ``aud``, ``exp``, ``tenant``, the signature with that issuer's key, and that ``jti`` is new.
Every failure is the same bare 401; the reason goes to the ``cds_service.auth`` log at WARNING, without
token content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
import yaml
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import Key
from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import ValidationInfo
from pydantic import field_validator
from pydantic import model_validator

from cds_service.errors import Unauthorized
from cds_service.fhir_guard import is_loopback_host
from cds_service.jwks import JwksError
from cds_service.jwks import RemoteKeySets
from cds_service.jwks import find_key
from cds_service.jwks import load_jwks_file

logger = logging.getLogger("cds_service.auth")

# The spec asks for ES384 and RS384; the other asymmetric RFC 7518 algorithms are equally sound.
# "none" and the HMAC family are never accepted: an HMAC "secret" could be the issuer's public key.
ACCEPTED_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
# Bounds the replay store's memory: a token may not claim to live longer than this.
MAX_TOKEN_LIFETIME_S = 3600
MAX_TOKEN_CHARS = 16 * 1024
MAX_JTI_CHARS = 256
# The in-process replay record is pruned of expired entries beyond this size.
LOCAL_REPLAY_LIMIT = 100_000


class IssuerTrust(BaseModel):
    """Where a trusted issuer's keys come from (JWKS file, JWKS URL, allowed ``jku`` URLs); its tenant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    jwks_file: Path | None = None
    jwks_uri: str | None = None
    jku_allowed: tuple[str, ...] = ()
    tenant: str | None = None

    @field_validator("jwks_file")
    @classmethod
    def _resolve_against_config(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        base_dir = (info.context or {}).get("base_dir")
        if value is None or value.is_absolute() or base_dir is None:
            return value
        return Path(base_dir) / value

    @field_validator("jwks_uri")
    @classmethod
    def _check_jwks_uri(cls, value: str | None) -> str | None:
        return None if value is None else _key_set_url(value)

    @field_validator("jku_allowed")
    @classmethod
    def _check_jku_allowed(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_key_set_url(url) for url in value)

    @model_validator(mode="after")
    def _has_key_source(self) -> IssuerTrust:
        if self.jwks_file is None and self.jwks_uri is None and not self.jku_allowed:
            raise ValueError("an issuer needs jwks_file, jwks_uri or jku_allowed")
        return self


class TrustConfig(BaseModel):
    """The issuers (``iss`` values, compared exactly) whose JWTs are accepted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuers: dict[str, IssuerTrust]


def load_trust_config(path: Path) -> TrustConfig:
    """Return the trust configuration in a JSON or YAML file; a relative ``jwks_file`` is beside the file.

    Raises OSError when the file cannot be read and ValueError when its content is not a valid configuration.
    """
    text = path.read_text(encoding="utf-8")
    try:
        document = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (ValueError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: not valid JSON or YAML") from error
    return TrustConfig.model_validate(document, context={"base_dir": path.parent})


class _Rejected(Exception):
    """One JWT check failed; ``reason`` is safe to log (names the check, never token content)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JwtVerifier:
    """Verifies CDS Client JWTs against a TrustConfig; replayed ``jti`` values are remembered in Redis."""

    def __init__(
        self,
        trust: TrustConfig,
        redis_client: redis.Redis,
        *,
        http_timeout_s: float = 3.0,
        leeway_s: int = 30,
        jwks_refresh_interval_s: float = 30.0,
        replay_key_prefix: str = "medgemma-cds:jwt-jti:",
    ) -> None:
        """Load every issuer's local JWKS file now, so a missing or broken one stops startup."""
        self._trust = trust
        self._redis = redis_client
        self._local_seen: dict[str, float] = {}
        self._local_lock = threading.Lock()
        self._leeway_s = leeway_s
        self._replay_key_prefix = replay_key_prefix
        self._local_keys = {
            issuer: load_jwks_file(config.jwks_file)
            for issuer, config in trust.issuers.items()
            if config.jwks_file is not None
        }
        urls = {
            url for config in trust.issuers.values() for url in (config.jwks_uri, *config.jku_allowed) if url
        }
        self._remote_keys = RemoteKeySets(
            urls, timeout_s=http_timeout_s, refresh_interval_s=jwks_refresh_interval_s
        )
        self._registry = jws.JWSRegistry(algorithms=sorted(ACCEPTED_ALGORITHMS), strict_check_header=False)

    def verify(self, authorization_header: str | None, audience: str) -> dict[str, Any]:
        """Return the claims of the request's JWT if it is valid for ``audience`` (the exact URL called).

        Raises ``Unauthorized`` (generic message) on any failure. A ``jti`` is recorded in Redis and in this
        process; while Redis is down the process's record alone refuses replays (degrade, never fail).
        """
        try:
            return self._verify(authorization_header, audience)
        except _Rejected as rejected:
            logger.warning("JWT rejected: %s", rejected.reason, extra={"reason": rejected.reason})
            raise Unauthorized("Unauthorized") from None

    def close(self) -> None:
        """Release the HTTP client used for JWKS fetches."""
        self._remote_keys.close()

    def _verify(self, authorization_header: str | None, audience: str) -> dict[str, Any]:
        signed, claims = _decode_unverified(_bearer_token(authorization_header))
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or issuer not in self._trust.issuers:
            raise _Rejected("issuer not trusted (MEDGEMMA_CDS_TRUSTED_ISSUERS lists the trusted ones)")
        trust = self._trust.issuers[issuer]
        aud = claims.get("aud")
        if not (aud == audience or (isinstance(aud, list) and audience in aud)):
            # The expected value is no secret, and a wrong base URL is the usual cause: name both.
            raise _Rejected(
                f"audience does not name this endpoint: expected aud {audience} "
                "(its base is MEDGEMMA_CDS_PUBLIC_URL)"
            )
        now = time.time()
        expires_at = self._check_times(claims, now)
        if trust.tenant is not None and claims.get("tenant") != trust.tenant:
            raise _Rejected("tenant does not match the issuer's configured tenant")
        self._check_signature(signed, issuer, trust)
        self._check_replay(claims, issuer, expires_at - now)
        return claims

    def _check_times(self, claims: dict[str, Any], now: float) -> float:
        """Return ``exp`` after checking ``exp``, ``iat`` and ``nbf`` against ``now`` with the leeway."""
        expires_at = _numeric_date(claims, "exp")
        issued_at = _numeric_date(claims, "iat")
        if expires_at is None or issued_at is None:
            raise _Rejected("exp or iat missing or not a number")
        if now >= expires_at + self._leeway_s:
            raise _Rejected("token expired")
        if expires_at > now + MAX_TOKEN_LIFETIME_S + self._leeway_s:
            raise _Rejected("exp too far in the future")
        if issued_at > now + self._leeway_s:
            raise _Rejected("iat in the future")
        not_before = _numeric_date(claims, "nbf")
        if "nbf" in claims and (not_before is None or not_before > now + self._leeway_s):
            raise _Rejected("token not yet valid (nbf)")
        return expires_at

    def _check_signature(self, signed: jws.CompactSignature, issuer: str, trust: IssuerTrust) -> None:
        header = signed.headers()
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ACCEPTED_ALGORITHMS:
            raise _Rejected("signature algorithm not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _Rejected("kid header missing")
        jku = header.get("jku")
        # Checked before any lookup: a jku off the allowlist is never fetched, even if a local key would do.
        if jku is not None and jku not in trust.jku_allowed:
            raise _Rejected("jku header not on the issuer's allowlist")
        key = self._find_key(issuer, trust, kid, alg, jku)
        try:
            valid = jws.validate_compact(signed, key, registry=self._registry)
        except JoseError:
            valid = False
        if not valid:
            raise _Rejected("bad signature")

    def _find_key(self, issuer: str, trust: IssuerTrust, kid: str, alg: str, jku: str | None) -> Key:
        """Return the issuer's key for ``kid``: local JWKS file first (no network), then jku or jwks_uri."""
        key = find_key(self._local_keys.get(issuer), kid, alg)
        url = jku or trust.jwks_uri
        if key is None and url is not None:
            try:
                key = self._remote_keys.find(url, kid, alg)
            except JwksError as error:
                raise _Rejected(f"issuer key set unavailable ({error})") from None
        if key is None:
            raise _Rejected("no key of the issuer has this kid")
        return key

    def _check_replay(self, claims: dict[str, Any], issuer: str, remaining_s: float) -> None:
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
            raise _Rejected("jti missing or invalid")
        # Hashed so any issuer or jti text makes a short, safe key; per issuer, as jti is unique per issuer.
        digest = hashlib.sha256(json.dumps([issuer, jti]).encode()).hexdigest()
        # Remembered until the token could no longer pass the exp check, so no replay outlives the record.
        ttl_s = max(1, math.ceil(remaining_s + self._leeway_s))
        if not self._remember_locally(digest, ttl_s):
            raise _Rejected("jti already used (replay)")
        try:
            first_use = self._redis.set(self._replay_key_prefix + digest, 1, nx=True, ex=ttl_s)
        except redis.RedisError as error:
            # Degrade, never fail: while Redis is down this process's own record still refuses replays to it.
            logger.warning("JWT replay store unavailable, using the local record: %s", type(error).__name__)
            return
        if not first_use:
            raise _Rejected("jti already used (replay)")

    def _remember_locally(self, digest: str, ttl_s: int) -> bool:
        """Record a jti digest in this process; return False when it was already recorded and unexpired."""
        now = time.monotonic()
        with self._local_lock:
            if len(self._local_seen) > LOCAL_REPLAY_LIMIT:
                self._local_seen = {k: v for k, v in self._local_seen.items() if v > now}
            if self._local_seen.get(digest, 0.0) > now:
                return False
            self._local_seen[digest] = now + ttl_s
            return True


def _bearer_token(authorization_header: str | None) -> str:
    """Return the token of a ``Bearer`` Authorization header (scheme case-insensitive, RFC 7235)."""
    if not authorization_header:
        raise _Rejected("Authorization header missing")
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _Rejected("Authorization header is not a Bearer token")
    if len(token) > MAX_TOKEN_CHARS:
        raise _Rejected("token too large")
    return token


def _decode_unverified(token: str) -> tuple[jws.CompactSignature, dict[str, Any]]:
    """Return the parsed JWS and its claims, not yet verified: iss and kid are needed to find the key."""
    try:
        signed = jws.extract_compact(token.encode("ascii"))
        claims = json.loads(signed.payload)
    except (JoseError, ValueError):
        raise _Rejected("malformed token") from None
    if not isinstance(claims, dict) or not isinstance(signed.headers(), dict):
        raise _Rejected("malformed token")
    return signed, claims


def _numeric_date(claims: dict[str, Any], name: str) -> float | None:
    """Return a NumericDate claim (RFC 7519 §2) as a float, or None if absent or not a finite number."""
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _key_set_url(url: str) -> str:
    """Return ``url`` if it may be fetched for keys: https, or http to a loopback host (tests, local dev)."""
    parts = urlsplit(url)
    loopback_http = parts.scheme == "http" and is_loopback_host(parts.hostname or "")
    if (parts.scheme != "https" and not loopback_http) or not parts.hostname or "@" in parts.netloc:
        raise ValueError(
            f"key set URL {url!r} must be https (http only to a loopback host), without userinfo"
        )
    return url
