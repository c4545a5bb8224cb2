"""Drafts of AI reports in the durable store, and the clinician's sign-off or rejection.

A draft belongs to the CDS client that made it (its JWT's issuer and tenant), one patient and one FHIR
server, and is created once per image there (idempotent on the image's content, study, patient, server and
owner). The draft API reads and decides only its own issuer's drafts.

Signing turns it into a final DiagnosticReport with the clinician as results interpreter, once, on every
store (an atomic conditional update), and queues it in the write-back outbox in the same transaction. It is
written, with the AI's and the clinician's Provenance, to the EHR's FHIR server with the clinician's own
token (or the configured write-back server) at once, and retried from the outbox (``OutboxSweeper``) until
written; a retry never writes twice (a conditional create on the report's identifier). The draft always
says where its report is: written, pending (with the last error) or failed (needs a person). Rejecting
writes nothing.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from typing import Any
from typing import Literal

import httpx
from cryptography.fernet import Fernet
from cryptography.fernet import InvalidToken
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydantic import BaseModel
from pydantic import Field
from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.exc import SQLAlchemyError

from cds_service.errors import Conflict
from cds_service.errors import NotFound
from cds_service.errors import ServiceUnavailable
from cds_service.settings import Settings
from cds_service.settings import purpose_key
from cds_service.store import Draft
from cds_service.store import Store
from cds_service.store import WriteBackOutbox
from cds_service.store import utcnow
from cds_service.wire import ImageRead
from cds_service.wire import JobRecord
from fhir_mappings.ai_cards import model_identifier
from fhir_mappings.model_outputs import ImagingReadOutput
from fhir_mappings.reports import DRAFT_IDENTIFIER_SYSTEM
from fhir_mappings.reports import ai_provenance
from fhir_mappings.reports import draft_id_uuid
from fhir_mappings.reports import draft_report
from fhir_mappings.reports import read_entities
from fhir_mappings.reports import report_text
from fhir_mappings.reports import signed_report
from fhir_mappings.reports import writeback_bundle

log = logging.getLogger(__name__)
#: A write-back that keeps failing without a refusal is given up (failed, needs attention) after this many.
MAX_WRITEBACK_ATTEMPTS = 10
MAX_WRITEBACK_DELAY_S = 600


@dataclass(frozen=True)
class DraftOwner:
    """The CDS client a draft belongs to: its JWT's ``iss`` and ``tenant`` (both None: auth disabled)."""

    issuer: str | None
    tenant: str | None = None

    @classmethod
    def of(cls, claims: Mapping[str, Any]) -> DraftOwner:
        """Return the owner named by a verified JWT's claims."""
        issuer, tenant = claims.get("iss"), claims.get("tenant")
        return cls(issuer if isinstance(issuer, str) else None, tenant if isinstance(tenant, str) else None)


def source_key(
    image_hash: str, study: str | None, patient_id: str, fhir_server: str | None, owner: DraftOwner
) -> str:
    """Return the idempotency key of a draft: the image's content, its study, patient, server and owner."""
    material = [image_hash, study or "", patient_id, (fhir_server or "").rstrip("/")]
    if owner.issuer is not None:
        material += [owner.issuer, owner.tenant or ""]
    return hashlib.sha256("|".join(material).encode()).hexdigest()


@dataclass(frozen=True)
class WriteTarget:
    """Where a signed report is written: a FHIR base and the bearer token to write with."""

    base_url: str
    token: str | None


class WriteBackFailed(Exception):
    """The FHIR server did not take the signed report; ``status`` is its HTTP answer (None: unreachable)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status

    @property
    def permanent(self) -> bool:
        """Whether retrying can't help: a refusal or rejection (4xx but timeout and rate limit) needs a
        person (a fresh token, a fixed record); no answer or a server error is retried."""
        return self.status is not None and 400 <= self.status < 500 and self.status not in (408, 429)


class _Location(BaseModel):
    location: str


class _Entry(BaseModel):
    response: _Location


class TransactionResponse(BaseModel):
    """What a write-back reads of the EHR's answer: a Bundle transaction-response with a location."""

    resourceType: Literal["Bundle"]
    type: Literal["transaction-response"]
    entry: list[_Entry] = Field(min_length=1)


def impression_of(text: str) -> str:
    """Return the impression section of a report text, or the whole text when it has none."""
    _, marker, impression = text.partition("IMPRESSION:")
    return (impression if marker else text).strip()[:2000] or text.strip()[:2000]


