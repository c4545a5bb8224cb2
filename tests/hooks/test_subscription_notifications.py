"""FHIR R4 Subscription notifications: a new X-ray's draft report is ready before anyone opens the chart.

End to end: ``medgemma-cds subscribe`` creates the rest-hook Subscriptions on the test FHIR server, which
delivers notifications as HAPI does (PUT ``{endpoint}/{type}/{id}`` with the resource, the secret header);
a real worker drafts the report; the first chart open carries the draft card. The receiver's refusals and
answers are checked over the Flask test client.
"""

from __future__ import annotations

import base64
import io
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from flask.testing import FlaskClient
from pacs import Pacs
from pacs import radiograph
from PIL import Image
from pydantic import SecretStr
from pydicom.uid import generate_uid
from support import SAMPLE
from support import FhirServer
from support import Issuer
from support import LiveServer
from support import ModelWorker
from support import free_port
from support import leaks_in_log
from support import wait_for_http
from test_imaging_dicomweb import pacs_study
from test_imaging_report_draft import fire

from cds_service.app import create_app
from cds_service.jobs import PRECOMPUTE_JOBS_KEY
from cds_service.jobs import PRECOMPUTE_MARK_PREFIX
from cds_service.jobs import ZERO_WAIT_KEY
from cds_service.jobs import JobStore
from cds_service.settings import Settings

SECRET = "subscription-secret-for-tests-7d1c"
DRAFT = "/cds-services/imaging-report-draft"


