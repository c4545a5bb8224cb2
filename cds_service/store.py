"""The durable store (SQLAlchemy 2): feedback and the hook audit trail; survives restarts, unlike Redis."""

from __future__ import annotations

import atexit
import hashlib
import hmac
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import JSON
from sqlalchemy import DateTime
from sqlalchemy import Index
from sqlalchemy import Integer
from sqlalchemy import LargeBinary
from sqlalchemy import String
from sqlalchemy import Text
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import Session
from sqlalchemy.orm import mapped_column
from sqlalchemy.orm import sessionmaker

from cds_service.wire import FeedbackItem

MIGRATIONS = Path(__file__).parent / "migrations"
#: The audit writer flushes when this many rows wait, or AUDIT_FLUSH_S after the first one came.
AUDIT_BATCH_ROWS = 200
AUDIT_FLUSH_S = 0.25
#: The writer thread ends after this long with nothing to write, and starts again on the next row.
AUDIT_IDLE_S = 2.0

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    """Return the current time, timezone-aware UTC."""
    return datetime.now(UTC)


def _sqlite_wal(connection: Any, _record: Any) -> None:
    # WAL lets readers run while one writer commits, and NORMAL sync is durable across process crashes;
    # without it every gunicorn process's write locks the whole file against the others.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def patient_hash(patient_id: str, key: bytes) -> str:
    """Return a keyed one-way hash (HMAC-SHA256) of a patient id, for audit rows that hold no identifiers.

    Keyed, because ids are few and guessable: a bare hash is reversed by hashing every candidate id. Without
    the key (derived from ``MEDGEMMA_CDS_SECRET_KEY``) the audit table links calls to one patient and no more.
    """
    return hmac.new(key, patient_id.encode(), hashlib.sha256).hexdigest()[:32]


class Base(DeclarativeBase):
    """Declarative base of the store's tables."""


