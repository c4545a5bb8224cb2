"""AI states in plain words, on the card and on the job's page, with real model workers: alive (queued with
its position and expected wait, running, done), dead (unavailable, and the hook doesn't wait), failing (the
card says what failed, on the imaging service too: never silence)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from support import SAMPLE
from support import SECRET_KEY
from support import Issuer
from support import RedisServer
from support import model_env
from support import service_env

from cds_service.app import create_app
from cds_service.job_progress import MAX_SCAN
from cds_service.job_progress import jobs_ahead
from cds_service.jobs import PRECOMPUTE_QUEUES
from cds_service.jobs import QUEUES
from cds_service.jobs import live_workers
from cds_service.settings import Settings

SUMMARY = "/cds-services/patient-summary"
IMAGING = "/cds-services/imaging-report-draft"
BROWSER = "text/html,application/xhtml+xml"
OTHER_SECRET = "a-different-secret-the-api-does-not-have-7c1e"


def empty_bundle() -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": 0}


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def summary_body(patient_id: str) -> dict[str, Any]:
    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/COREPRACTITIONER1", "patientId": patient_id},
        "prefetch": {
            "patient": {"resourceType": "Patient", "id": patient_id, "birthDate": "1960-01-01"},
            "conditions": empty_bundle(),
            "medications": empty_bundle(),
            "allergies": empty_bundle(),
            "observations": empty_bundle(),
        },
    }


def imaging_body(patient_id: str) -> dict[str, Any]:
    """A chest X-ray study with its image inline (a Media), no report: the service asks for a draft."""
    subject = {"reference": f"Patient/{patient_id}"}
    study = {"resourceType": "ImagingStudy", "id": "study-1", "status": "available", "subject": subject}
    png = base64.b64encode((SAMPLE / "cxr-00000001_000.png").read_bytes()).decode()
    media = {
        "resourceType": "Media",
        "id": "media-1",
        "status": "completed",
        "subject": subject,
        "partOf": [{"reference": "ImagingStudy/study-1"}],
        "createdDateTime": "2026-11-30T09:00:00+00:00",
        "content": {"contentType": "image/png", "data": png},
    }
    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/COREPRACTITIONER1", "patientId": patient_id},
        "prefetch": {
            "studies": bundle(study),
            "media": bundle(media),
            "documents": empty_bundle(),
            "reports": empty_bundle(),
        },
    }


def fire(client: FlaskClient, issuer: Issuer, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = client.post(path, json=body, headers=issuer.headers(path))
    assert response.status_code == 200, response.json
    return list(response.json["cards"])


def state_card(cards: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the one card that says where the AI analysis stands."""
    (card,) = [c for c in cards if c["source"].get("topic", {}).get("code", "").startswith("ai-")]
    return card


def job_page(client: FlaskClient, card: dict[str, Any]) -> str:
    url = card["links"][0]["url"]
    path = url[url.index("/jobs/") :]
    return client.get(path, headers={"Accept": BROWSER}).get_data(as_text=True)


def job_id_of(card: dict[str, Any]) -> str:
    return str(re.search(r"/jobs/([0-9a-f]+)", card["links"][0]["url"]).group(1))  # type: ignore[union-attr]


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def states_redis(redis_server: RedisServer) -> str:
    """A database of this module's own: only its workers' heartbeats and queues are in it."""
    return redis_server.new_database()


@pytest.fixture(scope="module")
def workers(
    states_redis: str,
    database_url: str,
    issuer: Issuer,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """A text worker sharing the API's secret, and an image worker with another secret (it can't read the
    jobs the API queues: every image job fails)."""
    logs = tmp_path_factory.mktemp("state-workers")
    env = service_env(database_url, states_redis, issuer, "http://cds.test", **model_env(tiny_model_dir))
    started = {}
    for queue, secret in (("text", SECRET_KEY), ("image", OTHER_SECRET)):
        started[queue] = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "medgemma-cds"),
                "worker",
                "--queue",
                queue,
                "--concurrency",
                "1",
            ],
            env=env | {"MEDGEMMA_CDS_SECRET_KEY": secret},
            stdout=(logs / f"{queue}.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = redis.Redis.from_url(states_redis)
    try:
        wait_until(lambda: all(live_workers(client).values()), 120, "both workers beat")
        yield started
    finally:
        for process in started.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGCONT)
                os.killpg(process.pid, signal.SIGTERM)
        for process in started.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def states_app(
    workers: dict[str, subprocess.Popen[bytes]], settings: Settings, states_redis: str
) -> Iterator[Flask]:
    app = create_app(settings.model_copy(update={"redis_url": states_redis, "max_new_tokens": 4096}))
    yield app
    app.extensions["cds"].audit.flush()
    app.extensions["cds"].store.engine.dispose()


def job_state(app: Flask, job_id: str) -> str:
    record = app.extensions["cds"].jobs.get(job_id)
    return record.state if record else "gone"


