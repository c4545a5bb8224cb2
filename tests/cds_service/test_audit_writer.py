"""The audit writer: hook audit rows batched off the request path into the durable store."""

from __future__ import annotations

import hashlib
import time

from sqlalchemy import func
from sqlalchemy import select

from cds_service.store import AuditWriter
from cds_service.store import HookAudit
from cds_service.store import Store
from cds_service.store import patient_hash

KEY = b"audit-test-key-0123456789abcdef!"


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
    assert rows[0].patient_hash not in hashlib.sha256(b"p-secret").hexdigest()
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


def test_the_app_audits_with_a_key_derived_from_the_secret(app) -> None:
    from cds_service.settings import purpose_key

    services = app.extensions["cds"]
    derived = purpose_key(services.settings, "audit-patient-hash")
    assert services.audit._patient_hash_key == derived
    assert derived != services.settings.secret_key.get_secret_value().encode()
