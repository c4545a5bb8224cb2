"""Image attachments → square RGB pictures: decoding, limits checked before pixels, and where images live."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from fhir_mappings.images import ImageLimits
from fhir_mappings.images import ImageRejected
from fhir_mappings.images import bytes_hash
from fhir_mappings.images import decode_image
from fhir_mappings.images import image_sources
from fhir_mappings.images import png_b64
from fhir_mappings.images import square_image

SAMPLE = Path(__file__).resolve().parents[2] / "cds_service" / "data" / "sample"
CXR_PNG = (SAMPLE / "cxr-00000001_000.png").read_bytes()
MONOCHROME1_DCM = (SAMPLE / "fake-monochrome-cxr.dcm").read_bytes()
ROOMY = ImageLimits(max_bytes=50_000_000, max_decoded_bytes=500_000_000, max_pixels=50_000_000, max_frames=10)


def _limits(**tight: int) -> ImageLimits:
    return replace(ROOMY, **tight)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


def test_png_decodes_to_rgb_with_the_same_pixels() -> None:
    image = decode_image(CXR_PNG, "image/png", ROOMY).image

    assert image.mode == "RGB"
    assert image.size == (512, 512)
    pixels = np.asarray(image)
    original = np.asarray(Image.open(io.BytesIO(CXR_PNG)))
    for channel in range(3):
        assert np.array_equal(pixels[:, :, channel], original)


def test_jpeg_decodes_too() -> None:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(CXR_PNG)).save(buffer, format="JPEG", quality=90)
    image = decode_image(buffer.getvalue(), "image/jpeg", ROOMY).image
    assert (image.mode, image.size) == ("RGB", (512, 512))


def test_sixteen_bit_png_is_stretched_to_eight_bits() -> None:
    ramp = np.tile(np.linspace(0, 4095, 64, dtype=np.uint16), (16, 1))
    image = decode_image(_png(Image.fromarray(ramp)), "image/png", ROOMY).image

    grey = _grey(image)
    assert image.mode == "RGB"
    assert grey.min() == 0 and grey.max() == 255
    assert np.all(np.diff(grey[0]) >= 0)


def test_dicom_monochrome1_is_inverted() -> None:
    dataset = pydicom.dcmread(io.BytesIO(MONOCHROME1_DCM))
    assert dataset.PhotometricInterpretation == "MONOCHROME1"
    stored = dataset.pixel_array.astype(np.float64)

    image = decode_image(MONOCHROME1_DCM, "application/dicom", ROOMY).image

    assert image.mode == "RGB"
    assert image.size == (dataset.Columns, dataset.Rows)
    shown = _grey(image)
    # MONOCHROME1: the lowest stored value is shown brightest (DICOM PS3.3 C.7.6.3.1.2). This "fake" file
    # stores a normal-looking radiograph (dark air at the corners) under that label, so a conformant reader
    # shows bright corners and a darker centre: the exact negative of the stored values.
    assert np.corrcoef(stored.ravel(), shown.ravel())[0, 1] < -0.99
    corners = np.concatenate([shown[:100, :100].ravel(), shown[:100, -100:].ravel()])
    centre = shown[400:600, 400:600]
    assert stored[:100, :100].mean() < stored[400:600, 400:600].mean()
    assert corners.mean() > centre.mean() + 50
    assert shown.min() == 0 and shown.max() == 255


def test_same_dicom_labelled_monochrome2_is_not_inverted() -> None:
    dataset = pydicom.dcmread(io.BytesIO(MONOCHROME1_DCM))
    stored = dataset.pixel_array.astype(np.float64)
    dataset.PhotometricInterpretation = "MONOCHROME2"
    buffer = io.BytesIO()
    dataset.save_as(buffer)

    shown = _grey(decode_image(buffer.getvalue(), "application/dicom", ROOMY).image)

    assert np.corrcoef(stored.ravel(), shown.ravel())[0, 1] > 0.99
    inverted = _grey(decode_image(MONOCHROME1_DCM, "application/dicom", ROOMY).image)
    assert np.abs(shown + inverted - 255).max() <= 1


def test_dicom_is_recognised_by_its_magic_whatever_the_content_type() -> None:
    image = decode_image(MONOCHROME1_DCM, "application/octet-stream", ROOMY).image
    assert image.size == (1024, 1024)


def test_dicom_over_the_pixel_limit_is_refused() -> None:
    with pytest.raises(ImageRejected, match=r"the image has 1048576 pixels, over the limit of 1000000"):
        decode_image(MONOCHROME1_DCM, "application/dicom", _limits(max_pixels=1_000_000))


def test_picture_over_the_pixel_limit_is_refused_from_its_header() -> None:
    # A 3000x3000 PNG whose pixel data is cut off: it can be refused only by reading the header alone.
    whole = _png(Image.new("1", (3000, 3000)))
    header_only = whole[: whole.index(b"IDAT") + 20]
    with pytest.raises(ImageRejected, match=r"image has 9000000 pixels, over the limit of 1000000"):
        decode_image(header_only, "image/png", _limits(max_pixels=1_000_000))
    # With room for the pixels, the same bytes get as far as decoding, and fail there.
    with pytest.raises(ImageRejected, match=r"could not be decoded"):
        decode_image(header_only, "image/png", ROOMY)


def test_decompression_bomb_is_refused_cheaply() -> None:
    bomb = _png(Image.new("1", (20000, 20000)))
    assert len(bomb) < 100_000  # 400 million pixels in a few kilobytes
    with pytest.raises(ImageRejected):
        decode_image(bomb, "image/png", _limits(max_pixels=25_000_000))


def test_too_many_bytes_are_refused() -> None:
    with pytest.raises(ImageRejected, match=rf"the image is {len(CXR_PNG)} bytes, over the limit of 1000"):
        decode_image(CXR_PNG, "image/png", _limits(max_bytes=1000))


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b"this is not an image at all", "image/png"),
        (b"", "image/jpeg"),
        (CXR_PNG[:200], "image/png"),
        (b"\0" * 128 + b"DICM" + b"garbage" * 10, "application/dicom"),
        (CXR_PNG, "application/dicom"),
    ],
    ids=["text", "empty", "truncated-png", "garbage-dicom", "png-labelled-dicom"],
)
def test_unreadable_bytes_are_rejected(data: bytes, content_type: str) -> None:
    with pytest.raises(ImageRejected, match=r"could not be decoded \(\w+\)|has no pixel data"):
        decode_image(data, content_type, ROOMY)


def test_image_rejected_is_a_value_error() -> None:
    assert issubclass(ImageRejected, ValueError)


def test_square_image_keeps_aspect_ratio_and_pads_black() -> None:
    wide = Image.new("RGB", (300, 100), (255, 255, 255))

    square = square_image(wide, 96)

    assert (square.mode, square.size) == ("RGB", (96, 96))
    pixels = np.asarray(square)
    white_rows = np.where(pixels[:, 48, 0] == 255)[0]
    assert (white_rows.min(), white_rows.max()) == (32, 63)  # 300x100 → 96x32, centred
    assert np.all(pixels[:32] == 0) and np.all(pixels[64:] == 0)
    assert np.all(pixels[32:64] == 255)

    tall = square_image(Image.new("RGB", (50, 200), (255, 255, 255)), 64)
    white_columns = np.where(np.asarray(tall)[32, :, 0] == 255)[0]
    assert (white_columns.min(), white_columns.max()) == (24, 39)

    upscaled = square_image(Image.new("RGB", (8, 8), (255, 255, 255)), 64)
    assert np.all(np.asarray(upscaled) == 255)


def test_png_b64_round_trips_and_hash_is_of_the_bytes() -> None:
    image = square_image(decode_image(CXR_PNG, "image/png", ROOMY).image, 64)
    again = Image.open(io.BytesIO(base64.b64decode(png_b64(image))))
    assert np.array_equal(np.asarray(again), np.asarray(image))
    assert bytes_hash(CXR_PNG) == bytes_hash(bytes(CXR_PNG))
    assert bytes_hash(CXR_PNG) != bytes_hash(CXR_PNG[:-1])
    assert len(bytes_hash(CXR_PNG)) == 32


PNG_B64 = base64.b64encode(CXR_PNG).decode()


def _media(
    media_id: str, created: str, content: dict[str, Any], part_of: list[str] | None = None
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "resourceType": "Media",
        "id": media_id,
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "createdDateTime": created,
        "content": content,
    }
    if part_of:
        data["partOf"] = [{"reference": ref} for ref in part_of]
    return data


def _document(
    document_id: str, date: str, attachments: list[dict[str, Any]], related: list[str] | None = None
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": document_id,
        "status": "current",
        "subject": {"reference": "Patient/p1"},
        "date": date,
        "content": [{"attachment": attachment} for attachment in attachments],
    }
    if related:
        data["context"] = {"related": [{"reference": ref} for ref in related]}
    return data


def test_image_sources_picks_image_attachments_newest_first(fhir: Callable[..., Any]) -> None:
    png = {"contentType": "image/png", "data": PNG_B64}
    media = [
        fhir(_media("old", "2020-01-01T10:00:00Z", png, ["Procedure/p9", "ImagingStudy/s-old"])),
        fhir(_media("pdf", "2025-01-01T10:00:00Z", {"contentType": "application/pdf", "data": PNG_B64})),
        fhir(_media("no-bytes", "2025-01-01T10:00:00Z", {"contentType": "image/png", "title": "lost"})),
        fhir(_media("loose", "2023-06-01T10:00:00Z", {"contentType": "IMAGE/JPEG", "url": "Binary/j1"})),
    ]
    documents = [
        fhir(
            _document(
                "doc",
                "2024-03-01T10:00:00Z",
                [
                    {"contentType": "text/plain", "data": base64.b64encode(b"note").decode()},
                    {"contentType": "application/dicom", "url": "Binary/dcm1"},
                ],
                ["ServiceRequest/sr1", "ImagingStudy/s-doc"],
            )
        )
    ]

    sources = image_sources(media, documents)

    assert [(s.resource, s.study) for s in sources] == [
        ("DocumentReference/doc", "ImagingStudy/s-doc"),
        ("Media/loose", None),
        ("Media/old", "ImagingStudy/s-old"),
    ]
    document, loose, old = sources
    assert (document.content_type, document.data_b64, document.url) == (
        "application/dicom",
        None,
        "Binary/dcm1",
    )
    assert loose.content_type == "image/jpeg"
    assert base64.b64decode(old.data_b64 or "") == CXR_PNG
    assert old.taken.startswith("2020-01-01")
    assert image_sources([], []) == []


def test_image_sources_orders_by_instant_across_offsets(fhir: Callable[..., Any]) -> None:
    media = [
        # 2024-01-02T01:00Z
        fhir(_media("utc", "2024-01-02T01:00:00+00:00", {"contentType": "image/png", "data": PNG_B64})),
        # 2024-01-02T04:00Z: three hours later, though its local date is the day before
        fhir(_media("eastern", "2024-01-01T23:00:00-05:00", {"contentType": "image/png", "data": PNG_B64})),
    ]
    assert [s.resource for s in image_sources(media, [])] == ["Media/eastern", "Media/utc"]
