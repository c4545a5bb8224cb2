"""Drafts of AI reports in the durable store, and the clinician's sign-off or rejection.

A draft belongs to the CDS client that made it (its JWT's issuer and tenant), one patient and one FHIR
server, and is created once per image there (idempotent on the image's content, study, patient, server and
owner). The draft API reads and decides only its own issuer's drafts.

Signing turns it into a final DiagnosticReport with the clinician as results interpreter, once, on every
store (an atomic conditional update), and then writes it, with the AI's and the clinician's Provenance, to
the EHR's FHIR server with the clinician's own token (or the configured write-back server). A refused
write leaves the draft signed and the failure visible, to be retried; rejecting writes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import httpx
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from cds_service.errors import Conflict
from cds_service.errors import NotFound
from cds_service.settings import Settings
from cds_service.store import Draft
from cds_service.store import Store
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
        store, sign once and write once; a repeat is a no-op. A patient gone from the server (404/410)
        refuses the sign and changes nothing; any other failure to write leaves the draft signed with the
        failure recorded, for ``retry_write_back``.
        """
        draft = self.get(draft_id, owner)
        if draft.status == "rejected":
            raise Conflict("this draft was rejected; it cannot be signed")
        if draft.status == "signed":
            return draft
        destination = self._destination(target)
        patient_problem = self._patient_problem(draft, destination) if destination else None
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
                )
            ).rowcount
        if not claimed:
            # Someone else signed or rejected it in between: their decision stands.
            current = self.get(draft_id)
            if current.status == "rejected":
                raise Conflict("this draft was rejected; it cannot be signed")
            return current
        if destination is not None:
            if patient_problem is not None:
                self._record_write_back(draft_id, None, patient_problem)
            else:
                self._write_back_now(self.get(draft_id), destination)
        return self.get(draft_id)

    def retry_write_back(self, draft_id: str, target: WriteTarget | None) -> Draft:
        """Write a signed draft whose write-back failed, again; a written one is left as it is."""
        draft = self.get(draft_id)
        if draft.status != "signed":
            raise Conflict("only a signed draft can be written to the record")
        destination = self._destination(target)
        if draft.writeback or destination is None:
            return draft
        problem = self._patient_problem(draft, destination)
        if problem is not None:
            self._record_write_back(draft_id, None, problem)
        else:
            self._write_back_now(draft, destination)
        return self.get(draft_id)

    def _destination(self, target: WriteTarget | None) -> WriteTarget | None:
        # The clinician's own token on the launching EHR first; the configured server is the fallback for
        # EHRs that grant the app no write scope.
        if target is not None:
            return target
        if self.settings.fhir_writeback_url:
            token = self.settings.fhir_writeback_token
            return WriteTarget(self.settings.fhir_writeback_url, token.get_secret_value() if token else None)
        return None

    def _patient_problem(self, draft: Draft, target: WriteTarget) -> str | None:
        """Return why the patient can't be confirmed on the target (None: it answered 200).

        A patient that is gone raises Conflict before anything is signed; only a 200 lets a write go ahead.
        """
        try:
            answer = self.http.get(
                f"{target.base_url.rstrip('/')}/Patient/{draft.patient_id}", headers=_headers(target)
            )
        except httpx.HTTPError:
            return "the FHIR server was unreachable"
        if answer.status_code in (404, 410):
            raise Conflict("the patient no longer exists on the FHIR server; nothing was written")
        if answer.status_code != 200:
            return f"the FHIR server answered {answer.status_code} reading the patient"
        return None

    def _write_back_now(self, draft: Draft, target: WriteTarget) -> None:
        try:
            location = self._write_back(draft, target)
        except WriteBackFailed as failed:
            log.warning("write-back refused", extra={"status": failed.status})
            self._record_write_back(draft.id, None, failed.reason)
            return
        self._record_write_back(draft.id, location, None)

    def _record_write_back(self, draft_id: str, location: str | None, error: str | None) -> None:
        with self.store.session() as session:
            session.execute(
                update(Draft).where(Draft.id == draft_id).values(writeback=location, writeback_error=error)
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
        location = answer.json()["entry"][0]["response"].get("location", "")
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
