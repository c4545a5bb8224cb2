"""Drafts of AI reports in the durable store, and the clinician's sign-off or rejection.

A draft is created once per image (idempotent on the image's content and study). Signing turns it into a
final DiagnosticReport with the clinician as results interpreter and writes it, with the AI's and the
clinician's Provenance, to the write-back FHIR server; rejecting writes nothing to the record.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from cds_service.errors import Conflict
from cds_service.errors import NotFound
from cds_service.errors import UpstreamError
from cds_service.settings import Settings
from cds_service.store import Draft
from cds_service.store import Store
from cds_service.store import utcnow
from cds_service.wire import JobRecord
from fhir_mappings.model_outputs import ImagingReadOutput
from fhir_mappings.reports import DRAFT_IDENTIFIER_SYSTEM
from fhir_mappings.reports import ai_provenance
from fhir_mappings.reports import draft_id_uuid
from fhir_mappings.reports import draft_report
from fhir_mappings.reports import report_text
from fhir_mappings.reports import signed_report
from fhir_mappings.reports import writeback_bundle

log = logging.getLogger(__name__)


def source_key(image_hash: str, study: str | None) -> str:
    """Return the idempotency key of a draft: the image's content and the study it belongs to."""
    return hashlib.sha256(f"{image_hash}|{study or ''}".encode()).hexdigest()


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
        image_png: bytes,
        study: str | None,
        image_ref: str,
        patient_id: str,
        encounter_id: str | None,
        requested_by: str,
        evidence: list[str],
        input_hashes: list[str],
    ) -> Draft:
        """Return the draft for this image, creating it from the finished job the first time."""
        key = source_key(image_hash, study)
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
        )
        target = f"urn:uuid:{draft_id_uuid(draft_id)}"
        provenance = ai_provenance(target, job.model or "unknown model", job.model_version or "unknown", now)
        draft = Draft(
            id=draft_id,
            source_key=key,
            status="draft",
            patient_id=patient_id,
            encounter_id=encounter_id,
            requested_by=requested_by,
            study_ref=study,
            image_ref=image_ref,
            job_id=job.id,
            model_id=job.model or "unknown model",
            model_version=job.model_version or "unknown",
            input_hashes=input_hashes,
            evidence=evidence,
            ai_text=report_text(output.findings, output.impression),
            ai_urgency=output.urgency,
            draft_report=report.model_dump(mode="json", exclude_none=True),
            ai_provenance=provenance.model_dump(mode="json", exclude_none=True),
            image_png=image_png,
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

    def get(self, draft_id: str) -> Draft:
        """Return a draft; 404 when there is none."""
        with self.store.session() as session:
            draft = session.get(Draft, draft_id)
        if draft is None:
            raise NotFound("no such draft")
        return draft

    def list(self, patient_id: str | None, status: str | None, limit: int = 100) -> list[Draft]:
        """Return drafts for a worklist, newest first, filtered by patient and status."""
        query = select(Draft).order_by(Draft.created_at.desc()).limit(limit)
        if patient_id:
            query = query.where(Draft.patient_id == patient_id)
        if status:
            query = query.where(Draft.status == status)
        with self.store.session() as session:
            return list(session.scalars(query))

    def sign(self, draft_id: str, text: str, practitioner: str, practitioner_name: str) -> Draft:
        """Sign a draft: final report with the clinician's text, written back once; a repeat is a no-op."""
        with self.store.session() as session:
            # The row lock serialises a double-click: the second request waits, then sees "signed".
            draft = session.get(Draft, draft_id, with_for_update=True)
            if draft is None:
                raise NotFound("no such draft")
            if draft.status == "signed":
                return draft
            if draft.status == "rejected":
                raise Conflict("this draft was rejected; it cannot be signed")
            now = utcnow()
            final = signed_report(
                draft.draft_report, text, impression_of(text), practitioner, practitioner_name, now
            )
            if self.settings.fhir_writeback_url:
                draft.writeback = self._write_back(draft, final, practitioner, practitioner_name, now)
            draft.status = "signed"
            draft.signed_text = text
            draft.signed_by = practitioner
            draft.signed_by_name = practitioner_name
            draft.signed_at = now
            draft.final_report = final.model_dump(mode="json", exclude_none=True)
        return draft

    def reject(self, draft_id: str, reason: str, rejected_by: str) -> Draft:
        """Reject a draft, keeping the reason; nothing is written to the record."""
        with self.store.session() as session:
            draft = session.get(Draft, draft_id, with_for_update=True)
            if draft is None:
                raise NotFound("no such draft")
            if draft.status == "signed":
                raise Conflict("this draft is already signed")
            if draft.status == "draft":
                draft.status = "rejected"
                draft.reject_reason = reason
                draft.rejected_by = rejected_by
                draft.rejected_at = utcnow()
        return draft

    def _write_back(
        self, draft: Draft, final: Any, practitioner: str, practitioner_name: str, now: datetime
    ) -> str:
        base = (self.settings.fhir_writeback_url or "").rstrip("/")
        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
        if self.settings.fhir_writeback_token:
            headers["Authorization"] = f"Bearer {self.settings.fhir_writeback_token.get_secret_value()}"
        try:
            patient = self.http.get(f"{base}/Patient/{draft.patient_id}", headers=headers)
            if patient.status_code in (404, 410):
                raise Conflict("the patient no longer exists on the FHIR server; nothing was written")
            existing = self.http.get(
                f"{base}/DiagnosticReport",
                params={"identifier": f"{DRAFT_IDENTIFIER_SYSTEM}|{draft.id}"},
                headers=headers,
            )
            if existing.status_code == 200 and existing.json().get("entry"):
                # A previous attempt wrote the report but died before recording it: don't write again.
                return f"DiagnosticReport/{existing.json()['entry'][0]['resource']['id']}"
            bundle = writeback_bundle(
                final, draft.id, (draft.model_id, draft.model_version), (practitioner, practitioner_name), now
            )
            answer = self.http.post(base, content=bundle.model_dump_json(exclude_none=True), headers=headers)
        except httpx.HTTPError:
            raise UpstreamError(
                "the FHIR server for write-back is unreachable; the draft is unchanged"
            ) from None
        if answer.status_code >= 300:
            log.warning("write-back refused", extra={"status": answer.status_code})
            raise UpstreamError(
                f"the FHIR server refused the signed report ({answer.status_code}); the draft is unchanged"
            )
        location = answer.json()["entry"][0]["response"].get("location", "")
        return "/".join(location.split("/_history")[0].split("/")[-2:])
