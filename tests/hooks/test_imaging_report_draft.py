"""imaging-report-draft end to end: FHIR server, Redis, Celery worker (tiny model), gunicorn, Chromium.

Attach a chest X-ray to a patient's ImagingStudy, fire patient-view through the EHR's (SMART) FHIR server,
get the pending card, re-fire and get the draft card, EHR-launch its SMART link in headless Chromium, sign
as the clinician the EHR authenticated, and read the final report and both Provenances back from the FHIR
server. Also: reject, double sign, and a patient deleted before sign-off (through the EHR's JSON API).
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from urllib.parse import urlencode
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import sync_playwright
from smart_server import SmartServer
from support import SAMPLE
from support import FhirServer
from support import Issuer
from support import LiveServer
from support import ModelWorker
from support import fhir_access
from support import waiting

PATH = "/cds-services/imaging-report-draft"
DRAFT_SYSTEM = "urn:medgemma-cds:draft-report"
CHROMIUM = "/usr/bin/chromium"


def fire(
    server: LiveServer,
    issuer: Issuer,
    fhir: FhirServer,
    patient_id: str,
    access: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        **(access or fhir_access(fhir.base_url, fhir.token)),
        "context": {"userId": "Practitioner/COREPRACTITIONER1", "patientId": patient_id},
    }
    token = issuer.token(server.url + PATH)
    response = httpx.post(
        server.url + PATH, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    return list(response.json()["cards"])


def draft_card_when_ready(
    server: LiveServer,
    issuer: Issuer,
    fhir: FhirServer,
    patient_id: str,
    access: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fire until the draft card replaces the "running" card (the model job finishes in the worker)."""
    first = fire(server, issuer, fhir, patient_id, access)
    assert len([c for c in first if c["summary"] in waiting("Imaging report draft")]) == 1, first
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        cards = [
            c
            for c in fire(server, issuer, fhir, patient_id, access)
            if c["summary"].startswith("AI draft imaging")
        ]
        if cards:
            return cards[0]
        time.sleep(0.5)
    raise AssertionError("the draft card never arrived")


SNAPSHOT = "() => document.querySelector('#viewer canvas').toDataURL()"
POSITION = "() => document.querySelector('#viewer-position').textContent"


def changes_the_picture(page: Any, action: str) -> None:
    """Click a viewer button and wait until the canvas shows something else (it redraws on the next frame)."""
    page.evaluate(f"window.before = ({SNAPSHOT})()")
    page.click(f"[data-viewer-action={action}]")
    page.wait_for_function(f"({SNAPSHOT})() !== window.before", timeout=10_000)


def search(fhir: FhirServer, query: str) -> list[dict[str, Any]]:
    return fhir.search(query)


def media_with_image(patient_id: str, **image: Any) -> dict[str, Any]:
    return {
        "resourceType": "Media",
        "status": "completed",
        "subject": {"reference": f"Patient/{patient_id}"},
    } | image


@pytest.fixture(scope="module")
def chest_xray_patient(fhir_server: FhirServer) -> str:
    """Louis Erdman's chest ImagingStudy gets its image: a Binary PNG and a Media."""
    patient_id = fhir_server.patients["Erdman"]
    study = search(fhir_server, f"ImagingStudy?patient={patient_id}")[0]
    png = (SAMPLE / "cxr-00000001_000.png").read_bytes()
    binary = fhir_server.post(
        {"resourceType": "Binary", "contentType": "image/png", "data": base64.b64encode(png).decode()},
    )
    fhir_server.post(
        media_with_image(
            patient_id,
            partOf=[{"reference": f"ImagingStudy/{study['id']}"}],
            createdDateTime="2018-04-13T16:30:00+00:00",
            content={"contentType": "image/png", "url": f"Binary/{binary['id']}"},
        ),
    )
    return patient_id


def draft_id_of(card: dict[str, Any]) -> str:
    """Return the draft a card's SMART link names in its own URL."""
    link = card["links"][0]
    assert link["type"] == "smart" and json.loads(link["appContext"]) == {"draftId": link_draft_id(link)}
    return link_draft_id(link)


def link_draft_id(link: dict[str, Any]) -> str:
    return parse_qs(urlsplit(link["url"]).query)["draft"][0]


