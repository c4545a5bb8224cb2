"""Errors the service raises; each class carries its HTTP status and a stable code, rendered in one place."""

from __future__ import annotations

from typing import Any


class CdsError(Exception):
    """Base of every error answered to a client; the message never contains PHI, tokens or stack traces."""

    status: int = 500
    code: str = "internal-error"

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []

    def body(self) -> dict[str, Any]:
        """Return the JSON body: ``{"error", "message"}`` plus field ``details`` where there are some."""
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class BadRequest(CdsError):
    """Malformed JSON or a field that fails validation (400)."""

    status = 400
    code = "bad-request"


class Unauthorized(CdsError):
    """Any failure of the inbound JWT; answered as a bare 401, the reason only goes to the log."""

    status = 401
    code = "unauthorized"


class Forbidden(CdsError):
    """Authenticated, but not allowed to do this (403), e.g. signing from a development review link."""

    status = 403
    code = "forbidden"


class NotFound(CdsError):
    """Unknown service, job or draft (404)."""

    status = 404
    code = "not-found"


class Conflict(CdsError):
    """The request conflicts with the resource's state, e.g. signing a rejected draft (409)."""

    status = 409
    code = "conflict"


class PrefetchFailed(CdsError):
    """Data the service needs was neither prefetched nor readable from ``fhirServer`` (412).

    CDS Hooks 2.0 §Prefetch: "the CDS Service MUST respond with an HTTP 412 Precondition Failed status code";
    the body is an OperationOutcome (as the 3.0 ballot adds) naming the key and why.
    """

    status = 412
    code = "prefetch-failed"

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"prefetch '{key}' could not be obtained: {reason}")
        self.key = key
        self.reason = reason

    def body(self) -> dict[str, Any]:
        """Return an R4 OperationOutcome naming the prefetch key and the reason."""
        return {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "not-found" if "404" in self.reason else "exception",
                    "diagnostics": self.message,
                    "expression": [f"prefetch.{self.key}"],
                }
            ],
        }


class PayloadTooLarge(CdsError):
    """Body over the configured limit (413)."""

    status = 413
    code = "payload-too-large"


class UnsupportedMediaType(CdsError):
    """Body is not JSON (415)."""

    status = 415
    code = "unsupported-media-type"


class UpstreamError(CdsError):
    """The FHIR server answered with an error we cannot work around (502)."""

    status = 502
    code = "fhir-server-error"


class UpstreamTimeout(CdsError):
    """The FHIR server did not answer in time (504)."""

    status = 504
    code = "fhir-server-timeout"


class ServiceUnavailable(CdsError):
    """A dependency needed for this request (Redis, database) is down (503)."""

    status = 503
    code = "unavailable"
