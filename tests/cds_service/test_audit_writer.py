"""The audit writer: hook audit rows batched off the request path into the durable store."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func
from sqlalchemy import select
from support import Issuer
from support import RedisServer
from support import free_port
from support import postgres_database
from support import service_env
from support import wait_for_http

from cds_service.settings import purpose_key
from cds_service.store import AuditWriter
from cds_service.store import HookAudit
from cds_service.store import Store
from cds_service.store import patient_hash

KEY = b"audit-test-key-0123456789abcdef!"
SUMMARY = "/cds-services/patient-summary"


def test_rows_are_written_in_the_background_with_the_patient_keyed(database_url: str) -> None:
    store = Store(database_url)
    writer = AuditWriter(store, KEY)
    for n in range(5):
        writer.record(
            service_id="patient-summary",
            hook_instance=f"audit-writer-{n}",
            patient_id="p-secret",
            status=200,
            outcome="ok",
            cards=2,
            latency_ms=3.5,
        )
    # No flush asked for: the thread writes the batch within its interval.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with store.session() as session:
            rows = session.scalars(
                select(HookAudit).where(HookAudit.hook_instance.like("audit-writer-%"))
            ).all()
        if len(rows) == 5:
            break
        time.sleep(0.1)
    assert len(rows) == 5
    assert {row.patient_hash for row in rows} == {patient_hash("p-secret", KEY)}
    # Keyed: hashing guessed ids without the key finds nothing.
    assert rows[0].patient_hash != hashlib.sha256(b"p-secret").hexdigest()[:32]
    assert all(row.status == 200 and row.cards == 2 for row in rows)


# A process that records rows and ends while its writer holds them: queued, and taken by the thread into a
# batch it is still gathering (the first row wakes it; the process ends inside AUDIT_FLUSH_S).
EXITING = """
import sys, time
from cds_service.store import AuditWriter, Store
writer = AuditWriter(Store(sys.argv[1]), b"k" * 32)
def row(n):
    writer.record(service_id="s", hook_instance=f"{sys.argv[2]}-{n}", patient_id=None, status=200,
                  outcome="ok", cards=0, latency_ms=1.0)
row(0)
time.sleep(0.05)  # the thread has taken row 0 and gathers more
for n in range(1, 5):
    row(n)
"""


def test_a_process_that_ends_writes_the_batch_in_flight_and_the_queue(database_url: str) -> None:
    tag = f"exiting-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [sys.executable, "-c", EXITING, database_url, tag], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    with Store(database_url).session() as session:
        written = session.scalar(
            select(func.count()).select_from(HookAudit).where(HookAudit.hook_instance.like(f"{tag}-%"))
        )
    assert written == 5


def test_a_database_outage_is_logged_not_raised(caplog) -> None:
    writer = AuditWriter(Store("postgresql+psycopg://nobody@127.0.0.1:1/none"), KEY)
    writer.record(
        service_id="s", hook_instance="h", patient_id=None, status=200, outcome="ok", cards=0, latency_ms=1
    )
    writer.flush()  # whichever of flush and the thread takes the row, its failure is logged once
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not caplog.records:
        time.sleep(0.05)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["could not write 1 hook audit records: OperationalError"]


def test_patient_hash_depends_on_the_key() -> None:
    assert patient_hash("p-secret", KEY) == patient_hash("p-secret", KEY)
    assert patient_hash("p-secret", KEY) != patient_hash("p-secret", b"another-key")
    assert patient_hash("p-secret", KEY) != patient_hash("p-other", KEY)
    assert len(patient_hash("p-secret", KEY)) == 32


def test_a_hook_call_is_audited_under_a_hash_keyed_from_the_secret(
    app, client, issuer, hook_body, settings
) -> None:
    patient_id = f"p-audit-{uuid.uuid4().hex[:8]}"
    # Every key sent as null (the client found nothing): the rule card only, no model job.
    prefetch = dict.fromkeys(["patient", "conditions", "medications", "allergies", "observations"])
    body = hook_body("patient-view", patient_id, prefetch=prefetch)
    assert client.post(SUMMARY, json=body, headers=issuer.headers(SUMMARY)).status_code == 200
    app.extensions["cds"].audit.flush()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with Store(settings.database_url).session() as session:
            row = session.scalars(
                select(HookAudit).where(HookAudit.hook_instance == body["hookInstance"])
            ).first()
        if row is not None:
            break
        time.sleep(0.1)
    assert row is not None
    assert row.patient_hash == patient_hash(patient_id, purpose_key(settings, "audit-patient-hash"))
    assert row.patient_hash != hashlib.sha256(patient_id.encode()).hexdigest()[:32]
    assert patient_id not in row.patient_hash


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT], ids=lambda s: s.name)
def test_a_served_instance_stopped_under_load_audits_every_answered_hook(
    stop: signal.Signals, redis_server: RedisServer, issuer: Issuer, tmp_path: Path
) -> None:
    with postgres_database() as database_url:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = service_env(database_url, redis_server.new_database(), issuer, url)
        log = tmp_path / "serve.log"
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "medgemma-cds"),
                "serve",
                "--port",
                str(port),
                "--workers",
                "2",
            ],
            env=env | {"MEDGEMMA_CDS_HOOK_BUDGET_MS": "0"},
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_http(f"{url}/healthz")
            answered: list[str] = []
            stopped = threading.Event()
            prefetch = dict.fromkeys(["patient", "conditions", "medications", "allergies", "observations"])

            def keep_calling() -> None:
                with httpx.Client(timeout=10) as http:
                    while True:
                        body = {
                            "hook": "patient-view",
                            "hookInstance": str(uuid.uuid4()),
                            "context": {"userId": "Practitioner/p1", "patientId": "p1"},
                            "prefetch": prefetch,
                        }
                        headers = {"Authorization": f"Bearer {issuer.token(url + SUMMARY)}"}
                        try:
                            if http.post(url + SUMMARY, json=body, headers=headers).status_code == 200:
                                answered.append(body["hookInstance"])
                        except httpx.HTTPError:
                            if stopped.is_set():
                                return
                            time.sleep(0.01)

            callers = [threading.Thread(target=keep_calling) for _ in range(6)]
            for caller in callers:
                caller.start()
            deadline = time.monotonic() + 30
            while len(answered) < 150 and time.monotonic() < deadline:
                time.sleep(0.05)
            process.send_signal(stop)  # to gunicorn's master, as a supervisor or Ctrl-C sends it
            assert process.wait(timeout=60) is not None
            stopped.set()
            for caller in callers:
                caller.join(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
        assert len(answered) >= 150, log.read_text()[-2000:]
        with Store(database_url).session() as session:
            audited = set(session.scalars(select(HookAudit.hook_instance)))
        assert set(answered) <= audited, f"{len(set(answered) - audited)} answered hooks not audited"
