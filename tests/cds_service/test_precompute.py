"""Precompute bookkeeping with real Redis: queue routing and promotion, trigger and zero-wait counts, the
rate limit, the daily schedule, and a sweep with the test FHIR server (no worker needed)."""

from __future__ import annotations

import json
import time
from datetime import UTC
from datetime import date
from datetime import datetime
from datetime import time as dt_time
from datetime import timedelta
from datetime import timezone

import pytest
import redis
from support import FhirServer
from support import RedisServer
from support import free_port

from cds_service.fhir_client import FhirReadError
from cds_service.jobs import FIRST_CALL_PREFIX
from cds_service.jobs import PRECOMPUTE_JOBS_KEY
from cds_service.jobs import PRECOMPUTE_MARK_PREFIX
from cds_service.jobs import PRECOMPUTE_QUEUES
from cds_service.jobs import PRECOMPUTE_REQUESTS_KEY
from cds_service.jobs import QUEUES
from cds_service.jobs import ZERO_WAIT_KEY
from cds_service.jobs import Capacity
from cds_service.jobs import JobQueue
from cds_service.jobs import JobStore
from cds_service.jobs import TaskMessages
from cds_service.precompute import SCHEDULER_KEY
from cds_service.precompute import RateLimit
from cds_service.precompute import next_run
from cds_service.precompute import precompute_status
from cds_service.precompute import run_daily
from cds_service.precompute import run_sweep
from cds_service.precompute import subscription_resource
from cds_service.precompute import sweep_progress
from cds_service.settings import Settings
from worker.celery_app import make_celery

REQUEST_KEY = b"job-request-test-key-0123456789a"


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    """A Redis database of this test's own (queues and counters are global to a database)."""
    return redis.Redis.from_url(redis_server.new_database())


def queue(client: redis.Redis, **options: object) -> JobQueue:
    """A job handle publishing the real task messages on the model queues of the test's Redis database."""
    settings = Settings(text_model="google/medgemma-27b-text-it", redis_url="redis://unused")
    return JobQueue(
        JobStore(client, 3600, request_key=REQUEST_KEY),
        TaskMessages(make_celery(settings)),
        settings,
        "appointment-prep",
        deadline=time.monotonic(),
        capacity=Capacity(client),
        **options,  # type: ignore[arg-type]
    )


def queued(client: redis.Redis, queue_name: str) -> list[str]:
    """Return the job ids of the task messages waiting on a queue, oldest first."""
    return [json.loads(item)["headers"]["id"] for item in reversed(client.lrange(queue_name, 0, -1))]


def summary_request(jobs: JobQueue, prompt: str = "summarise") -> object:
    return jobs.for_service("patient-summary").request(
        "patient-summary", "text", "system", prompt, evidence=[], input_hashes=["h"]
    )


def test_a_chart_open_moves_a_precomputed_job_ahead_once(client: redis.Redis) -> None:
    background = queue(client, background=True, trigger="appointment-prep")
    record = summary_request(background)
    assert record is not None and record.state == "queued"  # type: ignore[attr-defined]
    (job_id,) = queued(client, PRECOMPUTE_QUEUES["text"])
    assert client.exists(PRECOMPUTE_MARK_PREFIX + job_id) and not queued(client, QUEUES["text"])
    # Asked for on behalf of patient-summary: the chart open's own job, not an appointment-prep one.
    assert client.hget(JobStore.key(job_id), "service_id") == b"patient-summary"
    assert client.hgetall(PRECOMPUTE_REQUESTS_KEY) == {b"appointment-prep:enqueued": b"1"}

    chart_open = queue(client, count_first_calls=True).for_service("patient-summary")
    for _ in range(3):
        summary_request(chart_open)
    # Sent again on the interactive queue by the first open only; the mark is spent.
    assert queued(client, PRECOMPUTE_QUEUES["text"]) == [job_id]
    assert queued(client, QUEUES["text"]) == [job_id]
    assert not client.exists(PRECOMPUTE_MARK_PREFIX + job_id)

    # A precomputed job that already runs is left where it is.
    summary_request(background, prompt="other")
    other = queued(client, PRECOMPUTE_QUEUES["text"])[-1]
    JobStore(client, 3600, request_key=REQUEST_KEY).start(other, "w")
    summary_request(chart_open, prompt="other")
    assert queued(client, QUEUES["text"]) == [job_id] and client.exists(PRECOMPUTE_MARK_PREFIX + other)


