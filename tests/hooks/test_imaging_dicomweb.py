"""Images where hospitals keep them: a study on a real PACS (Orthanc, DICOMweb) that an ImagingStudy names.

The study is uploaded to Orthanc, an ImagingStudy and its Endpoint are created on the test FHIR server, the
hook is fired, and the image worker fetches and reads the study: the draft names the series and instance it
read (a PA chest over a lateral), and the signed report and its Provenance name the study. An endpoint off
the allowlist, a PACS that refuses the worker's credential and a transfer syntax without a decoder each get
a card saying so.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs
from urllib.parse import urlencode
from urllib.parse import urlsplit

import httpx
import numpy as np
from pacs import Pacs
from pacs import radiograph
from playwright.sync_api import sync_playwright
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid
from smart_server import SmartServer
from support import FhirServer
from support import Issuer
from support import LiveServer
from support import ModelWorker
from support import fhir_access
from test_imaging_report_draft import CHROMIUM
from test_imaging_report_draft import POSITION
from test_imaging_report_draft import changes_the_picture
from test_imaging_report_draft import fire

UNREADABLE = "An image could not be read for AI drafting"
DRAFT_SYSTEM = "urn:medgemma-cds:draft-report"


def pacs_study(
    fhir: FhirServer, address: str, study_uid: str, series: list[tuple[str, int, str]], started: str
) -> str:
    """Create a patient, an Endpoint for ``address`` and an ImagingStudy listing ``series`` (no instances);
    return the patient's id."""
    patient = fhir.post({"resourceType": "Patient", "gender": "male", "birthDate": "1961-02-03"})
    endpoint = fhir.post(
        {
            "resourceType": "Endpoint",
            "status": "active",
            "connectionType": {
                "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                "code": "dicom-wado-rs",
            },
            "payloadType": [{"text": "DICOM"}],
            "address": address,
        }
    )
    fhir.post(
        {
            "resourceType": "ImagingStudy",
            "status": "available",
            "subject": {"reference": f"Patient/{patient['id']}"},
            "started": started,
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
            "endpoint": [{"reference": f"Endpoint/{endpoint['id']}"}],
            "series": [
                {
                    "uid": uid,
                    "number": number,
                    "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": modality},
                    "bodySite": {"system": "http://snomed.info/sct", "code": "51185008", "display": "Chest"},
                }
                for uid, number, modality in series
            ],
        }
    )
    return str(patient["id"])


def card_when_settled(
    server: LiveServer,
    issuer: Issuer,
    fhir: FhirServer,
    patient_id: str,
    summary: str,
    access: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fire until the "running" card gives way to the card whose summary starts with ``summary``."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        cards = [
            c for c in fire(server, issuer, fhir, patient_id, access) if c["summary"].startswith(summary)
        ]
        if cards:
            return cards[0]
        time.sleep(0.5)
    raise AssertionError(f"no card {summary!r} arrived")


def sop_uid(pacs: Pacs, uploaded: dict[str, Any]) -> str:
    tags = httpx.get(
        f"{pacs.url}/instances/{uploaded['ID']}/simplified-tags",
        headers={"Authorization": pacs.authorization},
    )
    return str(tags.json()["SOPInstanceUID"])


