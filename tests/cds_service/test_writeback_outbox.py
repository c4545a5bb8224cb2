"""Write-back that can't strand: the signed report is queued in the sign's transaction and written until the
EHR takes it, once, whatever the EHR or the database does meanwhile.

An EHR stub on loopback answers each transaction as scripted (200 with a body that is not a
transaction-response, 500, a timeout, then accepts) and keeps what it stored, so the identifier search of a
retry finds a report an earlier attempt wrote. The store is a PostgreSQL database of each test's own, whose
connections a test terminates in the middle of a delivery.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from http.server import ThreadingHTTPServer
from typing import Any

import httpx
import psycopg
import pytest
from flask import Flask
from support import PG_ADMIN_URL
from support import FhirStubHandler
from support import Issuer
from support import postgres_database
from support import record_draft

from cds_service.app import create_app
from cds_service.drafts import DraftService
from cds_service.errors import ServiceUnavailable
from cds_service.review.routes import COOKIE
from cds_service.review.sessions import ReviewSession
from cds_service.settings import Settings
from cds_service.store import Store
from cds_service.store import WriteBackOutbox

SIGN = {"text": "IMPRESSION:\nClear.", "practitioner": "Practitioner/dr-1", "practitionerName": "Dr One"}


@dataclass
class Ehr:
    """What the EHR stub stored and was sent, and how it answers the next transactions."""

    url: str = ""
    script: list[str] = field(default_factory=list)  # per transaction: wrong-body | 500 | timeout | accept
    stored: list[str] = field(default_factory=list)  # draft identifiers of the reports it keeps
    posts: int = 0
    on_post: Callable[[], None] = lambda: None


@pytest.fixture
def ehr() -> Iterator[Ehr]:
    state = Ehr()
    lock = threading.Lock()

    class Handler(FhirStubHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.startswith("/fhir/Patient/"):
                self._answer(200, {"resourceType": "Patient", "id": "p1"})
                return
            draft = self.path.rsplit("%7C", 1)[-1].rsplit("|", 1)[-1]
            entries = [
                {"resource": {"resourceType": "DiagnosticReport", "id": f"r-{draft}"}}
                for stored in state.stored
                if stored == draft
            ]
            self._answer(200, {"resourceType": "Bundle", "type": "searchset", "entry": entries})

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            bundle = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            draft = bundle["entry"][0]["resource"]["identifier"][0]["value"]
            with lock:
                state.posts += 1
                how = state.script.pop(0) if state.script else "accept"
            state.on_post()
            if how == "timeout":
                time.sleep(3)
                return
            if how == "500":
                self._answer(500, {"resourceType": "OperationOutcome"})
                return
            state.stored.append(draft)  # it wrote the report, whatever it answers
            if how == "wrong-body":
                self._answer(200, {"resourceType": "OperationOutcome", "issue": []})
                return
            response = {"status": "201", "location": f"DiagnosticReport/r-{draft}/_history/1"}
            entries = [{"response": response}] * 3
            self._answer(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": entries})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/fhir"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state
    server.shutdown()


@pytest.fixture
def database() -> Iterator[str]:
    with postgres_database() as url:
        yield url


def quick(**extra: Any) -> Settings:
    """Retries every second, FHIR calls bounded at a second (a delivery's lease is then a few seconds)."""
    return Settings(
        secret_key="write-back-test-secret-0123456789abcdef",
        writeback_retry_s=1,
        fhir_timeout_s=1,
        fhir_connect_timeout_s=1,
        **extra,
    )


def until(check: Callable[[], bool], timeout_s: float = 40) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.2)


def test_a_retried_write_back_reaches_the_ehr_once_through_every_kind_of_failure(
    database: str, ehr: Ehr
) -> None:
    drafts = DraftService(Store(database), quick(fhir_writeback_url=ehr.url), httpx.Client(timeout=1))
    draft = record_draft(drafts, "p1", ehr.url, image_hash=uuid.uuid4().hex)
    # The server doesn't take it (500), doesn't answer in time, then takes it.
    ehr.script = ["500", "timeout", "accept"]
    signed = drafts.sign(draft.id, "IMPRESSION:\nok", "Practitioner/a", "Dr A", None, vouched_by="x")
    assert signed.status == "signed" and signed.writeback_state == "pending"
    assert signed.writeback_error == "the FHIR server did not take the signed report (500)"
    deadline = time.monotonic() + 40
    while drafts.get(draft.id).writeback_state == "pending" and time.monotonic() < deadline:
        drafts.deliver_due()
        time.sleep(0.2)
    final = drafts.get(draft.id)
    assert final.writeback_state == "written" and final.writeback == f"DiagnosticReport/r-{draft.id}"
    assert final.writeback_error is None
    assert ehr.stored == [draft.id] and ehr.posts == 3
    with Store(database).session() as session:
        assert session.get(WriteBackOutbox, draft.id) is None


