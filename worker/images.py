"""The worker's side of an imaging job: fetch the image a reference names, decode it under limits.

The API never decodes an image; it hands a reference (inline data as received, an attachment URL, or a
study on a PACS). Here the bytes are fetched (the FHIR server through its allowlist, a PACS through the
DICOMweb allowlist), decoded under ``ImageLimits``, and squared for the model. The EHR's token is sent
only to the EHR's own origin: to its FHIR server, and to a PACS endpoint that shares that origin; any
other allowlisted PACS gets ``MEDGEMMA_CDS_DICOMWEB_AUTHORIZATION`` or nothing.
"""

from __future__ import annotations

import base64
import binascii
import functools
from dataclasses import dataclass

import httpx
from PIL import Image

from cds_service.dicomweb import DicomwebClient
from cds_service.dicomweb import DicomwebError
from cds_service.errors import BadRequest
from cds_service.fhir_client import FhirReader
from cds_service.fhir_client import FhirReadError
from cds_service.fhir_client import same_origin
from cds_service.settings import Settings
from cds_service.wire import ImageRead
from cds_service.wire import ImageReference
from fhir_mappings.images import WADO_RS
from fhir_mappings.images import ImageLimits
from fhir_mappings.images import ImageRejected
from fhir_mappings.images import choose_instance
from fhir_mappings.images import decode_image
from fhir_mappings.images import dicom_json_value
from fhir_mappings.images import png_bytes
from fhir_mappings.images import square_image

# MedGemma's SigLIP encoder reads 896 x 896: the size of the picture the review page shows.
MODEL_IMAGE_SIZE = 896


@dataclass(frozen=True)
class ReadImage:
    """An image as the model reads it, the PNG the review page shows, and what was read."""

    image: Image.Image
    png: bytes
    read: ImageRead


def image_limits(settings: Settings) -> ImageLimits:
    """Return the configured limits on one image."""
    return ImageLimits(
        max_bytes=settings.max_image_bytes,
        max_decoded_bytes=settings.max_image_decoded_bytes,
        max_pixels=settings.max_image_pixels,
        max_frames=settings.max_image_frames,
    )


@functools.cache
def http_client(timeout_s: float, connect_timeout_s: float) -> httpx.Client:
    """Return this process's HTTP client for image fetches (one pool, reused by every job)."""
    return httpx.Client(timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s))


def read_image(settings: Settings, reference: ImageReference) -> ReadImage:
    """Return the image a reference names, fetched and decoded; ImageRejected saying why it can't be."""
    http = http_client(settings.fhir_timeout_s, settings.fhir_connect_timeout_s)
    if reference.study_uid:
        data, read = _from_pacs(settings, http, reference)
    else:
        data = _attachment_bytes(settings, http, reference)
        read = ImageRead(
            content_hash=reference.content_hash, description=f"the image of {reference.resource}"
        )
    decoded = decode_image(data, reference.content_type, image_limits(settings))
    if decoded.frames and decoded.frames > 1:
        description = f"{read.description}, frame {decoded.frame} of {decoded.frames}"
        read = read.model_copy(update={"description": description})
    read = read.model_copy(update={"frame": decoded.frame, "frames": decoded.frames})
    # The model gets the decoded image: its processor resizes it to 896 x 896 as in MedGemma's training
    # (no black bars); the review page gets it letterboxed, whole and undistorted.
    squared = square_image(decoded.image, MODEL_IMAGE_SIZE)
    return ReadImage(image=decoded.image, png=png_bytes(squared), read=read)


def _fhir_reader(
    settings: Settings, http: httpx.Client, reference: ImageReference, *, with_token: bool = True
) -> FhirReader:
    if not reference.fhir_server:
        raise ImageRejected("the request gave no fhirServer to read it from")
    token = reference.access_token.get_secret_value() if reference.access_token and with_token else None
    try:
        return FhirReader(
            http,
            reference.fhir_server,
            token,
            allowlist=settings.fhir_server_allowlist,
            allow_http_loopback=settings.fhir_allow_http_loopback,
        )
    except BadRequest as refused:
        raise ImageRejected(refused.message) from None


def _attachment_bytes(settings: Settings, http: httpx.Client, reference: ImageReference) -> bytes:
    if reference.data_b64:
        if len(reference.data_b64) // 4 * 3 > settings.max_image_bytes:
            raise ImageRejected(f"the image is over the limit of {settings.max_image_bytes} bytes")
        try:
            return base64.b64decode(reference.data_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ImageRejected("the attachment data is not valid base64") from None
    # An attachment on another allowlisted server is fetched without the EHR's token: it is the EHR's only.
    on_ehr_origin = same_origin(reference.url or "", reference.fhir_server or "")
    reader = _fhir_reader(settings, http, reference, with_token=on_ehr_origin)
    try:
        return reader.read_bytes(reference.url or "", max_bytes=settings.max_image_bytes)
    except FhirReadError as error:
        raise ImageRejected(f"the attachment could not be fetched: {error.detail}") from None
    except BadRequest as refused:
        raise ImageRejected(f"the attachment URL is not allowed: {refused.message}") from None


def _endpoint_address(settings: Settings, http: httpx.Client, reference: ImageReference) -> str:
    if reference.endpoint_address:
        return reference.endpoint_address
    reader = _fhir_reader(settings, http, reference)
    try:
        endpoint, _ = reader.read(reference.endpoint_ref or "")
    except FhirReadError as error:
        raise ImageRejected(f"the study's Endpoint could not be read: {error.detail}") from None
    connection = (endpoint.get("connectionType") or {}).get("code")
    address = endpoint.get("address")
    if endpoint.get("resourceType") != "Endpoint" or connection != WADO_RS or not isinstance(address, str):
        raise ImageRejected("the study's Endpoint is not a DICOMweb (dicom-wado-rs) endpoint")
    return address


def _from_pacs(settings: Settings, http: httpx.Client, reference: ImageReference) -> tuple[bytes, ImageRead]:
    address = _endpoint_address(settings, http, reference)
    token = reference.access_token.get_secret_value() if reference.access_token else None
    # The EHR's token belongs to the EHR's origin; a PACS elsewhere gets the configured credential.
    if token and reference.fhir_server and same_origin(address, reference.fhir_server):
        authorization: str | None = f"Bearer {token}"
    else:
        configured = settings.dicomweb_authorization
        authorization = configured.get_secret_value() if configured else None
    study_uid = reference.study_uid or ""
    try:
        client = DicomwebClient(
            http,
            address,
            allowlist=settings.dicomweb_allowlist,
            allow_http_loopback=False,
            authorization=authorization,
            max_bytes=settings.max_image_bytes,
        )
        metadata = client.study_metadata(study_uid)
        # What FHIR lists is what the job was hashed on: only those series and instances are read.
        listed_series = {s.uid for s in reference.series}
        listed_instances = {i.uid for s in reference.series for i in s.instances}
        if listed_series:
            metadata = [m for m in metadata if dicom_json_value(m, "0020000E") in listed_series]
        if listed_instances:
            metadata = [m for m in metadata if dicom_json_value(m, "00080018") in listed_instances]
        chosen = choose_instance(metadata)
        if chosen is None:
            raise ImageRejected("the PACS holds no image instance of the study")
        data = client.instance(study_uid, chosen.series_uid, chosen.instance_uid)
    except DicomwebError as error:
        raise ImageRejected(str(error)) from None
    read = ImageRead(
        content_hash=reference.content_hash,
        description=chosen.description,
        study_uid=study_uid,
        series_uid=chosen.series_uid,
        instance_uid=chosen.instance_uid,
        endpoint=client.root,
    )
    return data, read