def test_draft_signed_in_browser_after_an_ehr_launch_names_the_launched_clinician(
    live_server: LiveServer,
    model_worker: ModelWorker,
    issuer: Issuer,
    fhir_server: FhirServer,
    smart_server: SmartServer,
    chest_xray_patient: str,
) -> None:
    smart_server.reset()
    clinician = fhir_server.post(
        {"resourceType": "Practitioner", "name": [{"given": ["Grace"], "family": "Signer"}]}
    )
    practitioner = f"Practitioner/{clinician['id']}"
    # The EHR calls the hook with its own FHIR base (the SMART server's) and a token it issued.
    ehr_access = fhir_access(smart_server.iss, smart_server.issue_token(chest_xray_patient))
    card = draft_card_when_ready(live_server, issuer, fhir_server, chest_xray_patient, ehr_access)
    assert "requires clinician review" in card["detail"]
    # The model is named by its folder, never by the path it was loaded from (cards and the record).
    assert live_server.env["MEDGEMMA_CDS_IMAGE_MODEL"] not in card["source"]["label"]
    (action,) = card["suggestions"][0]["actions"]
    assert action["type"] == "create"
    assert action["resource"]["resourceType"] == "DiagnosticReport"
    assert action["resource"]["status"] == "preliminary"
    draft_id = draft_id_of(card)
    # No development link outside development mode: only the SMART link.
    assert [link["type"] for link in card["links"]] == ["smart"]

    # What the EHR does with a smart link: append its iss and an opaque launch to the app's URL.
    launch = smart_server.mint_launch(chest_xray_patient, practitioner)
    launch_url = f"{card['links'][0]['url']}&{urlencode({'iss': smart_server.iss, 'launch': launch})}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        page = browser.new_page()
        page.goto(launch_url)  # → authorize (auto-approved) → callback → the draft
        assert "not a clinical-grade model" in page.inner_text(".warning")
        assert page.evaluate("document.querySelector('img').naturalWidth") > 0
        # The attached picture in the viewer: it zooms and pans like a study from a PACS.
        page.wait_for_selector("#viewer[data-ready]", timeout=30_000)
        assert page.get_attribute("#viewer", "data-ready") == "true", page.inner_text("#viewer-status")
        assert page.inner_text("#viewer-position") == "attached image: image 1 of 1"
        for action in ("zoom-in", "pan-right"):
            changes_the_picture(page, action)
        assert page.inner_text("#user") == "Grace Signer"
        assert page.query_selector("#practitioner") is None  # nobody types who they are
        csrf = page.input_value("input[name=csrf]")
        cookies = {c["name"]: c["value"] for c in page.context.cookies()}
        page.fill(
            "#text",
            "FINDINGS:\nNo acute abnormality (edited by the signing clinician).\n\n"
            "IMPRESSION:\nNormal chest.",
        )
        page.click("#sign")
        page.wait_for_selector("#written")
        # The tiny model's long unbroken text wraps: the confirmation is on screen, not off to the right.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert page.inner_text("#status").lower() == "signed"
        assert "edited by the signing clinician" in page.inner_text("#signed-text")
        assert "FINDINGS" in page.inner_text("#ai-text")
        browser.close()

    (report,) = search(fhir_server, f"DiagnosticReport?identifier={DRAFT_SYSTEM}|{draft_id}")
    assert report["status"] == "final"
    assert report["resultsInterpreter"][0] == {"reference": practitioner, "display": "Grace Signer"}
    assert report["conclusion"] == "Normal chest."
    assert "edited by the signing clinician" in base64.b64decode(report["presentedForm"][0]["data"]).decode()
    provenances = [
        p
        for p in search(fhir_server, "Provenance?_count=500")
        if p["target"][0]["reference"] == f"DiagnosticReport/{report['id']}"
    ]
    activities = sorted(p["activity"]["coding"][0]["code"] for p in provenances)
    assert activities == ["CREATE", "VERIFY"]
    model_agent = next(p for p in provenances if p["activity"]["coding"][0]["code"] == "CREATE")
    assert model_agent["contained"][0]["resourceType"] == "Device"
    assert live_server.env["MEDGEMMA_CDS_IMAGE_MODEL"] not in json.dumps(model_agent)
    verify = next(p for p in provenances if p["activity"]["coding"][0]["code"] == "VERIFY")
    assert verify["agent"][0]["who"]["reference"] == practitioner
    # The EHR's FHIR server saw the write with the token it gave this clinician at launch.
    clinician_tokens = {
        t.access_token for t in smart_server.issued_tokens if t.user.fhir_user == practitioner
    }
    writes = [r for r in smart_server.requests if r.method == "POST"]
    assert writes and {w.token for w in writes} <= clinician_tokens

    # A double-click (two more sign submissions at once) writes nothing more.
    form = {"csrf": csrf, "text": "again"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(
                lambda _: httpx.post(
                    f"{live_server.url}/review/drafts/{draft_id}/sign", data=form, cookies=cookies
                ),
                range(2),
            )
        )
    assert [a.status_code for a in answers] == [200, 200]
    assert len(search(fhir_server, f"DiagnosticReport?identifier={DRAFT_SYSTEM}|{draft_id}")) == 1

    path = "/drafts"
    worklist = httpx.get(
        f"{live_server.url}{path}",
        params={"patient": chest_xray_patient, "status": "signed"},
        headers={"Authorization": f"Bearer {issuer.token(live_server.url + path)}"},
    ).json()["drafts"]
    (signed,) = [d for d in worklist if d["id"] == draft_id]
    assert signed["aiText"] != signed["signedText"]
    assert signed["writtenTo"] == f"DiagnosticReport/{report['id']}"

    # The same study does not get a second draft when the chart is opened again: it is reported now.
    assert not [
        c
        for c in fire(live_server, issuer, fhir_server, chest_xray_patient, ehr_access)
        if "AI" in c["summary"]
    ]


