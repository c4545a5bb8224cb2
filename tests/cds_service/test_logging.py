"""Structured JSON logging: one JSON object per line, tagged with the request id of the current context."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cds_service.logging import JsonFormatter
from cds_service.logging import clear_request_id
from cds_service.logging import configure_logging
from cds_service.logging import get_request_id
from cds_service.logging import set_request_id


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Configure JSON logging for one test, its output in a buffer; the root logger is restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    configure_logging("DEBUG")
    [handler] = [handler for handler in root.handlers if isinstance(handler.formatter, JsonFormatter)]
    buffer = io.StringIO()
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)
    yield buffer
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    clear_request_id()


def records(buffer: io.StringIO) -> list[dict[str, Any]]:
    """Return the JSON objects written so far, one per line."""
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_lines_carry_ts_level_logger_message_and_request_id(json_lines: io.StringIO) -> None:
    set_request_id("req-123")
    logging.getLogger("cds_service.api").info("served %s", "patient-summary", extra={"status": 200})
    [entry] = records(json_lines)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "cds_service.api"
    assert entry["message"] == "served patient-summary"
    assert entry["request_id"] == "req-123"
    assert entry["status"] == 200
    assert entry["ts"].endswith("+00:00")
    assert set(entry) == {"ts", "level", "logger", "message", "request_id", "status"}


def test_request_id_is_absent_outside_a_request(json_lines: io.StringIO) -> None:
    set_request_id("req-1")
    clear_request_id()
    logging.getLogger("cds_service").warning("startup")
    [entry] = records(json_lines)
    assert "request_id" not in entry
    assert get_request_id() is None


def test_request_id_belongs_to_its_context(json_lines: io.StringIO) -> None:
    set_request_id("main")
    seen: list[str | None] = []

    def other_request() -> None:
        seen.append(get_request_id())
        set_request_id("thread")
        logging.getLogger("cds_service").info("in thread")

    worker = threading.Thread(target=other_request)
    worker.start()
    worker.join()
    contextvars.copy_context().run(set_request_id, "copied")
    logging.getLogger("cds_service").info("in main")
    assert seen == [None]
    assert [entry["request_id"] for entry in records(json_lines)] == ["thread", "main"]


def test_exceptions_and_odd_values_stay_one_json_line(json_lines: io.StringIO) -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logging.getLogger("cds_service").exception("failed", extra={"path": Path("/tmp/x")})
    [entry] = records(json_lines)
    assert entry["path"] == "/tmp/x"
    assert "RuntimeError: boom" in entry["exception"]
    assert len(json_lines.getvalue().splitlines()) == 1


def test_configure_logging_twice_installs_one_handler_and_sets_the_level(json_lines: io.StringIO) -> None:
    configure_logging("warning")
    root = logging.getLogger()
    assert len([handler for handler in root.handlers if isinstance(handler.formatter, JsonFormatter)]) == 1
    assert root.level == logging.WARNING
    logging.getLogger("cds_service").info("dropped")
    logging.getLogger("cds_service").warning("kept")
    assert [entry["message"] for entry in records(json_lines)] == ["kept"]