def test_an_answer_that_is_not_a_transaction_response_is_retried_and_never_written_twice(
    database: str, ehr: Ehr
) -> None:
    drafts = DraftService(Store(database), quick(fhir_writeback_url=ehr.url), httpx.Client(timeout=1))
    draft = record_draft(drafts, "p1", ehr.url, image_hash=uuid.uuid4().hex)
    ehr.script = ["wrong-body"]
    signed = drafts.sign(draft.id, "IMPRESSION:\nok", "Practitioner/a", "Dr A", None, vouched_by="x")
    assert signed.writeback_state == "pending"
    assert "not with a transaction-response" in (signed.writeback_error or "")
    until(lambda: drafts.deliver_due() > 0 or drafts.get(draft.id).writeback_state != "pending")
    assert drafts.get(draft.id).writeback_state == "written"
    # The retry found the report the first answer hid, by its identifier: one report, one transaction.
    assert ehr.stored == [draft.id] and ehr.posts == 1


def test_postgresql_cut_in_the_middle_of_a_write_back_loses_nothing_and_writes_once(
    database: str, ehr: Ehr
) -> None:
    name = database.rsplit("/", 1)[1]

    def cut_postgresql() -> None:
        # While the EHR takes the report, the store's database stops taking connections and loses its own.
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )

    ehr.on_post = cut_postgresql
    drafts = DraftService(Store(database), quick(fhir_writeback_url=ehr.url), httpx.Client(timeout=1))
    draft = record_draft(drafts, "p1", ehr.url, image_hash=uuid.uuid4().hex)
    with pytest.raises(ServiceUnavailable, match="the report is queued"):
        drafts.sign(draft.id, "IMPRESSION:\nok", "Practitioner/a", "Dr A", None, vouched_by="x")
    assert ehr.stored == [draft.id]  # the EHR has it; the store could not record that
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    ehr.on_post = lambda: None
    current = drafts.get(draft.id)
    assert current.status == "signed" and current.writeback_state == "pending"  # signed, queued, not lost
    until(lambda: drafts.deliver_due() > 0 and drafts.get(draft.id).writeback_state != "pending")
    assert drafts.get(draft.id).writeback_state == "written"
    assert drafts.get(draft.id).writeback == f"DiagnosticReport/r-{draft.id}"
    assert ehr.stored == [draft.id] and ehr.posts == 1


def test_the_draft_api_the_page_and_metrics_say_where_a_signed_report_is(
    settings: Settings, database: str, ehr: Ehr, issuer: Issuer
) -> None:
    configured = settings.model_copy(
        update={"database_url": database, "fhir_writeback_url": ehr.url, "writeback_retry_s": 1}
    )
    app: Flask = create_app(configured)
    client = app.test_client()
    drafts = app.extensions["cds"].drafts

    def sign(draft_id: str) -> dict[str, Any]:
        path = f"/drafts/{draft_id}/sign"
        answer = client.post(path, json=SIGN, headers=issuer.headers(path))
        assert answer.status_code == 200, answer.json
        return dict(answer.json)

    def view(draft_id: str) -> dict[str, Any]:
        return dict(client.get(f"/drafts/{draft_id}", headers=issuer.headers(f"/drafts/{draft_id}")).json)

    pending = record_draft(drafts, "p1", None, image_hash=uuid.uuid4().hex)
    ehr.script = ["500"]
    assert sign(pending.id)["writeBack"] == "pending"
    assert view(pending.id)["writeBackError"] == "the FHIR server did not take the signed report (500)"
    metrics = client.get("/metrics").text
    assert 'medgemma_cds_writeback_reports{state="pending"} 1.0' in metrics

    outbox = app.extensions["cds"].outbox
    outbox.start()  # what `serve` starts in each worker
    try:
        until(lambda: view(pending.id)["writeBack"] == "written")
    finally:
        outbox.stop()
    assert view(pending.id)["writtenTo"] == f"DiagnosticReport/r-{pending.id}"
    metrics = client.get("/metrics").text
    assert 'medgemma_cds_writeback_reports{state="written"} 1.0' in metrics
    assert 'medgemma_cds_writeback_reports{state="pending"} 0.0' in metrics


def test_the_review_page_shows_pending_with_the_last_error_and_failed_with_a_retry(
    settings: Settings, database: str, ehr: Ehr
) -> None:
    app = create_app(settings.model_copy(update={"database_url": database, "fhir_writeback_url": ehr.url}))
    drafts = app.extensions["cds"].drafts
    client = app.test_client()
    session = ReviewSession(
        iss=ehr.url,
        patient="p1",
        fhir_user="Practitioner/dr-1",
        user_name="Dr One",
        patient_name="",
        patient_birth_date="",
        access_token="token",
        granted_scope="",  # no write scope: the configured write-back server is used
        csrf="the-csrf-token",
        expires_at=time.time() + 600,
    )
    client.set_cookie(COOKIE, app.extensions["review"].open_session(session), path="/review")
    draft = record_draft(drafts, "p1", ehr.url, image_hash=uuid.uuid4().hex)

    ehr.script = ["500"]
    page = client.post(f"/review/drafts/{draft.id}/sign", data={"csrf": "the-csrf-token", "text": "ok"}).text
    assert 'id="write-pending"' in page and "did not take the signed report (500)" in page
    assert 'id="retry-form"' in page

    ehr.script = []
    page = client.post(f"/review/drafts/{draft.id}/write-back", data={"csrf": "the-csrf-token"}).text
    assert 'id="written"' in page and f"DiagnosticReport/r-{draft.id}" in page
    assert 'id="retry-form"' not in page and ehr.posts == 2 and ehr.stored == [draft.id]
