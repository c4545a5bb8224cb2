"""Medical images: where the record keeps them, and bytes → the square RGB picture the model reads.

Pure: record in, references out; bytes in, image out. The API only finds and names images (``image_sources``,
``study_sources``); a worker fetches and decodes them (``decode_image``) under ``ImageLimits``, each checked
before the work it bounds: the bytes received, the bytes a deflated dataset inflates to (inflated in steps,
so a deflate bomb stops at the limit), the decoded size and pixel count a header declares (a JPEG or PNG
bomb is refused before decoding), and the frame count. DICOM is rendered the way a viewer shows it: the
modality LUT, then the image's own VOI LUT or window, MONOCHROME1 inverted, one frame of a multi-frame
image; compressed transfer syntaxes go through pydicom's decoders (pylibjpeg, Pillow).
"""

from __future__ import annotations

import base64
import hashlib
import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from cds_service.wire import DicomInstanceRef
from cds_service.wire import DicomSeriesRef
from fhir_mappings.record import EPOCH
from fhir_mappings.record import as_instant

IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg", "application/dicom", "image/dicom"}
DICOM_MAGIC_OFFSET = 128
DICOM_UID_SYSTEM = "urn:dicom:uid"
WADO_RS = "dicom-wado-rs"
DEFLATED_TRANSFER_SYNTAX = "1.2.840.10008.1.2.1.99"
INFLATE_STEP = 1024 * 1024
#: How a failed job's error starts when its image could not be read; the hook turns it into a card.
IMAGE_NOT_READ = "image not read: "


class ImageRejected(ValueError):
    """An image that can't or mustn't be decoded; the message says why, for a card."""


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost a worker: bytes received, bytes decoded, pixels per frame, frames."""

    max_bytes: int
    max_decoded_bytes: int
    max_pixels: int
    max_frames: int


@dataclass(frozen=True)
class DicomStudy:
    """A study a PACS holds: its UID, the DICOMweb endpoint (address or reference) and what FHIR lists."""

    uid: str
    endpoint_address: str | None
    endpoint_ref: str | None
    series: tuple[DicomSeriesRef, ...]


@dataclass(frozen=True)
class ImageSource:
    """Where an image lives in the record: an attachment of a resource, or a study on a PACS."""

    resource: str  # "Media/1", "DocumentReference/2" or "ImagingStudy/3"
    study: str | None  # "ImagingStudy/3" when the image belongs to one
    content_type: str
    data_b64: str | None
    url: str | None
    taken: str
    version: str = ""  # the resource's meta.versionId (or lastUpdated): a changed URL target is a new image
    dicom: DicomStudy | None = None


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image, and which frame of how many was taken (DICOM multi-frame)."""

    image: Image.Image
    frame: int | None = None
    frames: int | None = None


# --- Finding images in the record ------------------------------------------------------------------


def _attachment_source(resource: Any, attachment: Any, study: str | None, taken: Any) -> ImageSource | None:
    if attachment is None or not resource.id:
        return None
    content_type = (attachment.contentType or "").lower()
    if content_type not in IMAGE_TYPES or not (attachment.data or attachment.url):
        return None
    meta = resource.meta
    return ImageSource(
        resource=f"{resource.get_resource_type()}/{resource.id}",
        study=study,
        content_type=content_type,
        data_b64=attachment.data,
        url=attachment.url,
        taken=str(taken or ""),
        version=(meta.versionId or meta.lastUpdated or "") if meta else "",
    )


def newest_first(sources: list[ImageSource]) -> list[ImageSource]:
    """Return sources newest first; ties by resource, so the image drafted doesn't depend on entry order."""
    by_resource = sorted(sources, key=lambda s: s.resource)
    return sorted(by_resource, key=lambda s: as_instant(s.taken) or EPOCH, reverse=True)


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
    return newest_first(sources)


def study_uid(study: Any) -> str | None:
    """Return an ImagingStudy's Study Instance UID: its ``urn:dicom:uid`` identifier without ``urn:oid:``."""
    for identifier in study.identifier:
        if identifier.system == DICOM_UID_SYSTEM and identifier.value:
            return identifier.value.removeprefix("urn:oid:")
    return None


def _endpoint(reference: str, study: Any, endpoints: dict[str, Any]) -> tuple[str | None, str | None] | None:
    """Return (address, None) for an Endpoint the record holds, (None, reference) for one to read, or None
    when the Endpoint held is not a DICOMweb (WADO-RS) one."""
    if reference.startswith("#"):
        held = next((r for r in study.contained if r is not None and r.id == reference[1:]), None)
    else:
        held = endpoints.get(reference)
    if held is None:
        return (None, reference) if reference.startswith("Endpoint/") else None
    connection = held.connectionType.code if getattr(held, "connectionType", None) else None
    if connection != WADO_RS or not held.address:
        return None
    return held.address, None


