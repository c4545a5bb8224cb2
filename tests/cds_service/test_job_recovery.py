"""Jobs that survive Redis and their workers: the test's own redis-server restarted mid-job, a worker killed
with SIGKILL mid-job; no AI result stays hidden longer than one recompute, and no hook waits on a dead worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from support import SAMPLE
from support import Issuer
from support import RedisServer
from support import model_env
from support import redis_server as start_redis_server
from support import service_env

from cds_service.app import create_app
from cds_service.jobs import HEARTBEAT_PREFIX
from cds_service.jobs import QUEUED_GRACE_S
from cds_service.jobs import QUEUES
from cds_service.jobs import JobStore
from cds_service.jobs import TaskMessages
from cds_service.settings import Settings
from cds_service.wire import ModelJobRequest
from worker.celery_app import make_celery

SUMMARY = "/cds-services/patient-summary"
KEY = b"job-request-test-key-0123456789a"
HEARTBEAT = f"{HEARTBEAT_PREFIX}text:test-host:1"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone: restarting it touches no one else's keys."""
    with start_redis_server(tmp_path) as server:
        yield server


def request(note: str) -> ModelJobRequest:
    return ModelJobRequest(
        service_id="patient-summary",
        task="patient-summary",
        role="text",
        model="google/medgemma-27b-text-it",
        system_prompt="s",
        user_prompt=f"summarise {note}",
        evidence=[],
        input_hashes=[note],
        max_new_tokens=64,
    )


def submit(store: JobStore, job: ModelJobRequest, messages: TaskMessages) -> Any:
    job_id = job.job_id()
    queue = QUEUES["text"]
    return store.submit(job, job_id, messages.message(job_id, queue), queue, mode="interactive")


@pytest.fixture
def messages(settings: Settings) -> TaskMessages:
    return TaskMessages(make_celery(settings))


DONE = {"state": "done", "result": '{"summary": "ok"}', "model": "m", "model_version": "v"}
IDENTITY = {"service_id": "patient-summary", "task": "patient-summary"}


def test_a_job_finished_after_a_redis_restart_is_found_whole(
    own_redis: RedisServer, messages: TaskMessages
) -> None:
    client = redis.Redis.from_url(own_redis.url)
    store = JobStore(client, 600, request_key=KEY)
    job = request(uuid.uuid4().hex)
    assert submit(store, job, messages).created
    assert store.start(job.job_id(), "test-host:1", HEARTBEAT) == 1
    own_redis.restart()  # no persistence: the record, the queue and the heartbeat are gone
    # The worker finishes: the record is written whole, so the result is read, not hidden for a day.
    assert store.finish(job.job_id(), DONE, identity=IDENTITY)
    record = store.get(job.job_id())
    assert record is not None and record.state == "done" and record.result == {"summary": "ok"}
    again = submit(store, job, messages)
    assert not again.created and again.record is not None and again.record.state == "done"


def test_half_a_record_is_missing_and_recomputed_under_the_same_id(
    own_redis: RedisServer, messages: TaskMessages
) -> None:
    client = redis.Redis.from_url(own_redis.url)
    store = JobStore(client, 600, request_key=KEY)
    job = request(uuid.uuid4().hex)
    assert submit(store, job, messages).created
    own_redis.restart()
    # What a worker without the record's identity would leave: it writes nothing; and a start writes nothing.
    assert not store.finish(job.job_id(), DONE)
    assert store.start(job.job_id(), "test-host:1", HEARTBEAT) == 0
    assert client.exists(JobStore.key(job.job_id())) == 0
    # Half a record left by an older worker reads as missing, and the next hook makes it again.
    client.hset(JobStore.key(job.job_id()), mapping={"state": "done", "result": "{}"})
    assert store.get(job.job_id()) is None
    again = submit(store, job, messages)
    assert again.created and again.job_id == job.job_id() and again.record.state == "queued"
    assert client.llen(QUEUES["text"]) == 1


def test_a_job_whose_worker_died_is_queued_again_by_the_next_hook(
    own_redis: RedisServer, messages: TaskMessages
) -> None:
    client = redis.Redis.from_url(own_redis.url)
    store = JobStore(client, 600, request_key=KEY)
    job = request(uuid.uuid4().hex)
    submit(store, job, messages)
    client.rpop(QUEUES["text"])  # a worker took the message
    client.set(HEARTBEAT, "fingerprint", px=300)
    store.start(job.job_id(), "test-host:1", HEARTBEAT)
    # While its heartbeat lives, the job is its worker's.
    assert submit(store, job, messages).record.state == "running" and client.llen(QUEUES["text"]) == 0
    time.sleep(0.5)  # the worker stops beating (killed): its heartbeat expires
    released = submit(store, job, messages).record
    assert released.state == "queued" and released.started_at is None
    assert client.llen(QUEUES["text"]) == 1  # sent again, for a live worker to take


