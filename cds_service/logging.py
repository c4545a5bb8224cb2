"""Structured logging on the standard library: one JSON object per line, tagged with the request id."""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC
from datetime import datetime
from typing import TextIO

_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged as a field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: ts, level, logger, message, request_id, then ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one JSON line; values JSON cannot hold are written with ``str``."""
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = _request_id.get()
        if request_id is not None:
            entry["request_id"] = request_id
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRIBUTES and name not in entry:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class _JsonHandler(logging.StreamHandler[TextIO]):
    """The root handler ``configure_logging`` installs; its class marks it so a second call finds it."""


def configure_logging(level: str = "INFO") -> None:
    """Install the JSON handler (stderr) on the root logger once, and set the root level.

    Calling it again changes the level only; handlers others installed (pytest's, gunicorn's) are left alone.
    """
    root = logging.getLogger()
    if not any(isinstance(handler, _JsonHandler) for handler in root.handlers):
        handler = _JsonHandler()
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    root.setLevel(level.upper())
    # The HTTP client logs each request's URL (at DEBUG also response headers such as Location); a FHIR
    # read's URL names the patient (Patient/{id}, ?patient={id}), so only its warnings and errors pass.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def set_request_id(value: str) -> None:
    """Tag every record logged from the current context (thread or task) with ``request_id``."""
    _request_id.set(value)


def clear_request_id() -> None:
    """Stop tagging records from the current context, e.g. when a request ends and the thread is reused."""
    _request_id.set(None)


def get_request_id() -> str | None:
    """Return the request id of the current context, or None outside a request."""
    return _request_id.get()
