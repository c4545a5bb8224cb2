"""The sample chest radiograph on a PACS: uploaded to Orthanc, named in FHIR by an ImagingStudy and Endpoint.

``load-sample-data --pacs`` runs this after the sample charts, so a fresh stack shows the whole DICOMweb path:
a study stored only in the PACS, which the FHIR server names, and which the worker fetches. It loads once: a
second run finds the ImagingStudy by its Study Instance UID and changes nothing.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

import httpx

SAMPLE_DICOM = Path(__file__).parent / "data" / "sample" / "fake-monochrome-cxr.dcm"
PATIENT_SYSTEM = "urn:medgemma-cds:sample-pacs-patient"
DICOM_MODALITY = "http://dicom.nema.org/resources/ontology/DCM"
CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"


def dicomweb_root_of(pacs: str) -> str:
    """Return Orthanc's DICOMweb root (its plugin's default ``/dicom-web``) without the user information."""
    parts = urlsplit(pacs.rstrip("/"))
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) + "/dicom-web"


def upload_to_orthanc(pacs: str, dicom: bytes, wait_s: float = 120.0) -> None:
    """Store a DICOM file in Orthanc (its REST ``POST /instances``), waiting for it to come up.

    ``pacs`` may carry ``user:password@`` for Orthanc's basic authentication.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            answer = httpx.post(f"{pacs.rstrip('/')}/instances", content=dicom, timeout=60)
            answer.raise_for_status()
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def sample_study_resources(
    dataset: Any, dicomweb_root: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Return the Patient, Endpoint and ImagingStudy (its subject and endpoint still to fill in) of a DICOM
    dataset held at ``dicomweb_root``."""
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": PATIENT_SYSTEM, "value": str(dataset.PatientID)}],
        "name": [{"text": "Sample PACS patient"}],
        "gender": {"M": "male", "F": "female"}.get(str(dataset.get("PatientSex", "")), "unknown"),
    }
    endpoint = {
        "resourceType": "Endpoint",
        "status": "active",
        "name": "Sample PACS (DICOMweb)",
        "connectionType": {"system": CONNECTION_TYPE, "code": "dicom-wado-rs"},
        "payloadType": [{"text": "DICOM WADO-RS"}],
        "payloadMimeType": ["application/dicom"],
        "address": dicomweb_root,
    }
    study_date = str(dataset.get("StudyDate", ""))
    study = {
        "resourceType": "ImagingStudy",
        "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{dataset.StudyInstanceUID}"}],
        "numberOfSeries": 1,
        "numberOfInstances": 1,
        "series": [
            {
                "uid": str(dataset.SeriesInstanceUID),
                "number": int(dataset.get("SeriesNumber", 1) or 1),
                "modality": {"system": DICOM_MODALITY, "code": str(dataset.Modality)},
                "bodySite": {"system": "http://snomed.info/sct", "code": "51185008", "display": "Chest"},
                "instance": [
                    {
                        "uid": str(dataset.SOPInstanceUID),
                        "number": int(dataset.get("InstanceNumber", 1) or 1),
                        "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{dataset.SOPClassUID}"},
                    }
                ],
            }
        ],
    }
    if len(study_date) == 8:
        study["started"] = f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:]}"
    return patient, endpoint, study


def load_sample_study(fhir: httpx.Client, fhir_base: str, pacs: str, dicomweb_root: str) -> str:
    """Upload the sample radiograph to the PACS and name it in FHIR once; return what was done, in words."""
    import pydicom

    dicom = SAMPLE_DICOM.read_bytes()
    dataset = pydicom.dcmread(io.BytesIO(dicom), stop_before_pixels=True)
    upload_to_orthanc(pacs, dicom)
    base = fhir_base.rstrip("/")
    uid = f"urn:dicom:uid|urn:oid:{dataset.StudyInstanceUID}"
    found = fhir.get(f"{base}/ImagingStudy", params={"identifier": uid})
    found.raise_for_status()
    if found.json().get("entry"):
        return f"sample PACS study: already loaded, ImagingStudy/{found.json()['entry'][0]['resource']['id']}"
    patient, endpoint, study = sample_study_resources(dataset, dicomweb_root)
    created = {}
    for name, resource in (("Patient", patient), ("Endpoint", endpoint)):
        answer = fhir.post(f"{base}/{name}", json=resource)
        answer.raise_for_status()
        created[name] = answer.json()["id"]
    study["subject"] = {"reference": f"Patient/{created['Patient']}"}
    study["endpoint"] = [{"reference": f"Endpoint/{created['Endpoint']}"}]
    answer = fhir.post(f"{base}/ImagingStudy", json=study)
    answer.raise_for_status()
    study_ref, patient_ref = f"ImagingStudy/{answer.json()['id']}", f"Patient/{created['Patient']}"
    return f"sample PACS study: stored in the PACS, {study_ref} for {patient_ref}"
