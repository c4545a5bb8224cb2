"""What a worker read for an imaging job (the picture the model saw, and where it came from), kept in Redis.

The worker writes it before the job's result, under its own key with the result's lifetime, so reading a
job's record on every chart open doesn't carry the picture; the API reads it once, when it makes the
draft. It is patient data: encrypted like the job request (Fernet, its own purpose key).
"""

from __future__ import annotations

import base64

import redis
from cryptography.fernet import Fernet
from cryptography.fernet import InvalidToken
from pydantic import BaseModel
from pydantic import ConfigDict

from cds_service.settings import Settings
from cds_service.settings import purpose_key
from cds_service.wire import ImageRead

PREFIX = "mgcds:job-image:"


class StoredRead(BaseModel):
    """The stored form: what was read, and the PNG."""

    model_config = ConfigDict(extra="forbid")

    read: ImageRead
    png_b64: str


class ImageReads:
    """Reads and writes ``mgcds:job-image:{job id}``."""

    def __init__(self, redis_client: redis.Redis, settings: Settings) -> None:
        self.redis = redis_client
        self.ttl_s = settings.result_ttl_s
        self._box = Fernet(base64.urlsafe_b64encode(purpose_key(settings, "job-image")))

    def save(self, job_id: str, read: ImageRead, png: bytes) -> None:
        """Store what a job read (before its result, so a finished job always has it)."""
        stored = StoredRead(read=read, png_b64=base64.b64encode(png).decode())
        self.redis.set(PREFIX + job_id, self._box.encrypt(stored.model_dump_json().encode()), ex=self.ttl_s)

    def load(self, job_id: str) -> tuple[ImageRead, bytes] | None:
        """Return what a job read and its PNG; None when gone (expired, or Redis lost it) or unreadable."""
        sealed = self.redis.get(PREFIX + job_id)
        if not sealed:
            return None
        try:
            stored = StoredRead.model_validate_json(self._box.decrypt(sealed))
        except InvalidToken:
            return None
        return stored.read, base64.b64decode(stored.png_b64)
