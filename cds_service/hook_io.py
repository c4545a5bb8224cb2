"""The I/O handles a hook handler is given: images from the record, and the draft store."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from urllib.parse import urlencode
from urllib.parse import urljoin

from cds_service.drafts import DraftService
from cds_service.errors import BadRequest
from cds_service.fhir_client import FhirReader
from cds_service.fhir_client import FhirReadError
from cds_service.settings import Settings
from cds_service.signed_links import sign_link
from cds_service.wire import DraftRef
from cds_service.wire import JobRecord
from cds_service.wire import LoadedImage
from fhir_mappings.images import ImageRejected
from fhir_mappings.images import bytes_hash
from fhir_mappings.images import decode_image
from fhir_mappings.images import png_b64
from fhir_mappings.images import square_image
from fhir_mappings.model_outputs import ImagingReadOutput

# MedGemma's SigLIP encoder reads 896 x 896; sending that size keeps the job small and the read faithful.
MODEL_IMAGE_SIZE = 896


class RecordImages:
    """Loads an image attachment: inline data, or a URL on the request's (allowlisted) ``fhirServer``."""

    def __init__(self, settings: Settings, open_reader: Callable[[], FhirReader] | None) -> None:
        self.settings = settings
        self.open_reader = open_reader

    def load(self, content_type: str, data_b64: str | None, url: str | None) -> LoadedImage:
        """Return the image squared for the model; ImageRejected saying why it can't be used."""
        if data_b64:
            try:
                data = base64.b64decode(data_b64, validate=True)
            except (binascii.Error, ValueError):
                raise ImageRejected("attachment data is not valid base64") from None
        elif url and self.open_reader is not None:
            try:
                data = self.open_reader().read_bytes(url, max_bytes=self.settings.max_image_bytes)
            except FhirReadError as error:
                raise ImageRejected(f"the attachment could not be fetched: {error.detail}") from None
            except BadRequest as refused:
                raise ImageRejected(f"the attachment URL is not allowed: {refused.message}") from None
        else:
            raise ImageRejected("the attachment has a URL but the request gave no fhirServer to read it from")
        image = decode_image(
            data,
            content_type,
            max_bytes=self.settings.max_image_bytes,
            max_pixels=self.settings.max_image_pixels,
        )
        squared = square_image(image, MODEL_IMAGE_SIZE)
        encoded = png_b64(squared)
        return LoadedImage(png=base64.b64decode(encoded), png_b64=encoded, content_hash=bytes_hash(data))


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
    ) -> None:
        self.drafts = drafts
        self.settings = settings
        self.patient_id = patient_id
        self.fhir_server = fhir_server
        self.encounter_id = encounter_id
        self.user_id = user_id

    def record(
        self, job: JobRecord, image: LoadedImage, study: str | None, image_ref: str, evidence: list[str]
    ) -> DraftRef:
        """Return the draft for this image, creating it from the finished job the first time."""
        draft = self.drafts.record(
            job=job,
            output=ImagingReadOutput.model_validate(job.result),
            image_hash=image.content_hash,
            image_png=image.png,
            study=study,
            image_ref=image_ref,
            patient_id=self.patient_id,
            fhir_server=self.fhir_server,
            encounter_id=self.encounter_id,
            requested_by=self.user_id,
            evidence=evidence,
            input_hashes=[image.content_hash],
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
        )