def _series_ref(series: Any) -> DicomSeriesRef | None:
    if not series.uid:
        return None
    return DicomSeriesRef(
        uid=series.uid,
        number=series.number,
        modality=series.modality.code if series.modality else None,
        body_site=(series.bodySite.display or series.bodySite.code) if series.bodySite else None,
        instances=[
            DicomInstanceRef(
                uid=instance.uid,
                number=instance.number,
                sop_class=(instance.sopClass.code or "").removeprefix("urn:oid:") or None
                if instance.sopClass
                else None,
            )
            for instance in series.instance
            if instance.uid
        ],
    )


def study_sources(studies: list[Any], endpoints: dict[str, Any]) -> list[ImageSource]:
    """Return the studies a PACS holds that DICOMweb can fetch, newest first.

    A study qualifies with a Study Instance UID and a WADO-RS endpoint, its own or a series'; ``endpoints``
    are Endpoint resources the record holds by reference ("Endpoint/1"). An Endpoint it doesn't hold is
    read by the worker.
    """
    sources: list[ImageSource] = []
    for study in studies:
        uid = study_uid(study)
        if not uid or not study.id:
            continue
        references = [r.reference for r in study.endpoint if r.reference]
        references += [r.reference for s in study.series for r in s.endpoint if r.reference]
        found = next((e for e in (_endpoint(r, study, endpoints) for r in references) if e), None)
        if found is None:
            continue
        reference = f"ImagingStudy/{study.id}"
        meta = study.meta
        sources.append(
            ImageSource(
                resource=reference,
                study=reference,
                content_type="application/dicom",
                data_b64=None,
                url=None,
                taken=str(study.started or ""),
                version=(meta.versionId or meta.lastUpdated or "") if meta else "",
                dicom=DicomStudy(
                    uid=uid,
                    endpoint_address=found[0],
                    endpoint_ref=found[1],
                    series=tuple(s for s in (_series_ref(series) for series in study.series) if s),
                ),
            )
        )
    return newest_first(sources)


def source_hash(source: ImageSource, fhir_server: str | None) -> str:
    """Return the content hash of an image as the record names it, without fetching or decoding it.

    Inline data: the data as received. A URL: the URL, resolved, and its resource's version. A study: its
    UID and instance list (and its version when it lists no instances), so a new image is a new job.
    """
    if source.data_b64:
        material = ["inline", source.data_b64]
    elif source.dicom is not None:
        instances = sorted(i.uid for s in source.dicom.series for i in s.instances)
        material = ["dicomweb", source.dicom.uid, *instances, "" if instances else source.version]
    else:
        material = ["url", (fhir_server or "").rstrip("/"), source.url or "", source.resource, source.version]
    return hashlib.sha256("\x1f".join(material).encode()).hexdigest()[:32]


# --- Choosing what to read from a study's DICOM metadata --------------------------------------------

#: Projection radiography first (what MedGemma reads best), then the rest; cross-sectional last.
MODALITY_RANK = {"CR": 0, "DX": 0, "MG": 1, "US": 2, "XA": 2, "RF": 2, "CT": 3, "MR": 3, "PT": 4, "NM": 4}
#: A frontal chest view over a lateral: PA, then AP, then unnamed views, laterals last.
VIEW_RANK = {"PA": 0, "AP": 1, "": 2, "LL": 3, "RL": 3, "LATERAL": 3, "LAT": 3}
CROSS_SECTIONAL = {"CT", "MR", "PT", "NM"}


def dicom_json_value(attributes: dict[str, Any], tag: str) -> Any:
    """Return the first value of a tag in DICOM JSON (PS3.18 F.2), or None."""
    values = (attributes.get(tag) or {}).get("Value") or [None]
    return values[0]


@dataclass(frozen=True)
class ChosenInstance:
    """The instance chosen to read, and the words a card uses for it."""

    series_uid: str
    instance_uid: str
    description: str