def test_a_study_on_the_pacs_is_read_at_its_frontal_view_reviewed_in_the_viewer_and_signed(
    live_server: LiveServer,
    model_worker: ModelWorker,
    issuer: Issuer,
    fhir_server: FhirServer,
    smart_server: SmartServer,
    pacs: Pacs,
) -> None:
    study_uid, lateral_series, frontal_series = generate_uid(), generate_uid(), generate_uid()
    ramp = np.tile(np.arange(64, dtype=np.uint16) * 64, (64, 1))
    lateral_image = radiograph(
        study_uid, lateral_series, series_number=1, instance_number=1, view="LL", pixels=ramp.T
    )
    frontal_image = radiograph(
        study_uid, frontal_series, series_number=2, instance_number=1, view="PA", pixels=ramp
    )
    lateral_uid = sop_uid(pacs, pacs.upload(lateral_image))
    frontal_uid = sop_uid(pacs, pacs.upload(frontal_image))
    patient_id = pacs_study(
        fhir_server,
        pacs.dicomweb,
        study_uid,
        [(lateral_series, 1, "CR"), (frontal_series, 2, "CR")],
        "2024-01-05T09:00:00+00:00",
    )
    # The EHR calls with its SMART FHIR base and a token it issued: the worker reads the Endpoint with it.
    ehr_access = fhir_access(smart_server.iss, smart_server.issue_token(patient_id))

    card = card_when_settled(live_server, issuer, fhir_server, patient_id, "AI draft imaging", ehr_access)

    read = f"series 2 (CR, CHEST) {frontal_series}, instance 1 {frontal_uid}, view PA"
    assert f"**Image read:** {read}" in card["detail"]
    # The worker fetched the frontal view only (with the configured credential: the PACS requires it).
    assert pacs.instance_requests(frontal_uid) == 1
    assert pacs.instance_requests(lateral_uid) == 0
    report = card["suggestions"][0]["actions"][0]["resource"]
    (study,) = report["imagingStudy"]
    assert study["reference"].startswith("ImagingStudy/")
    assert study["identifier"] == {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}

    # The clinician opens the card's SMART link: the study in the viewer, opened at the instance read.
    draft_id = parse_qs(urlsplit(card["links"][0]["url"]).query)["draft"][0]
    launch = smart_server.mint_launch(patient_id, "Practitioner/COREPRACTITIONER1")
    launch_url = f"{card['links'][0]['url']}&{urlencode({'iss': smart_server.iss, 'launch': launch})}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(launch_url)
        page.wait_for_selector("#viewer[data-ready]", timeout=30_000)
        assert page.get_attribute("#viewer", "data-ready") == "true", page.inner_text("#viewer-status")
        assert page.inner_text("#viewer-position") == "series 2 · CR: image 1 of 1"
        assert page.is_visible("#read-marker") and frontal_uid in page.inner_text("#read-marker")
        # Zoom, pan and a window preset each change what is drawn; so does scrolling to the other series,
        # where the marker goes: the model did not read that one.
        for action in ("zoom-in", "pan-left", "window-bone", "reset"):
            changes_the_picture(page, action)
        changes_the_picture(page, "next-series")
        page.wait_for_function(f"({POSITION})() === 'series 1 · CR: image 1 of 1'")
        assert not page.is_visible("#read-marker")
        changes_the_picture(page, "show-read")
        page.wait_for_function(f"({POSITION})() === 'series 2 · CR: image 1 of 1'")
        assert page.is_visible("#read-marker")
        # The browser read the other instance through the review app, never from the PACS itself.
        assert pacs.instance_requests(lateral_uid) == 1
        page.fill("#text", "FINDINGS:\nClear.\n\nIMPRESSION:\nNormal.")
        page.click("#sign")
        page.wait_for_selector("#written")
        browser.close()

    # Signed, the report and the AI's Provenance reach the FHIR server naming the study and the instance.
    (written,) = fhir_server.search(f"DiagnosticReport?identifier={DRAFT_SYSTEM}|{draft_id}")
    assert written["status"] == "final"
    assert written["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study_uid}"
    (created,) = [
        p
        for p in fhir_server.search("Provenance?_count=500")
        if p["target"][0]["reference"] == f"DiagnosticReport/{written['id']}"
        and p["activity"]["coding"][0]["code"] == "CREATE"
    ]
    identifiers = [entity["what"].get("identifier", {}).get("value") for entity in created["entity"]]
    assert identifiers == [f"urn:oid:{study_uid}", f"urn:oid:{frontal_uid}"]
    assert created["entity"][0]["what"]["reference"] == study["reference"]


def test_a_study_the_worker_cannot_read_gets_a_card_saying_why(
    live_server: LiveServer,
    model_worker: ModelWorker,
    issuer: Issuer,
    fhir_server: FhirServer,
    pacs: Pacs,
    other_pacs: Pacs,
) -> None:
    def study_on(server: Pacs, address: str, **image: Any) -> tuple[str, str]:
        study_uid, series_uid = generate_uid(), generate_uid()
        server.upload(
            radiograph(study_uid, series_uid, series_number=1, instance_number=1, view="PA", **image)
        )
        patient_id = pacs_study(
            fhir_server, address, study_uid, [(series_uid, 1, "CR")], "2024-02-01T10:00:00Z"
        )
        return patient_id, study_uid

    # The same PACS under a name the allowlist doesn't list: refused before any request is made.
    off_list, off_list_study = study_on(pacs, pacs.dicomweb.replace("http://127.0.0.1", "https://localhost"))
    # An allowlisted PACS that doesn't accept the workers' credential.
    refused, _ = study_on(other_pacs, other_pacs.dicomweb)
    # MPEG-2 video in a radiograph's pixel data: stored and served as is, but there is no decoder for it.
    mpeg2 = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 252])
    undecodable, _ = study_on(
        pacs, pacs.dicomweb, transfer_syntax="1.2.840.10008.1.2.4.100", pixel_data=mpeg2
    )

    expected = {
        off_list: "the DICOMweb endpoint is not on the DICOMweb allowlist",
        refused: "the PACS refused the credentials (401)",
        undecodable: "the DICOM pixel data could not be decoded (MPEG2",
    }
    for patient_id, reason in expected.items():
        card = card_when_settled(live_server, issuer, fhir_server, patient_id, UNREADABLE)
        assert card["indicator"] == "warning"
        assert reason in card["detail"], card["detail"]
        assert "No AI draft report was made" in card["detail"]
    # The unlisted endpoint was never asked anything.
    assert pacs.requests(off_list_study) == []
