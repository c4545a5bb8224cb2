"""JSON Web Key Sets of trusted CDS Clients: read from local files, or fetched from configured URLs, cached.

CDS Hooks 2.0 §Trusting CDS Clients: the client publishes its public keys as a JWK Set, at a URL the service
is told out of band or that the JWT's ``jku`` header names. Only URLs from the trust configuration are ever
fetched (``auth.py`` checks ``jku`` against the issuer's allowlist first), with a timeout, no redirects and a
size cap.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import httpx
from joserfc.errors import InvalidKeyIdError
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry
from joserfc.jwk import Key
from joserfc.jwk import KeySet

logger = logging.getLogger("cds_service.auth")

MAX_JWKS_BYTES = 64 * 1024
# A set rotated by its issuer stops being trusted within this time, even while its kids keep matching.
MAX_KEY_SET_AGE_S = 3600.0
# The key types of the algorithms auth.py accepts; a symmetric ("oct") key in a published set is never used.
_SIGNING_KEY_TYPES = frozenset({"EC", "RSA"})


class JwksError(ValueError):
    """A key set could not be read or fetched; the message names the source, never a token."""


def parse_jwks(document: Any, source: str) -> KeySet:
    """Return the EC and RSA keys with a ``kid`` of a JWK Set document; raise JwksError if there are none."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError(f"{source}: not a JWK Set")
    keys: list[Key] = []
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") not in _SIGNING_KEY_TYPES:
            continue
        if not isinstance(entry.get("kid"), str):
            continue
        try:
            keys.append(JWKRegistry.import_key(entry))
        except (JoseError, ValueError, TypeError):
            logger.warning("ignoring an unreadable key in a JWK Set", extra={"jwks_source": source})
    if not keys:
        raise JwksError(f"{source}: no EC or RSA signing key with a kid")
    return KeySet(keys)


def load_jwks_file(path: Path) -> KeySet:
    """Return the signing keys of a local JWK Set file; raise OSError or JwksError if it cannot be used."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise JwksError(f"{path}: not JSON") from error
    return parse_jwks(document, str(path))


def find_key(key_set: KeySet | None, kid: str, alg: str) -> Key | None:
    """Return the key of ``key_set`` with this ``kid`` whose declared ``alg`` and ``use`` allow ``alg``."""
    if key_set is None:
        return None
    try:
        return key_set.get_by_kid(kid, {"alg": alg, "use": "sig"})
    except InvalidKeyIdError:
        return None


@dataclass
class _CachedSet:
    lock: threading.Lock = field(default_factory=threading.Lock)
    keys: KeySet | None = None
    fetched_at: float = 0.0
    attempted_at: float | None = None


class RemoteKeySets:
    """Key sets fetched from a fixed set of URLs; an unknown ``kid`` refetches, at most once an interval."""

    def __init__(self, urls: Iterable[str], *, timeout_s: float, refresh_interval_s: float) -> None:
        # One entry (and lock) per configured URL, made up front: a URL outside the trust config has no entry.
        self._cache = {url: _CachedSet() for url in urls}
        self._refresh_interval_s = refresh_interval_s
        self._client = httpx.Client(timeout=timeout_s, follow_redirects=False)

    def find(self, url: str, kid: str, alg: str) -> Key | None:
        """Return the key for ``kid`` from ``url``'s set, refetched if the kid is unknown and not too recent.

        Raises JwksError when a fetch fails; a rate-limited or fruitless lookup returns None.
        """
        cached = self._cache[url]
        with cached.lock:
            now = time.monotonic()
            if cached.keys is not None and now - cached.fetched_at > MAX_KEY_SET_AGE_S:
                cached.keys = None
            key = find_key(cached.keys, kid, alg)
            if key is not None:
                return key
            # An unknown kid may mean the issuer rotated keys; the interval stops forged kids from
            # turning every request into a fetch.
            if cached.attempted_at is not None and now - cached.attempted_at < self._refresh_interval_s:
                return None
            cached.attempted_at = now
            cached.keys = self._fetch(url)
            cached.fetched_at = now
            return find_key(cached.keys, kid, alg)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def _fetch(self, url: str) -> KeySet:
        """Return the key set served at ``url``; raise JwksError on any HTTP, size or format problem."""
        body = bytearray()
        try:
            with self._client.stream("GET", url, headers={"Accept": "application/json"}) as response:
                if response.status_code != 200:
                    raise JwksError(f"{url}: HTTP {response.status_code}")
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise JwksError(f"{url}: larger than {MAX_JWKS_BYTES} bytes")
        except httpx.HTTPError as error:
            raise JwksError(f"{url}: {type(error).__name__}") from error
        try:
            document = json.loads(body)
        except ValueError as error:
            raise JwksError(f"{url}: not JSON") from error
        return parse_jwks(document, url)
