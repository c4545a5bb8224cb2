"""Bad input never 500s: control characters in addresses, a non-ASCII CSRF value, Redis down, a crash.

Each store is tried (PostgreSQL refuses NUL in text where SQLite takes it); answers say what is wrong, and
the log holds no stack trace and no exception message unless debug logging is on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from flask import Flask
from support import Issuer
from support import free_port

from cds_service.app import create_app
from cds_service.review.routes import COOKIE
from cds_service.review.sessions import ReviewSession
from cds_service.settings import Settings

ADDRESSES = [
    "/drafts?patient=abc%00",
    "/drafts?status=draft&patient=a%01b",
    "/drafts/abc%00",
    "/jobs/abc%00",
    "/jobs/abc%7f",
    "/drafts/abc%00/review?access=x",
    "/drafts/abc/review?access=x%00",
]


@pytest.fixture(params=["postgresql", "sqlite"])
def any_store_app(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> Flask:
    """The app on PostgreSQL, then on SQLite."""
    if request.param == "sqlite":
        settings = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'cds.db'}"})
    app = create_app(settings)
    if request.param == "sqlite":
        app.extensions["cds"].store.migrate()
    return app


@pytest.mark.parametrize("address", ADDRESSES)
def test_control_characters_in_an_address_are_a_400_on_every_store(
    any_store_app: Flask, issuer: Issuer, address: str
) -> None:
    path = address.split("?")[0].replace("%00", "\x00").replace("%01", "\x01").replace("%7f", "\x7f")
    answer = any_store_app.test_client().get(address, headers=issuer.headers(path))
    assert answer.status_code == 400, answer.text
    assert "control character" in answer.text


def test_a_review_page_with_a_control_character_is_a_400_page(any_store_app: Flask) -> None:
    answer = any_store_app.test_client().get("/review/drafts/abc%00")
    assert answer.status_code == 400 and answer.mimetype == "text/html"
    assert "control character" in answer.text


def test_a_nul_in_a_review_form_is_a_400_before_anything_is_stored(app: Flask) -> None:
    answer = app.test_client().post("/review/drafts/abc/sign", data={"csrf": "x", "text": "a\x00b"})
    assert answer.status_code == 400 and "NUL" in answer.text


def review_session(app: Flask, fhir_user: str) -> str:
    """Open a review session in the app's store as a SMART callback would; return its cookie value."""
    session = ReviewSession(
        iss="https://ehr.test/fhir",
        patient="p1",
        fhir_user=fhir_user,
        user_name="Dr Test",
        patient_name="",
        patient_birth_date="",
        access_token="token",
        granted_scope="",
        csrf="the-csrf-token",
        expires_at=time.time() + 600,
    )
    return app.extensions["review"].open_session(session)


def test_a_non_ascii_csrf_value_is_refused_not_a_crash(app: Flask) -> None:
    client = app.test_client()
    client.set_cookie(COOKIE, review_session(app, "Practitioner/dr-1"), path="/review")
    answer = client.post("/review/drafts/abc/sign", data={"csrf": "é-not-ascii", "text": "x"})
    assert answer.status_code == 403 and "CSRF" in answer.text


def test_the_review_app_says_temporarily_unavailable_while_redis_is_down(settings: Settings) -> None:
    down = create_app(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    client = down.test_client()
    client.set_cookie(COOKIE, "a-session-id", path="/review")
    for address in ("/review/", "/review/drafts/abc"):
        answer = client.get(address)
        assert answer.status_code == 503 and "temporarily unavailable" in answer.text


PATIENT_TEXT = "Patient Alice Example, MRN 12345"


def crashing_app(settings: Settings) -> Flask:
    app = create_app(settings)

    @app.get("/crash")
    def crash() -> None:
        raise ValueError(PATIENT_TEXT)

    return app


def test_an_unexpected_error_logs_its_id_and_class_only(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    client = crashing_app(settings).test_client()
    with caplog.at_level(logging.INFO, logger="cds_service.errors"):
        answer = client.get("/crash")
    assert answer.status_code == 500 and "Alice" not in answer.text
    logged = [r for r in caplog.records if r.name == "cds_service.errors"]
    text = "\n".join(r.getMessage() for r in logged)
    assert "ValueError" in text and "Alice" not in text and 'File "' not in text
    assert any(getattr(r, "error_id", None) == answer.json["requestId"] for r in logged)


def test_the_frames_are_logged_when_debug_logging_is_asked_for(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    client = crashing_app(settings).test_client()
    with caplog.at_level(logging.DEBUG, logger="cds_service.errors"):
        assert client.get("/crash").status_code == 500
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "cds_service.errors")
    assert 'File "' in text and "in crash" in text and "Alice" not in text