def test_a_queued_job_whose_message_was_lost_is_sent_again_after_the_grace(
    own_redis: RedisServer, messages: TaskMessages
) -> None:
    client = redis.Redis.from_url(own_redis.url)
    store = JobStore(client, 600, request_key=KEY)
    job = request(uuid.uuid4().hex)
    submit(store, job, messages)
    client.rpop(QUEUES["text"])  # taken by a worker that died before starting it
    # Within the grace (a worker may be about to start it) nothing is sent again.
    assert submit(store, job, messages).record.state == "queued" and client.llen(QUEUES["text"]) == 0
    sent_at = int(client.hget(JobStore.key(job.job_id()), "sent_at"))
    client.hset(JobStore.key(job.job_id()), "sent_at", sent_at - QUEUED_GRACE_S - 1)
    assert submit(store, job, messages).record.state == "queued"
    assert client.llen(QUEUES["text"]) == 1  # sent again, once
    assert submit(store, job, messages).created is False and client.llen(QUEUES["text"]) == 1


def until(check: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(poll_s)


def test_a_real_worker_killed_mid_job_releases_it_and_the_next_worker_finishes_it(
    settings: Settings, issuer: Issuer, tiny_model_dir: Path, tmp_path: Path, own_redis: RedisServer
) -> None:
    app_settings = settings.model_copy(update={"redis_url": own_redis.url, "hook_budget_ms": 3000})
    app: Flask = create_app(app_settings)
    # The first chart open must not wait: a tiny-model job can finish within the budget on an idle machine,
    # and the worker has to be caught while it runs the job.
    no_wait: Flask = create_app(app_settings.model_copy(update={"hook_budget_ms": 0}))
    client = redis.Redis.from_url(own_redis.url)
    env = service_env(
        settings.database_url, own_redis.url, issuer, "http://cds.test", **model_env(tiny_model_dir)
    )

    def start_worker(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                str(Path(sys.executable).parent / "medgemma-cds"),
                "worker",
                "--queue",
                "text",
                "--pool",
                "solo",
            ],
            env=env,
            stdout=(tmp_path / f"{name}.log").open("w"),
            stderr=subprocess.STDOUT,
        )

    def fire(through: Flask) -> list[str]:
        (path,) = SAMPLE.glob("Kermit_Trantow_*.json")
        resources = [e["resource"] for e in json.loads(path.read_text())["entry"]]

        def search(kind: str) -> dict[str, Any]:
            found = [{"resource": r} for r in resources if r["resourceType"] == kind]
            return {"resourceType": "Bundle", "type": "searchset", "entry": found}

        patient = next(r for r in resources if r["resourceType"] == "Patient")
        body = {
            "hook": "patient-view",
            "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/p1", "patientId": patient["id"]},
            "prefetch": {
                "patient": patient,
                "conditions": search("Condition"),
                "medications": search("MedicationRequest"),
                "allergies": search("AllergyIntolerance"),
                "observations": search("Observation"),
            },
        }
        answer = through.test_client().post(SUMMARY, json=body, headers=issuer.headers(SUMMARY))
        assert answer.status_code == 200, answer.json
        return [card["summary"] for card in answer.json["cards"]]

    def job_state() -> bytes | None:
        keys = list(client.scan_iter(match="mgcds:job:*"))
        return client.hget(keys[0], "state") if len(keys) == 1 else None

    first = start_worker("first")
    try:
        until(lambda: client.exists(*client.keys(f"{HEARTBEAT_PREFIX}*") or ["none"]) > 0, 90, "worker up")
        fire(no_wait)
        until(lambda: job_state() == b"running", 60, "the worker took the job", poll_s=0.001)
        first.kill()  # SIGKILL: no clean stop, the heartbeat just stops
        first.wait()
        assert job_state() == b"running"
        until(lambda: not client.keys(f"{HEARTBEAT_PREFIX}*"), 30, "the dead worker's heartbeat expired")
        # No live worker holds it: the hook says so instead of waiting its budget, and queues the job again.
        assert "Pre-visit summary: AI analysis unavailable" in fire(app)
        assert job_state() == b"queued" and client.llen(QUEUES["text"]) == 1
    finally:
        if first.poll() is None:
            first.kill()
    second = start_worker("second")
    try:
        until(lambda: job_state() in (b"done", b"failed"), 180, "the next worker finished the job")
        assert job_state() == b"done"
    finally:
        second.terminate()
        second.wait(timeout=30)
    app.extensions["cds"].audit.flush()
    app.extensions["cds"].store.engine.dispose()