class DraftService:
    """Creates, lists, signs and rejects drafts; writes signed reports back to FHIR when configured."""

    def __init__(self, store: Store, settings: Settings, http: httpx.Client) -> None:
        self.store = store
        self.settings = settings
        self.http = http
        # Tokens wait in the outbox encrypted, keyed from the shared secret (every API process reads them).
        self._box = Fernet(base64.urlsafe_b64encode(purpose_key(settings, "writeback-token")))

    def record(
        self,
        *,
        job: JobRecord,
        output: ImagingReadOutput,
        image_hash: str,
        image_read: ImageRead | None,
        image_png: bytes | None,
        study: str | None,
        image_ref: str,
        patient_id: str,
        fhir_server: str | None,
        owner: DraftOwner,
        encounter_id: str | None,
        requested_by: str,
        evidence: list[str],
    ) -> Draft:
        """Return the draft for this image of this patient, made from the finished job the first time.

        ``image_read`` (what the worker read: study, series, instance) names the study and the instance in
        the report and its Provenance; ``image_png`` is the picture the model saw.
        """
        key = source_key(image_hash, study, patient_id, fhir_server, owner)
        existing = self.find(key)
        if existing is not None:
            return existing
        draft_id = uuid.uuid4().hex
        now = utcnow()
        report = draft_report(
            output,
            draft_id=draft_id,
            patient_id=patient_id,
            encounter_id=encounter_id,
            study=study,
            media=image_ref,
            issued=now,
            study_uid=image_read.study_uid if image_read else None,
        )
        target = f"urn:uuid:{draft_id_uuid(draft_id)}"
        model = model_identifier(job.model)
        entities = read_entities(study, image_ref, image_read)
        provenance = ai_provenance(target, model, job.model_version or "unknown", now, entities)
        draft = Draft(
            id=draft_id,
            source_key=key,
            status="draft",
            patient_id=patient_id,
            fhir_server=(fhir_server or "").rstrip("/") or None,
            issuer=owner.issuer,
            tenant=owner.tenant,
            encounter_id=encounter_id,
            requested_by=requested_by,
            study_ref=study,
            image_ref=image_ref,
            job_id=job.id,
            model_id=model,
            model_version=job.model_version or "unknown",
            input_hashes=[image_hash],
            evidence=evidence,
            ai_text=report_text(output.findings, output.impression),
            ai_urgency=output.urgency,
            draft_report=report.model_dump(mode="json", exclude_none=True),
            ai_provenance=provenance.model_dump(mode="json", exclude_none=True),
            image_png=image_png,
            image_read=image_read.model_dump(mode="json", exclude_none=True) if image_read else None,
            created_at=now,
        )
        try:
            with self.store.session() as session:
                session.add(draft)
        except IntegrityError:
            # Two hooks for the same image raced; the other one's draft stands.
            found = self.find(key)
            if found is None:
                raise
            return found
        return draft

    def find(self, key: str) -> Draft | None:
        """Return the draft with this source key, or None."""
        with self.store.session() as session:
            return session.scalars(select(Draft).where(Draft.source_key == key)).first()

    def get(self, draft_id: str, owner: DraftOwner | None = None) -> Draft:
        """Return a draft (of ``owner``, when one is given); 404 when there is none, or it is another's.

        The review app passes no owner: it checks the draft's FHIR server and patient against the launch.
        """
        with self.store.session() as session:
            draft = session.get(Draft, draft_id)
        if draft is None or (owner is not None and not owns(owner, draft)):
            raise NotFound("no such draft")
        return draft

    def list(
        self,
        patient_id: str | None,
        status: str | None,
        limit: int = 100,
        *,
        owner: DraftOwner | None = None,
        fhir_server: str | None = None,
    ) -> list[Draft]:
        """Return drafts for a worklist, newest first, filtered by patient and status, and by owner (the
        draft API) or FHIR server (the review app)."""
        query = select(Draft).order_by(Draft.created_at.desc()).limit(limit)
        if owner is not None:
            issuer, tenant = Draft.issuer.is_not_distinct_from, Draft.tenant.is_not_distinct_from
            query = query.where(issuer(owner.issuer), tenant(owner.tenant))
        if fhir_server is not None:
            query = query.where(Draft.fhir_server == fhir_server.rstrip("/"))
        if patient_id:
            query = query.where(Draft.patient_id == patient_id)
        if status:
            query = query.where(Draft.status == status)
        with self.store.session() as session:
            return list(session.scalars(query))

    def sign(
        self,
        draft_id: str,
        text: str,
        practitioner: str,
        practitioner_name: str,
        target: WriteTarget | None,
        *,
        vouched_by: str | None,
        owner: DraftOwner | None = None,
    ) -> Draft:
        """Sign a draft once and write the final report to ``target`` (else the configured write-back).

        ``vouched_by`` is who authenticated the signer (the JWT issuer, or the SMART launch's FHIR server);
        it is recorded with them. ``owner``: only a draft of this owner may be signed (the draft API).

        Signing is one conditional update (status draft → signed), so two concurrent first signs, on any
        store, sign once; the report to write goes into the outbox in the same transaction, so a signed
        report is never without its write-back, whatever fails after the commit. It is then delivered at
        once (``deliver``), and retried from the outbox until written or failed for good. A patient gone
        from the server (404/410) refuses the sign and changes nothing.
        """
        draft = self.get(draft_id, owner)
        if draft.status == "rejected":
            raise Conflict("this draft was rejected; it cannot be signed")
        if draft.status == "signed":
            return draft
        destination = self._destination(target)
        if destination is not None:
            # A patient gone raises Conflict before anything is signed; any other problem is the delivery's.
            with contextlib.suppress(WriteBackFailed):
                self._patient_problem(draft, destination)
        now = utcnow()
        final = signed_report(
            draft.draft_report, text, impression_of(text), practitioner, practitioner_name, now
        )
        with self.store.session() as session:
            claimed = session.execute(
                update(Draft)
                .where(Draft.id == draft_id, Draft.status == "draft")
                .values(
                    status="signed",
                    signed_text=text,
                    signed_by=practitioner,
                    signed_by_name=practitioner_name,
                    signed_by_issuer=vouched_by,
                    signed_at=now,
                    final_report=final.model_dump(mode="json", exclude_none=True),
                    writeback_state="pending" if destination is not None else None,
                )
            ).rowcount
            if claimed and destination is not None:
                session.add(self._outbox_row(draft_id, destination, now))
        if not claimed:
            # Someone else signed or rejected it in between: their decision stands.
            current = self.get(draft_id)
            if current.status == "rejected":
                raise Conflict("this draft was rejected; it cannot be signed")
            return current
        try:
            if destination is not None:
                self.deliver(draft_id)
            return self.get(draft_id)
        except SQLAlchemyError as exc:
            # Signed and queued in one commit: the outbox sweep writes it once the database answers.
            log.warning("write-back deferred to the outbox: %s", type(exc).__name__)
            raise ServiceUnavailable(
                "the store stopped answering after the signature was saved; the report is queued for the "
                "record: reload in a moment"
            ) from None

    def retry_write_back(self, draft_id: str, target: WriteTarget | None) -> Draft:
        """Write a signed report that is not in the record yet, now (with ``target``'s fresh token, else the
        configured write-back); a written one is left as it is."""
        draft = self.get(draft_id)
        if draft.status != "signed":
            raise Conflict("only a signed draft can be written to the record")
        destination = self._destination(target)
        if draft.writeback_state == "written" or destination is None:
            return draft
        with self.store.session() as session:
            session.merge(self._outbox_row(draft_id, destination, utcnow()))
            session.execute(update(Draft).where(Draft.id == draft_id).values(writeback_state="pending"))
        self.deliver(draft_id)
        return self.get(draft_id)

    def deliver(self, draft_id: str) -> str | None:
        """Try once to write a queued report, if it is due and no other process is writing it; return its
        write-back state after (None: nothing was due). Never raises for the EHR's answer: a failure is
        recorded on the draft (pending with the last error, or failed when retrying can't help)."""
        now = utcnow()
        with self.store.session() as session:
            # Claimed by pushing the due time past a delivery's length: one process writes it at a time.
            claimed = session.execute(
                update(WriteBackOutbox)
                .where(WriteBackOutbox.draft_id == draft_id, WriteBackOutbox.next_attempt_at <= now)
                .values(next_attempt_at=now + timedelta(seconds=self._lease_s()))
            ).rowcount
            row = session.get(WriteBackOutbox, draft_id) if claimed else None
        if row is None:
            return None
        target = WriteTarget(row.base_url, self._unseal(row.sealed_token))
        draft = self.get(draft_id)
        attempts = row.attempts + 1
        try:
            self._patient_problem(draft, target, during_sign=False)
            location = self._write_back(draft, target)
        except WriteBackFailed as failed:
            log.warning("write-back failed", extra={"status": failed.status, "attempt": attempts})
            gives_up = failed.permanent or attempts >= MAX_WRITEBACK_ATTEMPTS
            self._record_attempt(draft_id, attempts, failed.reason, "failed" if gives_up else "pending")
            return "failed" if gives_up else "pending"
        with self.store.session() as session:
            session.execute(
                update(Draft)
                .where(Draft.id == draft_id)
                .values(writeback=location, writeback_error=None, writeback_state="written")
            )
            session.execute(delete(WriteBackOutbox).where(WriteBackOutbox.draft_id == draft_id))
        return "written"

    def deliver_due(self, limit: int = 20) -> int:
        """Try every queued report whose attempt is due (the outbox sweep); return how many were tried."""
        with self.store.session() as session:
            due = list(
                session.scalars(
                    select(WriteBackOutbox.draft_id)
                    .where(WriteBackOutbox.next_attempt_at <= utcnow())
                    .order_by(WriteBackOutbox.next_attempt_at)
                    .limit(limit)
                )
            )
        return sum(1 for draft_id in due if self.deliver(draft_id) is not None)

    def write_back_counts(self) -> dict[str, int]:
        """Return how many signed reports are written, pending and failed (for /metrics)."""
        counts = dict.fromkeys(("written", "pending", "failed"), 0)
        with self.store.session() as session:
            rows = session.execute(
                select(Draft.writeback_state, func.count())
                .where(Draft.writeback_state.is_not(None))
                .group_by(Draft.writeback_state)
            )
            counts.update({state: count for state, count in rows})
        return counts

    def _lease_s(self) -> float:
        # Longer than a delivery can take (three FHIR calls, each within its timeouts), and at least the
        # retry interval: a process that died mid-delivery leaves its row to the next sweep after it.
        settings = self.settings
        return max(
            settings.writeback_retry_s, 3 * (settings.fhir_timeout_s + settings.fhir_connect_timeout_s)
        )

    def _outbox_row(self, draft_id: str, target: WriteTarget, due: datetime) -> WriteBackOutbox:
        sealed = self._box.encrypt(target.token.encode()) if target.token else None
        return WriteBackOutbox(
            draft_id=draft_id, base_url=target.base_url, sealed_token=sealed, attempts=0, next_attempt_at=due
        )

    def _unseal(self, sealed: bytes | None) -> str | None:
        if sealed is None:
            return None
        try:
            return self._box.decrypt(sealed).decode()
        except InvalidToken:
            # Sealed under another MEDGEMMA_CDS_SECRET_KEY: written without it; the EHR says whether it may.
            return None

    def _record_attempt(self, draft_id: str, attempts: int, error: str, state: str) -> None:
        delay = min(self.settings.writeback_retry_s * 2 ** (attempts - 1), MAX_WRITEBACK_DELAY_S)
        with self.store.session() as session:
            session.execute(
                update(Draft).where(Draft.id == draft_id).values(writeback_error=error, writeback_state=state)
            )
            if state == "failed":
                session.execute(delete(WriteBackOutbox).where(WriteBackOutbox.draft_id == draft_id))
            else:
                session.execute(
                    update(WriteBackOutbox)
                    .where(WriteBackOutbox.draft_id == draft_id)
                    .values(attempts=attempts, next_attempt_at=utcnow() + timedelta(seconds=delay))
                )

    def _destination(self, target: WriteTarget | None) -> WriteTarget | None:
        # The clinician's own token on the launching EHR first; the configured server is the fallback for
        # EHRs that grant the app no write scope.
        if target is not None:
            return target
        if self.settings.fhir_writeback_url:
            token = self.settings.fhir_writeback_token
            return WriteTarget(self.settings.fhir_writeback_url, token.get_secret_value() if token else None)
        return None

    def _patient_problem(self, draft: Draft, target: WriteTarget, *, during_sign: bool = True) -> None:
        """Check that the patient answers 200 on the target before a write goes ahead.

        A patient that is gone raises Conflict while signing (nothing is signed) and fails the write-back
        for good after; any other answer is a WriteBackFailed to retry.
        """
        try:
            answer = self.http.get(
                f"{target.base_url.rstrip('/')}/Patient/{draft.patient_id}", headers=_headers(target)
            )
        except httpx.HTTPError:
            raise WriteBackFailed("the FHIR server was unreachable") from None
        if answer.status_code in (404, 410):
            if during_sign:
                raise Conflict("the patient no longer exists on the FHIR server; nothing was written")
            raise WriteBackFailed("the patient no longer exists on the FHIR server", answer.status_code)
        if answer.status_code != 200:
            raise WriteBackFailed(
                f"the FHIR server answered {answer.status_code} reading the patient", answer.status_code
            )

    def reject(
        self, draft_id: str, reason: str, rejected_by: str, *, owner: DraftOwner | None = None
    ) -> Draft:
        """Reject a draft (of ``owner``, when given), keeping the reason; nothing is written to the record."""
        self.get(draft_id, owner)
        with self.store.session() as session:
            rejected = session.execute(
                update(Draft)
                .where(Draft.id == draft_id, Draft.status == "draft")
                .values(
                    status="rejected", reject_reason=reason, rejected_by=rejected_by, rejected_at=utcnow()
                )
            ).rowcount
        draft = self.get(draft_id)
        if not rejected and draft.status == "signed":
            raise Conflict("this draft is already signed")
        return draft

    def _write_back(self, draft: Draft, target: WriteTarget) -> str:
        """Write the final report and both Provenances (conditional create); return the report's reference."""
        base = target.base_url.rstrip("/")
        headers = _headers(target)
        try:
            existing = self.http.get(
                f"{base}/DiagnosticReport",
                params={"identifier": f"{DRAFT_IDENTIFIER_SYSTEM}|{draft.id}"},
                headers=headers,
            )
            if existing.status_code == 200 and existing.json().get("entry"):
                # A previous attempt wrote the report but died before recording it: don't write again.
                return f"DiagnosticReport/{existing.json()['entry'][0]['resource']['id']}"
            signed_at = draft.signed_at or utcnow()
            # SQLite hands back naive datetimes; the store writes UTC, and FHIR instants need the zone.
            signed_at = signed_at if signed_at.tzinfo else signed_at.replace(tzinfo=UTC)
            bundle = writeback_bundle(
                signed_report_of(draft),
                draft.id,
                (draft.model_id, draft.model_version),
                (draft.signed_by or "", draft.signed_by_name or ""),
                signed_at,
                draft.ai_provenance.get("entity"),
            )
            answer = self.http.post(base, content=bundle.model_dump_json(exclude_none=True), headers=headers)
        except (httpx.HTTPError, ValueError):
            raise WriteBackFailed(
                "the FHIR server was unreachable or answered something else than FHIR"
            ) from None
        if answer.status_code >= 300:
            refused = "refused" if answer.status_code in (401, 403) else "did not take"
            raise WriteBackFailed(
                f"the FHIR server {refused} the signed report ({answer.status_code})", answer.status_code
            )
        try:
            location = TransactionResponse.model_validate_json(answer.content).entry[0].response.location
        except (ValueError, IndexError):
            # Maybe written, maybe not: the retry's identifier search tells, and never writes twice.
            raise WriteBackFailed(
                f"the FHIR server answered {answer.status_code} but not with a transaction-response"
            ) from None
        return "/".join(location.split("/_history")[0].split("/")[-2:])


def owns(owner: DraftOwner, draft: Draft) -> bool:
    """Return whether ``draft`` belongs to ``owner`` (issuer and tenant, compared exactly)."""
    return draft.issuer == owner.issuer and draft.tenant == owner.tenant


def _headers(target: WriteTarget) -> dict[str, str]:
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    return headers


def signed_report_of(draft: Draft) -> DiagnosticReport:
    """Return the signed draft's final DiagnosticReport as the fhir.resources object that was stored."""
    return DiagnosticReport.model_validate(draft.final_report)


class OutboxSweeper:
    """Delivers the write-backs that are due, every ``WRITEBACK_RETRY_S``, in a daemon thread of the serving
    process (each gunicorn worker runs one; the outbox rows are claimed, so one write happens at a time)."""

    def __init__(self, drafts: DraftService) -> None:
        self.drafts = drafts
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        """Start sweeping (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="writeback-outbox", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop sweeping (the rows left wait in the outbox for the next process)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.drafts.deliver_due()
            except Exception as exc:  # noqa: BLE001 - a database blip: the rows wait for the next sweep
                log.warning("write-back sweep failed: %s", type(exc).__name__)
            self._stopped.wait(self.drafts.settings.writeback_retry_s)
