"""The audit writer: hook audit rows batched off the request path into the durable store."""

from __future__ import annotations

import time

from sqlalchemy import func
from sqlalchemy import select

from cds_service.store import AuditWriter
from cds_service.store import HookAudit
from cds_service.store import Store
from cds_service.store import patient_hash


def test_rows_are_written_in_the_background_and_flushed_on_demand(database_url: str) -> None:
    store = Store(database_url)
    writer = AuditWriter(store)
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
    assert {row.patient_hash for row in rows} == {patient_hash("p-secret")}
    assert all(row.status == 200 and row.cards == 2 for row in rows)


def test_a_database_outage_is_logged_not_raised(caplog) -> None:
    writer = AuditWriter(Store("postgresql+psycopg://nobody@127.0.0.1:1/none"))
    writer.record(
        service_id="s", hook_instance="h", patient_id=None, status=200, outcome="ok", cards=0, latency_ms=1
    )
    writer.flush()  # whichever of flush and the thread takes the row, its failure is logged once
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not caplog.records:
        time.sleep(0.05)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["could not write 1 hook audit records: OperationalError"]