def _instance_facts(attributes: dict[str, Any]) -> dict[str, Any]:
    image_type = (attributes.get("00080008") or {}).get("Value") or []
    return {
        "series": dicom_json_value(attributes, "0020000E"),
        "instance": dicom_json_value(attributes, "00080018"),
        "modality": str(dicom_json_value(attributes, "00080060") or "").upper(),
        "view": str(dicom_json_value(attributes, "00185101") or "").upper(),
        "body": str(dicom_json_value(attributes, "00180015") or ""),
        "series_number": dicom_json_value(attributes, "00200011"),
        "number": dicom_json_value(attributes, "00200013"),
        "frames": dicom_json_value(attributes, "00280008"),
        "has_pixels": dicom_json_value(attributes, "00280010") is not None,
        "localizer": "LOCALIZER" in [str(t).upper() for t in image_type],
    }


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def choose_instance(metadata: list[dict[str, Any]]) -> ChosenInstance | None:
    """Return the instance of a study the model should read, from its DICOM JSON metadata; None if none.

    Only instances with pixels count (no reports, key objects or presentation states). The series is
    ranked by modality (projection radiography first), then by its best view (a PA or AP chest over a
    lateral), localizers last; within a cross-sectional series (CT, MR) the middle slice is read, not the
    first; otherwise the best view, then the lowest instance number.
    """
    facts = [f for f in map(_instance_facts, metadata) if f["has_pixels"] and f["series"] and f["instance"]]
    if not facts:
        return None

    def view_rank(fact: dict[str, Any]) -> int:
        return VIEW_RANK.get(fact["view"], 2)

    series: dict[str, list[dict[str, Any]]] = {}
    for fact in facts:
        series.setdefault(fact["series"], []).append(fact)

    def series_rank(members: list[dict[str, Any]]) -> tuple[int, int, int, int]:
        first = members[0]
        return (
            all(m["localizer"] for m in members),
            MODALITY_RANK.get(first["modality"], 5),
            min(view_rank(m) for m in members),
            _as_int(first["series_number"], 1 << 30),
        )

    members = min(series.values(), key=series_rank)
    members = sorted(members, key=lambda m: (m["localizer"], _as_int(m["number"], 1 << 30)))
    first = members[0]
    if first["modality"] in CROSS_SECTIONAL:
        slices = [m for m in members if not m["localizer"]] or members
        chosen = slices[len(slices) // 2]
        where = f"slice {slices.index(chosen) + 1} of {len(slices)}"
    else:
        chosen = min(members, key=view_rank)
        where = f"view {chosen['view']}" if chosen["view"] else "view not stated"
    series_name = f"series {chosen['series_number']}" if chosen["series_number"] is not None else "series"
    kind = ", ".join(part for part in (chosen["modality"], chosen["body"]) if part)
    number = f" {chosen['number']}" if chosen["number"] is not None else ""
    return ChosenInstance(
        series_uid=chosen["series"],
        instance_uid=chosen["instance"],
        description=(
            f"{series_name} ({kind or 'modality not stated'}) {chosen['series']}, "
            f"instance{number} {chosen['instance']}, {where}"
        ),
    )


# --- Decoding under limits ---------------------------------------------------------------------------


def _check_size(rows: int, columns: int, frames: int, bytes_per_pixel: int, limits: ImageLimits) -> None:
    if rows * columns > limits.max_pixels:
        raise ImageRejected(f"the image has {rows * columns} pixels, over the limit of {limits.max_pixels}")
    if frames > limits.max_frames:
        raise ImageRejected(f"the image has {frames} frames, over the limit of {limits.max_frames}")
    decoded = rows * columns * frames * bytes_per_pixel
    if decoded > limits.max_decoded_bytes:
        raise ImageRejected(
            f"the image decodes to {decoded} bytes, over the limit of {limits.max_decoded_bytes}"
        )


def _inflate(data: bytes, limit: int) -> bytes:
    """Inflate a raw deflate stream in steps, refusing it as soon as it passes ``limit`` bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pieces: list[bytes] = []
    size = 0
    pending = data
    while pending and not inflater.eof:
        piece = inflater.decompress(pending, INFLATE_STEP)
        size += len(piece)
        if size > limit:
            raise ImageRejected(f"the deflated DICOM dataset inflates past the limit of {limit} bytes")
        pieces.append(piece)
        pending = inflater.unconsumed_tail
    return b"".join(pieces)


def _read_dicom(data: bytes, limits: ImageLimits) -> Any:
    """Return the dataset; a deflated one is inflated here, under the decoded-bytes limit."""
    import pydicom
    from pydicom.filereader import read_dataset
    from pydicom.filereader import read_preamble
    from pydicom.uid import ExplicitVRLittleEndian

    buffer = io.BytesIO(data)
    read_preamble(buffer, False)
    meta = read_dataset(buffer, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED_TRANSFER_SYNTAX:
        return pydicom.dcmread(io.BytesIO(data))
    # pydicom inflates a deflated dataset whole (PS3.5 A.5); inflating here first bounds what it costs.
    inflated = _inflate(data[buffer.tell() :], limits.max_decoded_bytes)
    dataset = read_dataset(io.BytesIO(inflated), False, True)
    dataset.file_meta = pydicom.dataset.FileMetaDataset(meta)
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return dataset


def _check_encapsulated_frame(dataset: Any, index: int, frames: int, limits: ImageLimits) -> None:
    """Refuse a compressed frame whose own header declares more pixels than allowed or than the dataset.

    pydicom trusts Rows/Columns; the codec trusts the frame. Pillow reads a JPEG or JPEG 2000 header
    without decoding, so a frame that lies about its size is caught before it is expanded.
    """
    from pydicom.encaps import get_frame

    frame = get_frame(dataset.PixelData, index, number_of_frames=frames)
    try:
        header = Image.open(io.BytesIO(frame))
    except Exception:  # noqa: BLE001 - a codec Pillow doesn't know (JPEG-LS, RLE): pydicom decodes it
        return
    if header.width * header.height > min(limits.max_pixels, int(dataset.Rows) * int(dataset.Columns)):
        raise ImageRejected("a compressed frame declares more pixels than its image or the limit allows")


def _pixels_of_dicom(data: bytes, limits: ImageLimits) -> DecodedImage:
    from pydicom.pixels import apply_color_lut
    from pydicom.pixels import apply_modality_lut
    from pydicom.pixels import apply_voi_lut
    from pydicom.pixels import pixel_array

    dataset = _read_dicom(data, limits)
    if "PixelData" not in dataset:
        raise ImageRejected("the DICOM object has no pixel data")
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    _check_size(rows, columns, frames, samples * -(-int(dataset.BitsAllocated) // 8), limits)
    # One frame is decoded, the middle one: a multi-frame image is a loop or a volume, and its middle
    # shows the anatomy better than its first.
    index = frames // 2
    if dataset.file_meta.TransferSyntaxUID.is_compressed:
        _check_encapsulated_frame(dataset, index, frames, limits)
    try:
        pixels = pixel_array(dataset, index=index) if frames > 1 else dataset.pixel_array
    except (NotImplementedError, RuntimeError, ValueError) as error:
        syntax = dataset.file_meta.TransferSyntaxUID
        raise ImageRejected(
            f"the DICOM pixel data could not be decoded ({syntax.name}, {type(error).__name__})"
        ) from None
    photometric = str(dataset.PhotometricInterpretation)
    frame_info = {"frame": index + 1, "frames": frames}
    if photometric == "PALETTE COLOR":
        return DecodedImage(Image.fromarray(_to_uint8(apply_color_lut(pixels, dataset))), **frame_info)
    if samples == 3:
        return DecodedImage(Image.fromarray(_to_uint8(pixels)).convert("RGB"), **frame_info)
    values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    # MONOCHROME1 stores bright as low values (DICOM PS3.3 C.7.6.3.1.2): invert so bone is white.
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    grey = Image.fromarray((scaled * 255).round().astype(np.uint8))
    return DecodedImage(grey.convert("RGB"), **frame_info)


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    top = max(float(pixels.max()), 1.0)
    return (pixels.astype(np.float64) * (255.0 / top)).round().astype(np.uint8)


def _pixels_of_picture(data: bytes, limits: ImageLimits) -> DecodedImage:
    image = Image.open(io.BytesIO(data))
    # Image.open reads only the header: the size is known before any pixel is decoded.
    frames = int(getattr(image, "n_frames", 1))
    _check_size(image.height, image.width, frames, 4, limits)
    if image.mode in ("I;16", "I"):
        array = np.asarray(image, dtype=np.float64)
        array = (array - array.min()) / max(float(array.max() - array.min()), 1.0)
        image = Image.fromarray((array * 255).astype(np.uint8))
    return DecodedImage(image.convert("RGB"))


def is_dicom(data: bytes, content_type: str) -> bool:
    """Return whether bytes are DICOM (the Part 10 magic, or a DICOM content type)."""
    return data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM" or "dicom" in content_type


def decode_image(data: bytes, content_type: str, limits: ImageLimits) -> DecodedImage:
    """Return an RGB image from PNG, JPEG or DICOM bytes; ImageRejected when over a limit or unreadable."""
    if len(data) > limits.max_bytes:
        raise ImageRejected(f"the image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    decode: Callable[[bytes, ImageLimits], DecodedImage] = (
        _pixels_of_dicom if is_dicom(data, content_type) else _pixels_of_picture
    )
    try:
        return decode(data, limits)
    except ImageRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is "unreadable image" to the caller
        raise ImageRejected(f"the image could not be decoded ({type(exc).__name__})") from None


def square_image(image: Image.Image, size: int) -> Image.Image:
    """Return the image scaled to fit ``size`` x ``size`` and padded with black, aspect ratio kept."""
    scale = size / max(image.width, image.height)
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return canvas


def png_bytes(image: Image.Image) -> bytes:
    """Return the image as PNG (what the review page shows)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_b64(image: Image.Image) -> str:
    """Return the image as base64 PNG."""
    return base64.b64encode(png_bytes(image)).decode()


def bytes_hash(data: bytes) -> str:
    """Return the content hash of image bytes."""
    return hashlib.sha256(data).hexdigest()[:32]
