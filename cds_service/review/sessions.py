"""Server-side state of the review app in Redis, where every API process and replica sees it.

Three kinds of record, each encrypted (Fernet, keyed from ``MEDGEMMA_CDS_SECRET_KEY``) because they hold
tokens, and each with a lifetime:
- a pending authorization (state → PKCE verifier, nonce, iss, draft), taken once: a ``state`` used twice or
  never issued is refused;
- a redeemed authorization code, remembered so a code used twice is refused (real SMART servers let a code
  be redeemed twice);
- a review session (an opaque id in an HttpOnly cookie → the clinician, the patient, the EHR's FHIR base,
  the access token, a CSRF token).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import asdict
from dataclasses import dataclass
from typing import Any

import redis
from cryptography.fernet import Fernet
from cryptography.fernet import InvalidToken

PENDING_TTL_S = 600
CODE_TTL_S = 3600
_PREFIX = "mgcds:review:"


@dataclass(frozen=True)
class ReviewSession:
    """Who is reviewing, for which patient on which EHR, and with which token."""

    iss: str
    patient: str
    fhir_user: str | None
    user_name: str
    patient_name: str
    patient_birth_date: str
    access_token: str
    granted_scope: str
    csrf: str
    expires_at: float

    @property
    def may_sign(self) -> bool:
        """Return whether the user is a clinician the EHR named (a Patient or RelatedPerson only reads)."""
        return (self.fhir_user or "").split("/", 1)[0] in ("Practitioner", "PractitionerRole")

    def may_write(self) -> bool:
        """Return whether the EHR granted a write of DiagnosticReports (v2 ``.c``/``.cu`` or v1 ``write``)."""
        for scope in self.granted_scope.split():
            resource, _, access = scope.partition("/")[2].partition(".")
            if resource in ("DiagnosticReport", "*") and ("c" in access or access in ("write", "*")):
                return True
        return False


class ReviewStore:
    """The review app's records in Redis."""

    def __init__(self, client: redis.Redis, key: bytes, session_ttl_s: int) -> None:
        self.redis = client
        self.box = Fernet(base64.urlsafe_b64encode(key))
        self.session_ttl_s = session_ttl_s

    def _seal(self, value: dict[str, Any]) -> bytes:
        return self.box.encrypt(json.dumps(value).encode())

    def _open(self, sealed: bytes | None) -> dict[str, Any] | None:
        if sealed is None:
            return None
        try:
            return json.loads(self.box.decrypt(sealed))
        except (InvalidToken, ValueError):
            return None

    def begin(self, state: str, pending: dict[str, Any]) -> None:
        """Keep what the callback needs, under the ``state`` sent to the authorization server."""
        self.redis.set(f"{_PREFIX}pending:{state}", self._seal(pending), ex=PENDING_TTL_S)

    def take(self, state: str) -> dict[str, Any] | None:
        """Return and forget the pending authorization of ``state`` (None: unknown, expired or used)."""
        return self._open(self.redis.getdel(f"{_PREFIX}pending:{state}"))

    def first_use_of_code(self, code: str) -> bool:
        """Return True the first time a code is seen, False ever after (within its lifetime)."""
        digest = hashlib.sha256(code.encode()).hexdigest()
        return bool(self.redis.set(f"{_PREFIX}code:{digest}", 1, nx=True, ex=CODE_TTL_S))

    def open_session(self, session: ReviewSession) -> str:
        """Store a session; return its id (the cookie's value)."""
        session_id = secrets.token_urlsafe(32)
        ttl = max(1, int(session.expires_at - time.time()))
        self.redis.set(f"{_PREFIX}session:{session_id}", self._seal(asdict(session)), ex=ttl)
        return session_id

    def session(self, session_id: str | None) -> ReviewSession | None:
        """Return the live session of a cookie, or None (missing, forged, expired)."""
        if not session_id or len(session_id) > 64:
            return None
        data = self._open(self.redis.get(f"{_PREFIX}session:{session_id}"))
        if data is None:
            return None
        session = ReviewSession(**data)
        return session if session.expires_at > time.time() else None

    def close(self, session_id: str) -> None:
        """End a session."""
        self.redis.delete(f"{_PREFIX}session:{session_id}")
