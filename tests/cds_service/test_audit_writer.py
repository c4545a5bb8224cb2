"""The audit writer: hook audit rows batched off the request path into the durable store."""

from __future__ import annotations

import hashlib
import time
import uuid

from sqlalchemy import func
from sqlalchemy import select

from cds_service.settings import purpose_key
from cds_service.store import AuditWriter
from cds_service.store import HookAudit
from cds_service.store import Store
from cds_service.store import patient_hash

KEY = b"audit-test-key-0123456789abcdef!"
SUMMARY = "/cds-services/patient-summary"


def test_rows_are_written_in_the_background_and_flushed_on_demand(database_url: str) -> None:
    store = Store(database_url)
    writer = AuditWriter(store, KEY)
    with store.session() as session:
        before = session.scalar(select(func.count()).select_from(HookAudit))
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
    writer.flush()
    # The background thread may have taken some; give it its flush interval.
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
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(HookAudit)) == before + 5
    assert {row.patient_hash for row in rows} == {patient_hash("p-secret", KEY)}
    # Keyed: hashing guessed ids without the key finds nothing.
    assert rows[0].patient_hash != hashlib.sha256(b"p-secret").hexdigest()[:32]
    assert all(row.status == 200 and row.cards == 2 for row in rows)


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
