"""The I/O handles a hook handler is given: images from the record, and the draft store."""

from __future__ import annotations

from urllib.parse import urlencode
from urllib.parse import urljoin

from pydantic import SecretStr

from cds_service.drafts import DraftOwner
from cds_service.drafts import DraftService
from cds_service.drafts import source_key
from cds_service.errors import BadRequest
from cds_service.fhir_client import without_query
from cds_service.fhir_guard import check_fhir_server_url
from cds_service.image_reads import ImageReads
from cds_service.settings import Settings
from cds_service.signed_links import sign_link
from cds_service.wire import DraftRef
from cds_service.wire import ImageRead
from cds_service.wire import ImageReference
from cds_service.wire import JobRecord
from fhir_mappings.images import ImageRejected
from fhir_mappings.images import ImageSource
from fhir_mappings.images import source_hash
from fhir_mappings.model_outputs import ImagingReadOutput


class RecordImages:
    """Names the image of a source for a worker: checked against the limits it can know, nothing decoded.

    What costs work (fetching, inflating, decoding) happens in the worker; here only what the record says:
    inline data over the byte limit or an attachment URL off the allowlist is refused at once, with a card.
    ``access_token`` (the EHR's, or the operator's for a precompute read) travels with the reference only
    when the image is read through ``fhir_server``: an attachment URL, or a study whose Endpoint must be
    read or may share the EHR's origin.
    """

    def __init__(self, settings: Settings, fhir_server: str | None, access_token: str | None) -> None:
        self.settings = settings
        self.fhir_server = fhir_server.rstrip("/") if fhir_server else None
        self.access_token = access_token

    def reference(self, source: ImageSource) -> ImageReference:
        """Return the reference a worker fetches the image by; ImageRejected saying why it can't be used."""
        limit = self.settings.max_image_bytes
        if source.data_b64:
            # Base64 carries 3 bytes in 4 characters: the size is known without decoding anything.
            if len(source.data_b64) // 4 * 3 > limit:
                raise ImageRejected(f"the image is over the limit of {limit} bytes")
            return ImageReference(
                content_hash=source_hash(source, None),
                resource=source.resource,
                content_type=source.content_type,
                data_b64=source.data_b64,
            )
        if not self.fhir_server:
            raise ImageRejected("the image is not inline and the request gave no fhirServer to read it from")
        token = SecretStr(self.access_token) if self.access_token else None
        if source.dicom is not None:
            study = source.dicom
            return ImageReference(
                content_hash=source_hash(source, self.fhir_server),
                resource=source.resource,
                content_type=source.content_type,
                study_uid=study.uid,
                endpoint_address=study.endpoint_address,
                endpoint_ref=study.endpoint_ref,
                series=list(study.series),
                fhir_server=self.fhir_server,
                access_token=token,
            )
        url = urljoin(self.fhir_server + "/", source.url or "")
        try:
            check_fhir_server_url(
                without_query(url),
                self.settings.fhir_server_allowlist,
                self.settings.fhir_allow_http_loopback,
                what="the attachment URL",
            )
        except BadRequest as refused:
            raise ImageRejected(refused.message) from None
        return ImageReference(
            content_hash=source_hash(source, self.fhir_server),
            resource=source.resource,
            content_type=source.content_type,
            url=url,
            fhir_server=self.fhir_server,
            access_token=token,
        )


class StoreDraftRecorder:
    """Records drafts for one hook call (its patient, encounter and user) in the durable store."""

    def __init__(
        self,
        drafts: DraftService,
        settings: Settings,
        patient_id: str,
        fhir_server: str | None,
        encounter_id: str | None,
        user_id: str,
        image_reads: ImageReads | None = None,
        owner: DraftOwner | None = None,
    ) -> None:
        self.image_reads = image_reads
        self.drafts = drafts
        self.settings = settings
        self.patient_id = patient_id
        self.fhir_server = fhir_server
        self.owner = owner or DraftOwner(None)
        self.encounter_id = encounter_id
        self.user_id = user_id

    def record(
        self, job: JobRecord, image_hash: str, study: str | None, image_ref: str, evidence: list[str]
    ) -> DraftRef:
        """Return the draft for this image, creating it from the finished job the first time."""
        draft = self.drafts.find(source_key(image_hash, study, self.patient_id, self.fhir_server, self.owner))
        if draft is None:
            # Read once, when the draft is made: the picture the model saw, and where it came from.
            read = self.image_reads.load(job.id) if self.image_reads is not None else None
            draft = self.drafts.record(
                job=job,
                output=ImagingReadOutput.model_validate(job.result),
                image_hash=image_hash,
                image_read=read[0] if read else None,
                image_png=read[1] if read else None,
                study=study,
                image_ref=image_ref,
                patient_id=self.patient_id,
                fhir_server=self.fhir_server,
                owner=self.owner,
                encounter_id=self.encounter_id,
                requested_by=self.user_id,
                evidence=evidence,
            )
        base = self.settings.public_url.rstrip("/") + "/"
        # The SMART launch URL names the draft itself: real launchers keep the app's query string but drop
        # appContext (the card carries both).
        launch_url = urljoin(base, f"review/launch?{urlencode({'draft': draft.id})}")
        development_url = None
        if self.settings.development:
            # For clients without SMART (the public CDS Hooks sandbox over an open FHIR server).
            token = sign_link(self.settings, "draft-review", draft.id)
            development_url = urljoin(base, f"drafts/{draft.id}/review?{urlencode({'access': token})}")
        return DraftRef(
            id=draft.id,
            status=draft.status,
            report=draft.draft_report,
            review_url=launch_url,
            development_url=development_url,
            image_read=ImageRead.model_validate(draft.image_read) if draft.image_read else None,
        )