def new_xray() -> bytes:
    """A chest X-ray no earlier test sent: the sample with one pixel changed (a new image, a new job)."""
    image = Image.open(SAMPLE / "cxr-00000001_000.png")
    image.putpixel((random.randrange(image.width), random.randrange(image.height)), random.randrange(256))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def notified_server(
    live_server: LiveServer, fhir_server: FhirServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """``medgemma-cds serve`` configured like the live server, plus the notification receiver for the test
    FHIR server (the model workers serve it: same Redis, models and secret key)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = live_server.env | {
        "MEDGEMMA_CDS_PUBLIC_URL": url,
        "MEDGEMMA_CDS_FHIR_SUBSCRIPTION_SERVER": fhir_server.base_url,
        "MEDGEMMA_CDS_FHIR_SUBSCRIPTION_TOKEN": fhir_server.token,
        "MEDGEMMA_CDS_FHIR_SUBSCRIPTION_SECRET": SECRET,
    }
    log_path = tmp_path_factory.mktemp("notified") / "serve.log"
    script = str(Path(sys.executable).parent / "medgemma-cds")
    process = subprocess.Popen(
        [script, "serve", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_http(f"{url}/healthz")
        yield LiveServer(url=url, env=env)
    finally:
        process.terminate()
        process.wait(timeout=15)
    leaks = leaks_in_log(log_path, fhir_server.secrets() | {"subscription secret": SECRET})
    assert not leaks, f"the service logged {leaks} ({log_path})"


@pytest.fixture(scope="module")
def subscriptions(notified_server: LiveServer, fhir_server: FhirServer) -> Iterator[list[dict[str, Any]]]:
    """The Subscriptions ``medgemma-cds subscribe`` creates, removed afterwards (other tests' imaging must
    not be drafted behind their backs)."""
    endpoint = f"{notified_server.url}/fhir-notifications/imaging"
    command = [
        str(Path(sys.executable).parent / "medgemma-cds"),
        "subscribe",
        "--fhir-base",
        fhir_server.base_url,
        "--token",
        fhir_server.token,
        "--endpoint",
        endpoint,
    ]
    first = subprocess.run(command, env=notified_server.env, capture_output=True, text=True, check=True)
    assert first.stdout.count(" created: ") == 4, first.stdout
    # Run again (a redeploy): the same four are updated, none added.
    again = subprocess.run(command, env=notified_server.env, capture_output=True, text=True, check=True)
    assert again.stdout.count(" updated: ") == 4, again.stdout
    assert SECRET not in first.stdout + first.stderr + again.stdout + again.stderr
    found = fhir_server.search(f"Subscription?url={endpoint}")
    try:
        yield found
    finally:
        for subscription in found:
            httpx.delete(
                f"{fhir_server.base_url}/Subscription/{subscription['id']}",
                headers={"Authorization": f"Bearer {fhir_server.token}"},
            )


def test_subscribe_creates_a_rest_hook_per_imaging_type(subscriptions: list[dict[str, Any]]) -> None:
    assert sorted(s["criteria"] for s in subscriptions) == [
        "DiagnosticReport?",
        "DocumentReference?",
        "ImagingStudy?",
        "Media?",
    ]
    for subscription in subscriptions:
        channel = subscription["channel"]
        assert channel["type"] == "rest-hook" and channel["payload"] == "application/fhir+json"
        assert channel["header"] == [f"Authorization: Bearer {SECRET}"]
        assert subscription["status"] == "active", subscription.get("error")


def test_a_new_xray_is_drafted_before_the_chart_opens(
    notified_server: LiveServer,
    subscriptions: list[dict[str, Any]],
    model_worker: ModelWorker,
    issuer: Issuer,
    fhir_server: FhirServer,
) -> None:
    client = redis.Redis.from_url(notified_server.env["MEDGEMMA_CDS_REDIS_URL"])
    before = {m.decode() for m in client.smembers(PRECOMPUTE_JOBS_KEY)}
    patient = fhir_server.post({"resourceType": "Patient", "gender": "male", "birthDate": "1961-02-03"})
    subject = {"reference": f"Patient/{patient['id']}"}
    study = fhir_server.post(
        {
            "resourceType": "ImagingStudy",
            "status": "available",
            "subject": subject,
            "started": "2026-03-02T08:15:00+00:00",
            "series": [{"uid": "1.2.3", "modality": {"code": "DX", "display": "Digital Radiography"}}],
        },
    )
    binary = fhir_server.post(
        {"resourceType": "Binary", "contentType": "image/png", "data": base64.b64encode(new_xray()).decode()},
    )
    # The radiographer's system stores the image: the server notifies us, nobody opens a chart.
    fhir_server.post(
        {
            "resourceType": "Media",
            "status": "completed",
            "subject": subject,
            "partOf": [{"reference": f"ImagingStudy/{study['id']}"}],
            "createdDateTime": "2026-03-02T08:20:00+00:00",
            "content": {"contentType": "image/png", "url": f"Binary/{binary['id']}"},
        },
    )
    job_id = wait_for_new_job(client, before)
    record = wait_for_state(client, job_id, {b"done", b"failed"})
    assert record == b"done", client.hget(JobStore.key(job_id), "error")
    # It was precomputed work: sent to the precompute queue (marked), and no chart open promoted it.
    assert client.exists(PRECOMPUTE_MARK_PREFIX + job_id)

    # The first chart open: the draft card comes with the first answer, no "running" card.
    zero_wait = {k.decode(): int(v) for k, v in client.hgetall(ZERO_WAIT_KEY).items()}
    cards = fire(notified_server, issuer, fhir_server, patient["id"])
    summaries = [card["summary"] for card in cards]
    assert not [s for s in summaries if ": AI analysis " in s], summaries
    (draft,) = [card for card in cards if card["summary"].startswith("AI draft imaging")]
    assert draft["suggestions"][0]["actions"][0]["resource"]["status"] == "preliminary"
    after = {k.decode(): int(v) for k, v in client.hgetall(ZERO_WAIT_KEY).items()}
    key = "imaging-report-draft"
    assert after.get(f"{key}:first", 0) == zero_wait.get(f"{key}:first", 0) + 1
    assert after.get(f"{key}:ready", 0) == zero_wait.get(f"{key}:ready", 0) + 1
    metrics = httpx.get(f"{notified_server.url}/metrics").text
    assert 'medgemma_cds_precompute_requests_total{outcome="enqueued",trigger="subscription"}' in metrics


def test_a_radiograph_stored_only_in_the_pacs_is_drafted_before_the_chart_opens(
    notified_server: LiveServer,
    subscriptions: list[dict[str, Any]],
    model_worker: ModelWorker,
    issuer: Issuer,
    fhir_server: FhirServer,
    pacs: Pacs,
) -> None:
    client = redis.Redis.from_url(notified_server.env["MEDGEMMA_CDS_REDIS_URL"])
    before = {m.decode() for m in client.smembers(PRECOMPUTE_JOBS_KEY)}
    study_uid, series_uid = generate_uid(), generate_uid()
    pacs.upload(radiograph(study_uid, series_uid, series_number=1, instance_number=1, view="PA"))
    # The PACS tells the EHR, whose FHIR server now names the study: the server notifies us.
    patient_id = pacs_study(
        fhir_server, pacs.dicomweb, study_uid, [(series_uid, 1, "CR")], "2026-03-03T09:00:00Z"
    )
    job_id = wait_for_new_job(client, before)
    record = wait_for_state(client, job_id, {b"done", b"failed"})
    assert record == b"done", client.hget(JobStore.key(job_id), "error")

    # The first chart open: the draft card at once, naming what the worker read from the PACS.
    cards = fire(notified_server, issuer, fhir_server, patient_id)
    assert not [c["summary"] for c in cards if ": AI analysis " in c["summary"]]
    (draft,) = [card for card in cards if card["summary"].startswith("AI draft imaging")]
    assert f"**Image read:** series 1 (CR, CHEST) {series_uid}" in draft["detail"]


def wait_for_new_job(client: redis.Redis, before: set[str], timeout_s: float = 60) -> str:
    """Return the id of the imaging job a notification asked for (it joins the precomputed jobs)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job_id in {m.decode() for m in client.smembers(PRECOMPUTE_JOBS_KEY)} - before:
            if client.hget(JobStore.key(job_id), "service_id") == b"imaging-report-draft":
                return job_id
        time.sleep(0.1)
    raise AssertionError("no notification asked for an imaging job")


def wait_for_state(client: redis.Redis, job_id: str, states: set[bytes], timeout_s: float = 120) -> bytes:
    deadline = time.monotonic() + timeout_s
    state = None
    while time.monotonic() < deadline:
        state = client.hget(JobStore.key(job_id), "state")
        if state in states:
            return state
        time.sleep(0.1)
    raise AssertionError(f"job stayed {state}")


# --- The receiver's answers, over the test client -----------------------------------------------------


@pytest.fixture
def receiver(settings: Settings, fhir_server: FhirServer) -> FlaskClient:
    """An app whose notification receiver reads the test FHIR server."""
    configured = settings.model_copy(
        update={
            "fhir_subscription_server": fhir_server.base_url,
            "fhir_subscription_token": SecretStr(fhir_server.token),
            "fhir_subscription_secret": SecretStr(SECRET),
        }
    )
    return create_app(configured).test_client()


def put(client: FlaskClient, resource: dict[str, Any], secret: str | None = SECRET) -> Any:
    headers = {"Content-Type": "application/fhir+json; charset=UTF-8"}
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    path = f"/fhir-notifications/imaging/{resource['resourceType']}/{resource['id']}"
    return client.put(path, data=json.dumps(resource), headers=headers)


def diagnostics(response: Any) -> str:
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/fhir+json"
    (issue,) = response.json["issue"]
    return str(issue["diagnostics"])


def test_notifications_need_the_shared_secret(receiver: FlaskClient, client: FlaskClient) -> None:
    media = {
        "resourceType": "Media",
        "id": "m1",
        "status": "completed",
        "subject": {"reference": "Patient/x"},
    }
    assert put(receiver, media, secret=None).status_code == 401
    assert put(receiver, media, secret="not-the-secret").status_code == 401
    # A receiver that is not configured (no secret, no server) refuses everything as unknown.
    assert put(client, media).status_code == 404
    assert (
        receiver.post("/fhir-notifications/other", headers={"Authorization": f"Bearer {SECRET}"}).status_code
        == 404
    )


def test_what_is_not_a_new_image_is_acknowledged_and_ignored(
    receiver: FlaskClient, fhir_server: FhirServer, redis_client: redis.Redis
) -> None:
    before = redis_client.scard(PRECOMPUTE_JOBS_KEY)
    # A patient of this test's own: other tests attach images to the sample patients.
    patient_id = fhir_server.post({"resourceType": "Patient", "gender": "female"})["id"]
    auth = {"Authorization": f"Bearer {SECRET}"}
    assert "not an imaging resource" in diagnostics(
        put(receiver, {"resourceType": "Patient", "id": patient_id})
    )
    # HAPI without a payload: an empty POST says something changed, not what.
    assert "empty notification" in diagnostics(receiver.post("/fhir-notifications/imaging", headers=auth))
    assert "deletion" in diagnostics(receiver.delete("/fhir-notifications/imaging/Media/m1", headers=auth))
    # A report on a patient with no unreported image: nothing to draft.
    report = {
        "resourceType": "DiagnosticReport",
        "id": "r1",
        "status": "final",
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    assert diagnostics(put(receiver, report)) == "nothing"
    # Some servers POST the resource to the endpoint itself: read the same way.
    posted = receiver.post("/fhir-notifications/imaging", data=json.dumps(report), headers=auth)
    assert diagnostics(posted) == "nothing"
    assert redis_client.scard(PRECOMPUTE_JOBS_KEY) == before


def test_a_notification_must_be_the_resource_its_url_names(receiver: FlaskClient) -> None:
    media = {"resourceType": "Media", "id": "m1", "subject": {"reference": "Patient/x"}}
    path = "/fhir-notifications/imaging/Media/m2"
    headers = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/fhir+json"}
    assert receiver.put(path, data=json.dumps(media), headers=headers).status_code == 400
    assert receiver.put(path, data="{not json", headers=headers).status_code == 400
    assert receiver.put(path, data="[1]", headers=headers).status_code == 400


def test_the_receiver_is_documented(receiver: FlaskClient) -> None:
    document = receiver.get("/openapi.json").json
    put_operation = document["paths"]["/fhir-notifications/{channel_id}/{resource_type}/{resource_id}"]["put"]
    assert put_operation["security"] == [{"fhirSubscriptionSecret": []}]
    assert {"200", "400", "401", "404"} <= set(put_operation["responses"])
    assert "post" in document["paths"]["/fhir-notifications/{channel_id}"]
