"""Signed, expiring links: how a clinician's browser, which carries no EHR JWT, reaches one draft or job.

A link grants access to exactly one thing (its subject) for one purpose, until it expires; it is signed with
``MEDGEMMA_CDS_SECRET_KEY`` by itsdangerous.
"""

from __future__ import annotations

from typing import Literal

from itsdangerous import BadSignature
from itsdangerous import URLSafeTimedSerializer

from cds_service.settings import Settings

Purpose = Literal["draft-review", "job-status"]


def sign_link(settings: Settings, purpose: Purpose, subject: str) -> str:
    """Return the token that grants ``purpose`` access to ``subject``."""
    return URLSafeTimedSerializer(settings.secret_key.get_secret_value(), salt=purpose).dumps(subject)


def link_grants(settings: Settings, purpose: Purpose, subject: str, token: str | None) -> bool:
    """Return whether ``token`` is a valid, unexpired link for exactly this purpose and subject."""
    signer = URLSafeTimedSerializer(settings.secret_key.get_secret_value(), salt=purpose)
    try:
        # SignatureExpired is a BadSignature.
        return bool(signer.loads(token or "", max_age=settings.review_link_ttl_s) == subject)
    except BadSignature:
        return False
