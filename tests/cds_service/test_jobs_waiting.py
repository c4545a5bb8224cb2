"""Waiting for a model job: woken by the worker's done message, skipped when the job can't finish in time."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
from support import RedisServer

from cds_service.jobs import HEARTBEAT_PREFIX
from cds_service.jobs import MODEL_JOBS_KEY
from cds_service.jobs import MODEL_SECONDS_KEY
from cds_service.jobs import QUEUES
from cds_service.jobs import Capacity
from cds_service.jobs import JobQueue
from cds_service.jobs import JobStore
from cds_service.jobs import TaskMessages
from cds_service.settings import Settings
from worker.celery_app import make_celery

MODEL = "google/medgemma-27b-text-it"
REQUEST_KEY = b"job-request-test-key-0123456789a"


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    """A Redis database of this test's own (heartbeats and queue lengths are global to a database)."""
    return redis.Redis.from_url(redis_server.new_database())


def queue(client: redis.Redis, budget_s: float) -> JobQueue:
    settings = Settings(text_model=MODEL, redis_url="redis://unused")
    return JobQueue(
        JobStore(client, 3600, request_key=REQUEST_KEY),
        TaskMessages(make_celery(settings)),
        settings,
        "patient-summary",
        deadline=time.monotonic() + budget_s,
        capacity=Capacity(client),
    )


def sent(client: redis.Redis) -> list[str]:
    """Return the job ids of the task messages on the text queue, oldest first."""
    return [json.loads(item)["headers"]["id"] for item in reversed(client.lrange(QUEUES["text"], 0, -1))]


def request(jobs: JobQueue, prompt: str = "summarise"):
    return jobs.request("patient-summary", "text", "system", prompt, evidence=[], input_hashes=["h"])


def test_no_live_worker_means_no_wait(client: redis.Redis) -> None:
    started = time.monotonic()
    record = request(queue(client, 5.0))
    assert record is not None and record.state == "queued" and len(sent(client)) == 1
    assert time.monotonic() - started < 2.0  # far below the 5 s budget: not waited out


def test_the_wait_ends_on_the_done_message_not_the_deadline(client: redis.Redis) -> None:
    client.set(f"{HEARTBEAT_PREFIX}text:host:1", 1, ex=30)
    jobs = queue(client, 10.0)
    store = JobStore(client, 3600, request_key=REQUEST_KEY)

    def worker() -> None:
        watcher = redis.Redis(connection_pool=client.connection_pool)
        while not (job_ids := sent(watcher)):
            time.sleep(0.01)
        store.start(job_ids[0], "w")
        time.sleep(0.3)
        result = {"state": "done", "result": '{"summary": "x"}', "model": MODEL, "seconds": 0.3}
        store.finish(job_ids[0], result)

    thread = threading.Thread(target=worker)
    thread.start()
    started = time.monotonic()
    record = request(jobs)
    thread.join()
    assert record is not None and record.state == "done"
    assert time.monotonic() - started < 5.0  # woken by the message, long before the 10 s deadline


def test_a_queue_that_cannot_finish_in_the_budget_is_not_waited_for(client: redis.Redis) -> None:
    client.set(f"{HEARTBEAT_PREFIX}text:host:1", 1, ex=30)
    # One worker, jobs take 2 s on average, ten jobs already queued: nothing finishes within 1 s.
    client.hset(MODEL_SECONDS_KEY, MODEL, 20.0)
    client.hset(MODEL_JOBS_KEY, MODEL, 10)
    client.rpush(QUEUES["text"], *[f"job-{n}" for n in range(10)])
    capacity = Capacity(client)
    assert not capacity.can_finish("text", MODEL, 1.0)
    assert capacity.can_finish("text", MODEL, 60.0)
    started = time.monotonic()
    record = request(queue(client, 1.0))
    assert record is not None and record.state == "queued"
    assert time.monotonic() - started < 0.9


def test_without_a_finished_job_there_is_no_estimate_so_it_may_wait(client: redis.Redis) -> None:
    client.set(f"{HEARTBEAT_PREFIX}image:host:1", 1, ex=30)
    capacity = Capacity(client)
    assert capacity.can_finish("image", "google/medgemma-4b-it", 0.5)
    assert not capacity.can_finish("text", MODEL, 0.5)  # no text worker