def test_rejected_dicom_draft_writes_nothing(
    live_server: LiveServer,
    model_worker: ModelWorker,
    issuer: Issuer,
    other_issuer: Issuer,
    fhir_server: FhirServer,
) -> None:
    patient_id = fhir_server.patients["Trantow"]
    dicom = (SAMPLE / "fake-monochrome-cxr.dcm").read_bytes()
    fhir_server.post(
        media_with_image(
            patient_id,
            createdDateTime="2020-01-01T00:00:00+00:00",
            content={"contentType": "application/dicom", "data": base64.b64encode(dicom).decode()},
        ),
    )
    card = draft_card_when_ready(live_server, issuer, fhir_server, patient_id)
    draft_id = draft_id_of(card)
    reject_path = f"/drafts/{draft_id}/reject"
    # The draft belongs to the EHR whose hook call made it: another trusted EHR neither sees nor decides it.
    for method, path, body in (("GET", f"/drafts/{draft_id}", None), ("POST", reject_path, {"reason": "x"})):
        headers = {"Authorization": f"Bearer {other_issuer.token(live_server.url + path)}"}
        body = body and body | {"practitioner": "Practitioner/COREPRACTITIONER1"}
        assert httpx.request(method, live_server.url + path, json=body, headers=headers).status_code == 404
    answer = httpx.post(
        live_server.url + reject_path,
        json={"reason": "Wrong side marker", "practitioner": "Practitioner/COREPRACTITIONER1"},
        headers={"Authorization": f"Bearer {issuer.token(live_server.url + reject_path)}"},
    )
    assert answer.status_code == 200
    assert answer.json()["rejectReason"] == "Wrong side marker"
    path = f"/drafts/{draft_id}"
    draft = httpx.get(
        live_server.url + path, headers={"Authorization": f"Bearer {issuer.token(live_server.url + path)}"}
    ).json()
    assert draft["status"] == "rejected" and draft["rejectReason"] == "Wrong side marker"
    assert search(fhir_server, f"DiagnosticReport?identifier={DRAFT_SYSTEM}|{draft_id}") == []
    sign_path = f"/drafts/{draft_id}/sign"
    refused = httpx.post(
        live_server.url + sign_path,
        json={"text": "x", "practitioner": "Practitioner/1", "practitionerName": "Y"},
        headers={"Authorization": f"Bearer {issuer.token(live_server.url + sign_path)}"},
    )
    assert refused.status_code == 409


def test_draft_for_deleted_patient_fails_cleanly(
    live_server: LiveServer,
    model_worker: ModelWorker,
    issuer: Issuer,
    fhir_server: FhirServer,
    tmp_path: Path,
) -> None:
    patient = fhir_server.post({"resourceType": "Patient", "gender": "female", "birthDate": "1970-01-01"})
    png = (SAMPLE / "cxr-00000001_000.png").read_bytes()[:-1] + b"\x00"  # other bytes, same picture header
    from PIL import Image

    flipped = tmp_path / "flipped.png"
    Image.open(SAMPLE / "cxr-00000001_000.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    del png
    fhir_server.post(
        media_with_image(
            patient["id"],
            content={"contentType": "image/png", "data": base64.b64encode(flipped.read_bytes()).decode()},
        ),
    )
    card = draft_card_when_ready(live_server, issuer, fhir_server, patient["id"])
    draft_id = draft_id_of(card)
    httpx.delete(
        f"{fhir_server.base_url}/Patient/{patient['id']}",
        headers={"Authorization": f"Bearer {fhir_server.token}"},
    )
    path = f"/drafts/{draft_id}/sign"
    answer = httpx.post(
        live_server.url + path,
        json={
            "text": "FINDINGS:\nx\n\nIMPRESSION:\ny",
            "practitioner": "Practitioner/1",
            "practitionerName": "Z",
        },
        headers={"Authorization": f"Bearer {issuer.token(live_server.url + path)}"},
    )
    assert answer.status_code == 409
    assert "no longer exists" in answer.json()["message"]
    assert search(fhir_server, f"DiagnosticReport?identifier={DRAFT_SYSTEM}|{draft_id}") == []
