"""Medical images from FHIR attachments → a square RGB picture the model reads. Pure: bytes in, image out.

PNG and JPEG are read with Pillow; DICOM with pydicom (modality LUT, VOI windowing, MONOCHROME1 inverted).
Size limits are checked before pixels are decoded, so a decompression bomb is refused, not expanded.
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from fhir_mappings.record import EPOCH
from fhir_mappings.record import as_instant

IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg", "application/dicom", "image/dicom"}
DICOM_MAGIC_OFFSET = 128


class ImageRejected(ValueError):
    """An image that can't or mustn't be decoded; the message says why, for a 4xx or a card."""


@dataclass(frozen=True)
class ImageSource:
    """Where an image lives in the record: the resource that holds it and its attachment."""

    resource: str  # "Media/1" or "DocumentReference/2"
    study: str | None  # "ImagingStudy/3" when the resource points at one
    content_type: str
    data_b64: str | None
    url: str | None
    taken: str


def _pixels_of_dicom(data: bytes, max_pixels: int) -> Image.Image:
    import pydicom
    from pydicom.pixels import apply_modality_lut
    from pydicom.pixels import apply_voi_lut

    dataset = pydicom.dcmread(io.BytesIO(data))
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if rows * columns * frames > max_pixels:
        raise ImageRejected(
            f"DICOM image has {rows * columns * frames} pixels, over the limit of {max_pixels}"
        )
    pixels = dataset.pixel_array
    if frames > 1:
        pixels = pixels[0]
    if dataset.get("SamplesPerPixel", 1) == 3:
        return Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
    values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    # MONOCHROME1 stores bright as low values (DICOM PS3.3 C.7.6.3.1.2): invert so bone is white.
    if dataset.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return Image.fromarray((scaled * 255).round().astype(np.uint8)).convert("RGB")


def _pixels_of_picture(data: bytes, max_pixels: int) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    # Image.open reads only the header: the size is known before any pixel is decoded.
    if image.width * image.height > max_pixels:
        raise ImageRejected(f"image has {image.width * image.height} pixels, over the limit of {max_pixels}")
    if image.mode in ("I;16", "I"):
        array = np.asarray(image, dtype=np.float64)
        array = (array - array.min()) / max(float(array.max() - array.min()), 1.0)
        image = Image.fromarray((array * 255).astype(np.uint8))
    return image.convert("RGB")


def decode_image(data: bytes, content_type: str, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Return an RGB image from PNG, JPEG or DICOM bytes; ImageRejected when too large or unreadable."""
    if len(data) > max_bytes:
        raise ImageRejected(f"image is {len(data)} bytes, over the limit of {max_bytes}")
    is_dicom = data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM" or "dicom" in content_type
    try:
        if is_dicom:
            return _pixels_of_dicom(data, max_pixels)
        return _pixels_of_picture(data, max_pixels)
    except ImageRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is "unreadable image" to the caller
        raise ImageRejected(f"image could not be decoded ({type(exc).__name__})") from None


def square_image(image: Image.Image, size: int) -> Image.Image:
    """Return the image scaled to fit ``size`` x ``size`` and padded with black, aspect ratio kept."""
    scale = size / max(image.width, image.height)
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return canvas


def png_b64(image: Image.Image) -> str:
    """Return the image as base64 PNG (what a job carries and the review page shows)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def bytes_hash(data: bytes) -> str:
    """Return the content hash of image bytes."""
    return hashlib.sha256(data).hexdigest()[:32]


def _attachment_source(resource: Any, attachment: Any, study: str | None, taken: Any) -> ImageSource | None:
    if attachment is None or not resource.id:
        return None
    content_type = (attachment.contentType or "").lower()
    if content_type not in IMAGE_TYPES or not (attachment.data or attachment.url):
        return None
    return ImageSource(
        resource=f"{resource.get_resource_type()}/{resource.id}",
        study=study,
        content_type=content_type,
        data_b64=attachment.data,
        url=attachment.url,
        taken=str(taken or ""),
    )


def image_sources(media: list[Any], documents: list[Any]) -> list[ImageSource]:
    """Return every image attachment of Media and DocumentReference resources, newest first."""
    sources: list[ImageSource] = []
    for item in media:
        study = next(
            (p.reference for p in item.partOf if p.reference and p.reference.startswith("ImagingStudy/")),
            None,
        )
        source = _attachment_source(item, item.content, study, item.createdDateTime or item.issued)
        if source:
            sources.append(source)
    for document in documents:
        related = document.context.related if document.context else None
        study = next(
            (r.reference for r in related or [] if r.reference and r.reference.startswith("ImagingStudy/")),
            None,
        )
        for content in document.content:
            source = _attachment_source(document, content.attachment, study, document.date)
            if source:
                sources.append(source)
    # Ties by resource, so the newest image (the one drafted) doesn't depend on a Bundle's entry order.
    by_resource = sorted(sources, key=lambda s: s.resource)
    return sorted(by_resource, key=lambda s: as_instant(s.taken) or EPOCH, reverse=True)