def test_zero_wait_counts_each_records_first_chart_open(client: redis.Redis) -> None:
    store = JobStore(client, 3600, request_key=REQUEST_KEY)
    chart_open = queue(client, count_first_calls=True).for_service("patient-summary")
    summary_request(chart_open, prompt="record one")  # first open: not ready
    summary_request(chart_open, prompt="record one")  # a reopen is not a first open
    # Record two was precomputed and is done before its chart opens.
    precompute = queue(client, background=True, trigger="sweep")
    summary_request(precompute, prompt="record two")
    (record_two,) = queued(client, PRECOMPUTE_QUEUES["text"])
    store.finish(record_two, {"state": "done", "result": "{}"})
    summary_request(chart_open, prompt="record two")
    summary_request(chart_open, prompt="record two")
    assert client.hgetall(ZERO_WAIT_KEY) == {b"patient-summary:first": b"2", b"patient-summary:ready": b"1"}
    # The markers name no job id, only a hash of it.
    markers = [key.decode() for key in client.scan_iter(match=FIRST_CALL_PREFIX + "*")]
    job_ids = [*queued(client, QUEUES["text"]), record_two]
    assert len(markers) == 2 and not any(job_id in marker for job_id in job_ids for marker in markers)
    # Precompute triggers never count as chart opens.
    assert client.hget(PRECOMPUTE_REQUESTS_KEY, "sweep:enqueued") == b"1"
    status = precompute_status(client)
    assert status["jobs"] == {"done": 1} and status["requests"] == {"sweep:enqueued": 1}
    assert client.smembers(PRECOMPUTE_JOBS_KEY) == {record_two.encode()}


def test_the_rate_limit_spaces_calls() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        now[0] += seconds

    limit = RateLimit(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        limit.wait()
    assert slept == [0.25, 0.25, 0.25, 0.25]
    now[0] += 10  # an idle spell earns no burst beyond the next call
    limit.wait()
    limit.wait()
    assert slept[-1] == 0.25


def test_the_next_run_is_the_next_local_time() -> None:
    zone = timezone(timedelta(hours=2))
    at = dt_time(6, 0)
    assert next_run(datetime(2031, 5, 14, 5, 59, tzinfo=zone), at) == datetime(2031, 5, 14, 6, 0, tzinfo=zone)
    assert next_run(datetime(2031, 5, 14, 6, 0, tzinfo=zone), at) == datetime(2031, 5, 15, 6, 0, tzinfo=zone)
    assert next_run(datetime(2031, 12, 31, 23, 0, tzinfo=zone), at) == datetime(2032, 1, 1, 6, 0, tzinfo=zone)


def test_a_daily_scheduler_catches_up_then_sweeps_each_morning(
    settings: Settings, fhir_server: FhirServer, redis_server: RedisServer
) -> None:
    # A database of this test's own: the jobs its sweep asks for reach no model worker of the run.
    redis_url = redis_server.new_database()
    redis_client = redis.Redis.from_url(redis_url)
    settings = settings.model_copy(update={"redis_url": redis_url})
    # The second morning has a visit booked; the first none.
    patient = fhir_server.patients["Trantow"]
    fhir_server.post(
        {
            "resourceType": "Appointment",
            "status": "booked",
            "start": "2032-02-04T10:00:00+00:00",
            "end": "2032-02-04T10:15:00+00:00",
            "participant": [{"actor": {"reference": f"Patient/{patient}"}, "status": "accepted"}],
        }
    )
    clock = [datetime(2032, 2, 3, 9, 30, tzinfo=UTC)]  # started after 06:00: today's sweep runs at once
    beats: list[str | None] = []

    def sleep(seconds: float) -> None:
        beats.append((redis_client.get(SCHEDULER_KEY) or b"").decode())
        clock[0] += timedelta(seconds=seconds)

    reports = []
    run_daily(
        settings, fhir_server.base_url, dt_time(6, 0), token=fhir_server.token, rate=100,
        now=lambda: clock[0], sleep=sleep, on_report=reports.append, days=1,
    )  # fmt: skip
    assert [r.day for r in reports] == [date(2032, 2, 3), date(2032, 2, 4)]
    assert (reports[0].appointments, reports[0].requested) == (0, 0)
    # Each morning sweeps its own day: the visit booked for the 4th is asked for on the 4th.
    assert (reports[1].appointments, reports[1].patients, reports[1].requested) == (1, 1, 1)
    # While waiting it beat in Redis with the time of its next sweep (its container healthcheck).
    assert beats and set(beats) == {"2032-02-04T06:00:00+00:00"}
    assert sweep_progress(redis_client)["day"] == "2032-02-04"
    assert sweep_progress(redis_client)["state"] == "finished"


def test_a_sweep_of_an_unreachable_server_fails_and_says_so(
    settings: Settings, redis_client: redis.Redis
) -> None:
    with pytest.raises(FhirReadError):
        run_sweep(settings, f"http://127.0.0.1:{free_port()}/fhir", date(2032, 2, 5))
    assert sweep_progress(redis_client)["state"] == "failed"


def test_the_subscription_carries_the_secret_and_the_payload() -> None:
    subscription = subscription_resource("Media", "https://cds.example.org/fhir-notifications/imaging", "s3")
    assert subscription["criteria"] == "Media?"
    assert subscription["channel"] == {
        "type": "rest-hook",
        "endpoint": "https://cds.example.org/fhir-notifications/imaging",
        "payload": "application/fhir+json",
        "header": ["Authorization: Bearer s3"],
    }