def test_alive_a_queued_job_says_its_place_and_wait_then_running_then_done(
    states_app: Flask, workers: dict[str, subprocess.Popen[bytes]], issuer: Issuer
) -> None:
    client = states_app.test_client()
    # A first job, so the expected wait has a mean job time to go by.
    first = state_card(fire(client, issuer, SUMMARY, summary_body("warm-up")))
    wait_until(lambda: job_state(states_app, job_id_of(first)) == "done", 180, "the first job finished")
    done = fire(client, issuer, SUMMARY, summary_body("warm-up"))
    assert [c["summary"] for c in done][1] == "AI pre-visit summary (draft, needs clinician review)"

    text_worker = workers["text"]
    os.killpg(text_worker.pid, signal.SIGSTOP)  # alive (its heartbeat lasts), but takes nothing more
    try:
        cards = [state_card(fire(client, issuer, SUMMARY, summary_body(f"queued-{n}"))) for n in range(3)]
        last = cards[-1]
        assert last["summary"] == "Pre-visit summary: AI analysis queued"
        found = re.search(r"Queued: (\d+) ahead of it; expected in about \d+ seconds\.", last["detail"])
        assert found, last["detail"]
        ahead = int(found.group(1))
        assert ahead >= 1
        # The one before it is one place nearer; the page says the same words as the card.
        assert (f"Queued: {ahead - 1} ahead of it" if ahead > 1 else "Queued: next in line") in cards[1][
            "detail"
        ]
        page = job_page(client, last)
        assert '<p class="state queued" id="state">AI analysis queued</p>' in page
        assert f"Queued: {ahead} ahead of it; expected in about" in page
    finally:
        os.killpg(text_worker.pid, signal.SIGCONT)

    # Until it is done, each chart open says queued or running, in words.
    seen: set[str] = set()

    def finished() -> bool:
        if job_state(states_app, job_id_of(last)) == "done":
            return True
        seen.add(state_card(fire(client, issuer, SUMMARY, summary_body("queued-2")))["summary"])
        return False

    wait_until(finished, 240, "the queued jobs finished")
    assert seen <= {"Pre-visit summary: AI analysis queued", "Pre-visit summary: AI analysis running"}
    final = fire(client, issuer, SUMMARY, summary_body("queued-2"))
    assert final[1]["summary"] == "AI pre-visit summary (draft, needs clinician review)"


def test_failing_the_imaging_card_says_what_failed(states_app: Flask, issuer: Issuer) -> None:
    client = states_app.test_client()
    body = imaging_body("imaging-failing")
    card = state_card(fire(client, issuer, IMAGING, body))
    job_id = job_id_of(card)
    wait_until(lambda: job_state(states_app, job_id) == "failed", 180, "the image worker failed the job")

    card = state_card(fire(client, issuer, IMAGING, imaging_body("imaging-failing")))
    assert card["summary"] == "Imaging report draft: AI analysis failed"
    assert "could not read the request (a configuration problem for its operators)" in card["detail"]
    page = job_page(client, card)
    assert '<p class="state failed" id="state">AI analysis failed</p>' in page
    assert "could not read the request" in page and "SECRET_KEY" not in page
    # Operators get the reason in the JSON record.
    record = client.get(card["links"][0]["url"][card["links"][0]["url"].index("/jobs/") :]).json
    assert "MEDGEMMA_CDS_SECRET_KEY" in record["error"]


def test_stopped_a_worker_stopped_cleanly_is_gone_at_once(
    workers: dict[str, subprocess.Popen[bytes]], states_redis: str
) -> None:
    image_worker = workers["image"]
    os.killpg(image_worker.pid, signal.SIGTERM)
    image_worker.wait(timeout=30)
    # Its heartbeat goes with it (no waiting out the TTL): the next hook already says "unavailable".
    assert live_workers(redis.Redis.from_url(states_redis))["image"] == 0


def test_dead_the_card_says_unavailable_and_the_hook_does_not_wait(
    states_app: Flask, workers: dict[str, subprocess.Popen[bytes]], issuer: Issuer, states_redis: str
) -> None:
    text_worker = workers["text"]
    os.killpg(text_worker.pid, signal.SIGKILL)
    text_worker.wait()
    client = redis.Redis.from_url(states_redis)
    # Its heartbeat outlives it by at most HEARTBEAT_TTL_S.
    wait_until(lambda: live_workers(client)["text"] == 0, 45, "the dead worker's heartbeat expired")

    waiting_app = create_app(
        states_app.extensions["cds"].settings.model_copy(update={"hook_budget_ms": 5000})
    )
    try:
        started = time.monotonic()
        card = state_card(fire(waiting_app.test_client(), issuer, SUMMARY, summary_body("nobody-home")))
        elapsed = time.monotonic() - started
        assert card["summary"] == "Pre-visit summary: AI analysis unavailable"
        assert "No model worker is running for it" in card["detail"]
        assert elapsed < 2.5, f"the hook waited {elapsed:.1f} s for a worker that isn't there"
        page = job_page(waiting_app.test_client(), card)
        assert '<p class="state unavailable" id="state">AI analysis unavailable</p>' in page
    finally:
        waiting_app.extensions["cds"].audit.flush()
        waiting_app.extensions["cds"].store.engine.dispose()


def test_the_place_in_the_queue_counts_what_workers_take_before_it(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.new_database())
    # As kombu pushes them: newest on the left; workers pop from the right, the interactive queue first.
    for n in range(3):
        client.lpush(QUEUES["text"], json.dumps({"headers": {"id": f"job-{n}"}}))
    for n in range(2):
        client.lpush(PRECOMPUTE_QUEUES["text"], json.dumps({"headers": {"id": f"pre-{n}"}}))
    places = {job: jobs_ahead(client, job, "text") for job in ("job-0", "job-2", "pre-0", "pre-1", "taken")}
    assert places == {"job-0": 0, "job-2": 2, "pre-0": 3, "pre-1": 4, "taken": 0}
    # Deeper than a hook reads: the place is unknown ("behind many"), never a wrong number.
    client.lpush(QUEUES["image"], *[f"message-{n}" for n in range(MAX_SCAN + 5)])
    assert jobs_ahead(client, "far-back", "image") is None
