"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin, on free loopback ports.

Each ``Pacs`` has a temporary storage folder and HTTP basic authentication with one user, so a test can tell
a request that carried the configured credential from one that did not. ``--verbose`` logs each HTTP
request, which a test can count. DICOM files for the studies are built with pydicom.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydicom.dataset import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import generate_uid
from support import wait_for_http

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
#: The user the workers' configured credential names, and one they don't have.
PACS_USER = ("medgemma-worker", "pacs-secret-7c1")
OTHER_USER = ("someone-else", "another-secret-04d")


def basic_authorization(user: tuple[str, str]) -> str:
    """Return the HTTP basic Authorization header value for a user and password."""
    return "Basic " + base64.b64encode(":".join(user).encode()).decode()


@dataclass(frozen=True)
class Pacs:
    """A running Orthanc: its REST root, DICOMweb root, the user it accepts and its request log."""

    url: str
    user: tuple[str, str]
    log_path: Path

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def authorization(self) -> str:
        return basic_authorization(self.user)

    def upload(self, dicom: bytes) -> dict[str, Any]:
        answer = httpx.post(
            f"{self.url}/instances", content=dicom, headers={"Authorization": self.authorization}, timeout=30
        )
        answer.raise_for_status()
        return dict(answer.json())

    def instance_requests(self, instance_uid: str) -> int:
        """Return how many WADO-RS requests asked for an instance (the request lines naming it)."""
        return len(self.requests(f"/instances/{instance_uid}"))

    def requests(self, fragment: str) -> list[str]:
        """Return the HTTP request lines of the log whose path contains ``fragment``."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if "(http) GET" in line and fragment in line]


@contextmanager
def running_pacs(workdir: Path, http_port: int, dicom_port: int, user: tuple[str, str]) -> Iterator[Pacs]:
    """Start Orthanc on ``http_port`` with its DICOMweb plugin and basic auth for ``user``; stop it after."""
    storage = workdir / "storage"
    storage.mkdir(parents=True)
    config = {
        "Name": "medgemma-cds-test-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user[0]: user[1]},
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    log_path = workdir / "orthanc.log"
    process = subprocess.Popen(
        [ORTHANC, "--verbose", str(workdir / "orthanc.json")],
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_for_http(f"{url}/system", timeout_s=60)
        yield Pacs(url=url, user=user, log_path=log_path)
    finally:
        process.terminate()
        process.wait(timeout=15)
        shutil.rmtree(storage, ignore_errors=True)


def radiograph(
    study_uid: str,
    series_uid: str,
    *,
    series_number: int,
    instance_number: int,
    modality: str = "CR",
    view: str = "",
    pixels: np.ndarray | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    pixel_data: bytes | None = None,
) -> bytes:
    """Return a small DICOM Part 10 image of a study's series (a gradient unless ``pixels`` are given)."""
    values = pixels if pixels is not None else np.tile(np.arange(64, dtype=np.uint16) * 64, (64, 1))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName = "TEST-PACS-1", "Test^Pacs"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.Modality, ds.BodyPartExamined = "20240105", modality, "CHEST"
    ds.SeriesNumber, ds.InstanceNumber = series_number, instance_number
    if view:
        ds.ViewPosition = view
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = values.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = pixel_data if pixel_data is not None else values.astype(np.uint16).tobytes()
    if pixel_data is not None:
        ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