class FeedbackRecord(Base):
    """One feedback item an EHR sent for a card (§Feedback)."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    service_id: Mapped[str] = mapped_column(String(128), index=True)
    card_uuid: Mapped[str] = mapped_column(String(128), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    accepted_suggestions: Mapped[list[str]] = mapped_column(JSON, default=list)
    override_reason_code: Mapped[str | None] = mapped_column(String(128))
    override_reason_system: Mapped[str | None] = mapped_column(String(512))
    override_comment: Mapped[str | None] = mapped_column(Text)
    outcome_timestamp: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class HookAudit(Base):
    """One hook call: which service, which hookInstance, whose record (hashed), outcome and latency."""

    __tablename__ = "hook_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    service_id: Mapped[str] = mapped_column(String(128), index=True)
    hook_instance: Mapped[str] = mapped_column(String(64))
    patient_hash: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(64))
    cards: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class Store:
    """Engine, sessions and the queries the service needs; one per app."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        engine_args: dict[str, Any] = {"pool_pre_ping": True}
        if database_url.startswith("sqlite"):
            engine_args["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(database_url, **engine_args)
        if database_url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_wal)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection_url"] = self.url
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Yield a session that commits on success and rolls back on error."""
        with self._sessions.begin() as session:
            yield session

    def ping(self) -> bool:
        """Return True when the database answers."""
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - readiness reports any failure as "not ready"
            return False

    def add_feedback(self, service_id: str, items: list[FeedbackItem]) -> int:
        """Store feedback items for a service; return how many were stored."""
        with self.session() as session:
            for item in items:
                reason = item.override_reason
                session.add(
                    FeedbackRecord(
                        service_id=service_id,
                        card_uuid=item.card,
                        outcome=item.outcome,
                        accepted_suggestions=[s.id for s in item.accepted_suggestions],
                        override_reason_code=reason.reason.code if reason and reason.reason else None,
                        override_reason_system=reason.reason.system if reason and reason.reason else None,
                        override_comment=reason.user_comment if reason else None,
                        outcome_timestamp=item.outcome_timestamp,
                    )
                )
        return len(items)

    def feedback_summary(self) -> dict[str, dict[str, int]]:
        """Return ``{service_id: {"accepted": n, "overridden": n}}`` over all stored feedback."""
        summary: dict[str, dict[str, int]] = {}
        with self.session() as session:
            rows = session.execute(
                select(FeedbackRecord.service_id, FeedbackRecord.outcome, func.count()).group_by(
                    FeedbackRecord.service_id, FeedbackRecord.outcome
                )
            )
            for service_id, outcome, count in rows:
                summary.setdefault(service_id, {"accepted": 0, "overridden": 0})[outcome] = count
        return summary

    def add_hook_audits(self, rows: list[dict[str, Any]]) -> None:
        """Insert hook audit rows in one statement (``AuditWriter`` batches them off the request path)."""
        with self.session() as session:
            session.execute(insert(HookAudit), rows)


Rows = list[dict[str, Any]]


class AuditWriter:
    """Hook audit rows written in batches by a background thread, never on the request path.

    A hook hands its row over and answers; the thread inserts what has gathered every AUDIT_FLUSH_S or at
    AUDIT_BATCH_ROWS rows, so audit writes neither add latency nor serialise requests on the database
    (SQLite takes one writer at a time). At exit (gunicorn's ``worker_exit`` on SIGTERM, SIGINT or SIGQUIT,
    and ``atexit``) ``close`` lets the thread finish the batch it holds and writes what is still queued, so a
    hook that was answered is a row; a database outage is logged and the batch is dropped, never turned into
    a failed hook. An idle thread ends, so a writer (and its store's connection pool) doesn't outlive the app
    that made it.
    """

    def __init__(
        self,
        store: Store,
        patient_hash_key: bytes,
        run_blocking: Callable[[Callable[[Rows], None], Rows], None] | None = None,
    ) -> None:
        self.store = store
        # How the writer runs a batch's database call: in place, or (under gevent, where this "thread" is a
        # greenlet on the request loop) on a real thread, so an insert or a SQLite busy wait never stalls it.
        self._run_blocking = run_blocking or (lambda write, rows: write(rows))
        self._patient_hash_key = patient_hash_key
        self._rows: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._flush_at_exit = False

    def record(
        self,
        *,
        service_id: str,
        hook_instance: str,
        patient_id: str | None,
        status: int,
        outcome: str,
        cards: int,
        latency_ms: float,
    ) -> None:
        """Queue one hook call's audit row; the patient id is kept only as a keyed hash (``patient_hash``)."""
        row = {
            "service_id": service_id,
            "hook_instance": hook_instance,
            "patient_hash": patient_hash(patient_id, self._patient_hash_key) if patient_id else None,
            "status": status,
            "outcome": outcome,
            "cards": cards,
            "latency_ms": latency_ms,
            "created_at": utcnow(),
        }
        if self._closing.is_set():
            # The process is ending and no thread is left to write it: written before the hook answers.
            self._write([row])
            return
        self._rows.put(row)
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        # Started on first use, in the process that serves (gunicorn forks workers after loading nothing).
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()
                if not self._flush_at_exit:
                    # A weak reference: the exit hook must not keep the writer and its store alive.
                    atexit.register(_close_at_exit, weakref.ref(self))
                    self._flush_at_exit = True

    def flush(self) -> int:
        """Write every queued row now; return how many were written."""
        rows: list[dict[str, Any]] = []
        while True:
            try:
                rows.append(self._rows.get_nowait())
            except queue.Empty:
                break
        self._write(rows)
        return len(rows)

    def close(self, timeout_s: float = 10.0) -> int:
        """Write everything before the process ends: the batch the thread holds (it stops gathering and
        writes it), then every queued row; from now on each row is written as it is recorded. Return how
        many queued rows this call wrote."""
        self._closing.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout_s)
        written = 0
        while not self._rows.empty():
            written += self.flush()
        return written

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                rows = [self._rows.get(timeout=AUDIT_IDLE_S)]
            except queue.Empty:
                with self._lock:
                    # Rows put before this check are seen here; any put after it starts a new thread.
                    if self._rows.empty():
                        self._thread = None
                        return
                continue
            deadline = time.monotonic() + AUDIT_FLUSH_S
            while len(rows) < AUDIT_BATCH_ROWS and not self._closing.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    rows.append(self._rows.get(timeout=left))
                except queue.Empty:
                    break
            self._run_blocking(self._write, rows)
        with self._lock:
            self._thread = None

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        try:
            self.store.add_hook_audits(rows)
        except Exception as exc:  # noqa: BLE001 - the audit must not break the clinician's workflow
            log.error("could not write %d hook audit records: %s", len(rows), type(exc).__name__)


