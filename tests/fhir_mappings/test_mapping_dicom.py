"""DICOM rendered properly under limits (window, frames, codecs, bombs); which instance of a study is read."""

from __future__ import annotations

import io
import zlib
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import JPEG2000Lossless
from pydicom.uid import RLELossless
from pydicom.uid import generate_uid

from fhir_mappings.images import ImageLimits
from fhir_mappings.images import ImageRejected
from fhir_mappings.images import choose_instance
from fhir_mappings.images import decode_image

DEFLATED = "1.2.840.10008.1.2.1.99"
ROOMY = ImageLimits(max_bytes=50_000_000, max_decoded_bytes=500_000_000, max_pixels=50_000_000, max_frames=64)


def dataset(pixels: np.ndarray, **attributes: Any) -> Dataset:
    """Return a secondary-capture dataset holding ``pixels`` (frames × rows × columns, or rows × columns)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = (
        ds.file_meta.MediaStorageSOPClassUID,
        ds.file_meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality = "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    for name, value in attributes.items():
        setattr(ds, name, value)
    return ds


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def grey(data: bytes, limits: ImageLimits = ROOMY) -> np.ndarray:
    return np.asarray(decode_image(data, "application/dicom", limits).image.convert("L"), dtype=np.int16)


def ramp(rows: int = 64, columns: int = 64, top: int = 4095) -> np.ndarray:
    return np.tile(np.linspace(0, top, columns).astype(np.uint16), (rows, 1))


def test_the_images_own_window_is_applied() -> None:
    # Values 0..4095; a window of centre 1024 width 512 shows 768..1280 as black..white, the rest clipped.
    shown = grey(part10(dataset(ramp(), WindowCenter=1024, WindowWidth=512)))
    values = np.linspace(0, 4095, 64)
    assert np.all(shown[0][values <= 760] == 0)
    assert np.all(shown[0][values >= 1290] == 255)
    inside = (values > 800) & (values < 1250)
    assert np.all(np.diff(shown[0][inside]) > 0)
    # Without a window the whole range is stretched: the same column is mid-grey, not white.
    plain = grey(part10(dataset(ramp())))
    assert plain[0][40] < 200 < shown[0][40]


def test_rescale_slope_and_intercept_are_applied_before_the_window() -> None:
    # Stored 0..4095 with intercept -1024 are HU -1024..3071; the window -600..200 applies to HU, not stored.
    shown = grey(
        part10(dataset(ramp(), RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=-200, WindowWidth=800))
    )
    hu = np.linspace(0, 4095, 64) - 1024
    assert np.all(shown[0][hu >= 210] == 255)
    assert np.all(shown[0][hu <= -610] == 0)
    assert 0 < shown[0][(hu > -500) & (hu < 100)].min()


def test_multi_frame_reads_the_middle_frame_and_says_so() -> None:
    frames = np.stack([np.full((16, 16), level, np.uint8) for level in (10, 20, 200, 30, 40)])
    frames[:, 0, 0] = 0  # each frame has a black pixel, so brightness is stretched the same way
    decoded = decode_image(part10(dataset(frames)), "application/dicom", ROOMY)
    assert (decoded.frame, decoded.frames) == (3, 5)
    assert np.asarray(decoded.image.convert("L"))[8, 8] == 255


def test_too_many_frames_are_refused_before_decoding() -> None:
    frames = np.zeros((8, 4, 4), np.uint8)
    with pytest.raises(ImageRejected, match="the image has 8 frames, over the limit of 4"):
        decode_image(part10(dataset(frames)), "application/dicom", replace(ROOMY, max_frames=4))


def test_decoded_size_is_refused_from_the_header() -> None:
    # 1000 frames of 1000 x 1000 at 16 bits declared: 2 GB, refused before any pixel is read (none are here).
    ds = dataset(np.zeros((2, 2), np.uint16), Rows=1000, Columns=1000, NumberOfFrames=1000)
    with pytest.raises(ImageRejected, match=r"decodes to 2000000000 bytes, over the limit of 500000000"):
        decode_image(part10(ds), "application/dicom", replace(ROOMY, max_frames=2000))


def test_deflate_bomb_stops_at_the_limit() -> None:
    # A deflated dataset (PS3.5 A.5) whose 1 GiB of zeros compresses to about a megabyte.
    meta = dataset(np.zeros((2, 2), np.uint8)).file_meta
    meta.TransferSyntaxUID = DEFLATED
    head = io.BytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = b"\0" * (1 << 20)
    body = b"".join(compressor.compress(zeros) for _ in range(1024)) + compressor.flush()
    bomb = head.getvalue() + body
    assert len(bomb) < 2_000_000
    with pytest.raises(ImageRejected, match="inflates past the limit of 10000000 bytes"):
        decode_image(bomb, "application/dicom", replace(ROOMY, max_decoded_bytes=10_000_000))


def test_deflated_dataset_within_limits_decodes() -> None:
    ds = dataset(ramp(16, 16, 255).astype(np.uint8))
    ds.file_meta.TransferSyntaxUID = DEFLATED
    decoded = decode_image(part10(ds), "application/dicom", ROOMY)
    assert decoded.image.size == (16, 16)


def test_compressed_syntaxes_decode_through_pydicoms_handlers() -> None:
    pixels = ramp(32, 32, 4000)
    for syntax in (RLELossless, JPEG2000Lossless):
        ds = dataset(pixels)
        ds.compress(syntax)
        assert ds.file_meta.TransferSyntaxUID == syntax
        shown = grey(part10(ds))
        assert np.all(np.diff(shown[0]) >= 0) and shown[0][0] == 0 and shown[0][-1] == 255, syntax


def test_a_syntax_with_no_decoder_is_refused_with_its_name() -> None:
    ds = dataset(np.zeros((8, 8), np.uint8))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile: video, no decoder
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\0" * 60])
    ds["PixelData"].VR = "OB"
    with pytest.raises(ImageRejected, match=r"could not be decoded \(MPEG2"):
        decode_image(part10(ds), "application/dicom", ROOMY)


def test_a_compressed_frame_larger_than_its_header_says_is_refused() -> None:
    # The dataset says 16 x 16; its JPEG 2000 frame holds 512 x 512. The frame's own header gives it away.
    big = dataset(ramp(512, 512, 4000))
    big.compress(JPEG2000Lossless)
    lying = dataset(np.zeros((16, 16), np.uint16))
    lying.file_meta.TransferSyntaxUID = JPEG2000Lossless
    lying.PixelData = big.PixelData
    lying["PixelData"].VR = "OB"
    with pytest.raises(ImageRejected, match="declares more pixels"):
        decode_image(part10(lying), "application/dicom", ROOMY)


# --- What to read of a study --------------------------------------------------------------------------


def instance(series: str, number: int, modality: str, view: str = "", *, localizer: bool = False) -> dict:
    attributes: dict[str, Any] = {
        "0020000E": {"vr": "UI", "Value": [series]},
        "00080018": {"vr": "UI", "Value": [f"{series}.{number}"]},
        "00080060": {"vr": "CS", "Value": [modality]},
        "00200011": {"vr": "IS", "Value": [int(series.rsplit(".", 1)[1])]},
        "00200013": {"vr": "IS", "Value": [number]},
        "00280010": {"vr": "US", "Value": [512]},
        "00180015": {"vr": "CS", "Value": ["CHEST"]},
    }
    if view:
        attributes["00185101"] = {"vr": "CS", "Value": [view]}
    if localizer:
        attributes["00080008"] = {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}
    return attributes


def test_a_frontal_chest_view_is_read_over_a_lateral() -> None:
    chosen = choose_instance([instance("1.2.1", 1, "CR", "LL"), instance("1.2.2", 1, "CR", "PA")])
    assert chosen is not None
    assert (chosen.series_uid, chosen.instance_uid) == ("1.2.2", "1.2.2.1")
    assert chosen.description == "series 2 (CR, CHEST) 1.2.2, instance 1 1.2.2.1, view PA"
    ap = choose_instance([instance("1.2.1", 1, "DX", "LATERAL"), instance("1.2.1", 2, "DX", "AP")])
    assert ap is not None and ap.instance_uid == "1.2.1.2"


def test_a_ct_series_is_read_at_its_middle_slice_not_its_first() -> None:
    ct = [instance("1.3.4", n, "CT") for n in (3, 1, 5, 2, 4)] + [instance("1.3.4", 0, "CT", localizer=True)]
    chosen = choose_instance(ct)
    assert chosen is not None and chosen.instance_uid == "1.3.4.3"
    assert chosen.description.endswith("slice 3 of 5")


def test_radiographs_come_before_cross_sections_and_objects_without_pixels_are_skipped() -> None:
    report = {
        "0020000E": {"Value": ["1.9.9"]},
        "00080018": {"Value": ["1.9.9.1"]},
        "00080060": {"Value": ["SR"]},
    }
    chosen = choose_instance([report, instance("1.3.1", 1, "CT"), instance("1.3.2", 1, "CR")])
    assert chosen is not None and chosen.series_uid == "1.3.2"
    assert choose_instance([report]) is None
    assert choose_instance([]) is None