def _close_at_exit(writer: weakref.ref[AuditWriter]) -> None:
    alive = writer()
    if alive is not None:
        alive.close()


class Draft(Base):
    """An AI-drafted report awaiting a clinician: draft → signed | rejected; the AI text is kept."""

    __tablename__ = "drafts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # One draft per image content, study, patient and FHIR server: a re-fired hook finds it instead of
    # drafting again, and the same image sent for another patient or by another EHR is another draft.
    source_key: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default="draft")
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    fhir_server: Mapped[str | None] = mapped_column(String(2048))
    # The CDS client that made it: its JWT's issuer and tenant claim (None: authentication disabled).
    issuer: Mapped[str | None] = mapped_column(String(2048))
    tenant: Mapped[str | None] = mapped_column(String(256))
    encounter_id: Mapped[str | None] = mapped_column(String(64))
    requested_by: Mapped[str | None] = mapped_column(String(128))
    study_ref: Mapped[str | None] = mapped_column(String(128))
    image_ref: Mapped[str | None] = mapped_column(String(128))
    job_id: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(String(512))
    model_version: Mapped[str] = mapped_column(String(512))
    input_hashes: Mapped[list[str]] = mapped_column(JSON, default=list)
    evidence: Mapped[list[str]] = mapped_column(JSON, default=list)
    ai_text: Mapped[str] = mapped_column(Text)
    ai_urgency: Mapped[str] = mapped_column(String(16))
    draft_report: Mapped[dict[str, Any]] = mapped_column(JSON)
    ai_provenance: Mapped[dict[str, Any]] = mapped_column(JSON)
    image_png: Mapped[bytes | None] = mapped_column(LargeBinary)
    # What the worker read (wire.ImageRead): study, series, instance, frame, DICOMweb root.
    image_read: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    signed_text: Mapped[str | None] = mapped_column(Text)
    signed_by: Mapped[str | None] = mapped_column(String(128))
    signed_by_name: Mapped[str | None] = mapped_column(String(256))
    signed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Who vouched for the signer: the draft API's JWT issuer, or the SMART launch's FHIR server.
    signed_by_issuer: Mapped[str | None] = mapped_column(String(2048))
    final_report: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    writeback: Mapped[str | None] = mapped_column(String(512))
    writeback_error: Mapped[str | None] = mapped_column(String(512))
    # pending | written | failed (needs attention); None: no write-back server, kept in the store only.
    writeback_state: Mapped[str | None] = mapped_column(String(16), index=True)
    reject_reason: Mapped[str | None] = mapped_column(Text)
    rejected_by: Mapped[str | None] = mapped_column(String(128))
    rejected_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_drafts_issuer_patient", "issuer", "patient_id"),)


class WriteBackOutbox(Base):
    """A signed report to write to the EHR: queued in the sign's own transaction, delivered until it is
    written or fails for good (the draft's ``writeback_state`` says which); one row per draft."""

    __tablename__ = "writeback_outbox"

    draft_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    base_url: Mapped[str] = mapped_column(String(2048))
    # The bearer token to write with (the clinician's, or the configured one), encrypted (Fernet).
    sealed_token: Mapped[bytes | None] = mapped_column(LargeBinary)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Due time of the next attempt; a delivery in progress pushes it forward, so one process takes it.
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
