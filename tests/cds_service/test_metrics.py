"""GET /metrics: what a Prometheus scrape of the app sees after real hook calls, jobs and Redis state."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from support import ROOT
from support import Issuer
from support import RedisServer
from support import free_port

from cds_service.app import create_app
from cds_service.demo import hook_bodies
from cds_service.jobs import JobStore
from cds_service.metrics import MAX_SCANNED_JOBS
from cds_service.metrics import count_feedback
from cds_service.metrics import count_job_lookup
from cds_service.metrics import observe_prefetch
from cds_service.settings import Settings
from cds_service.wire import ModelJobRequest

HOOK_ROUTE = "/cds-services/<service_id>"


@pytest.fixture
def own_redis_url(redis_server: RedisServer) -> str:
    """A Redis database of this test alone, so no model worker of the run drains its queues."""
    return redis_server.new_database()


@pytest.fixture
def metrics_settings(settings: Settings, own_redis_url: str) -> Settings:
    """The test settings on a private Redis database, with hook budget 0 (enqueue, never wait)."""
    return settings.model_copy(update={"redis_url": own_redis_url, "hook_budget_ms": 0})


@pytest.fixture
def metrics_app(metrics_settings: Settings) -> Flask:
    """A fresh app on the private Redis database."""
    return create_app(metrics_settings)


@pytest.fixture
def metrics_client(metrics_app: Flask) -> FlaskClient:
    """Test client of ``metrics_app``."""
    return metrics_app.test_client()


def scrape(client: FlaskClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and return every sample as {(name, sorted labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for sample in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float | None:
    """Return one sample's value, None when absent."""
    return samples.get((name, tuple(sorted(labels.items()))))


def summary_call(client: FlaskClient, issuer: Issuer) -> int:
    """POST the demo's patient-summary call (full prefetch of the sample patient); return the status."""
    discovery = client.get("/cds-services").get_json()
    service_id, body = hook_bodies(discovery)[0]
    path = f"/cds-services/{service_id}"
    return client.post(path, json=body, headers=issuer.headers(path)).status_code


def test_hook_call_is_counted_and_timed(metrics_client: FlaskClient, issuer: Issuer) -> None:
    assert summary_call(metrics_client, issuer) == 200
    samples = scrape(metrics_client)
    assert (
        sample(
            samples, "medgemma_cds_requests_total", route=HOOK_ROUTE, service="patient-summary", status="200"
        )
        == 1
    )
    assert sample(samples, "medgemma_cds_hook_duration_seconds_count", service="patient-summary") == 1
    assert sample(samples, "medgemma_cds_hook_duration_seconds_sum", service="patient-summary") > 0
    assert sample(samples, "medgemma_cds_redis_up") == 1


def test_unknown_service_is_one_label_and_not_timed(metrics_client: FlaskClient, issuer: Issuer) -> None:
    for made_up in ("no-such-service", "another-made-up-id"):
        assert metrics_client.post(f"/cds-services/{made_up}", json={}).status_code == 404
    samples = scrape(metrics_client)
    assert (
        sample(samples, "medgemma_cds_requests_total", route=HOOK_ROUTE, service="unknown", status="404") == 2
    )
    assert not any(name == "medgemma_cds_hook_duration_seconds_count" for name, _ in samples)


def test_queue_depth_and_job_states_are_read_from_redis(
    metrics_client: FlaskClient, issuer: Issuer, own_redis_url: str
) -> None:
    before = scrape(metrics_client)
    assert sample(before, "medgemma_cds_queue_depth", queue="medgemma-text") == 0
    assert sample(before, "medgemma_cds_jobs", state="queued") == 0
    assert sample(before, "medgemma_cds_live_workers", role="text") == 0

    # Budget 0: the hook enqueues the summary job and answers at once; no worker listens on this database.
    assert summary_call(metrics_client, issuer) == 200
    after = scrape(metrics_client)
    assert sample(after, "medgemma_cds_queue_depth", queue="medgemma-text") == 1
    assert sample(after, "medgemma_cds_queue_depth", queue="medgemma-image") == 0
    assert sample(after, "medgemma_cds_jobs", state="queued") == 1
    assert sample(after, "medgemma_cds_jobs", state="done") == 0
    assert sample(after, "medgemma_cds_jobs_scan_complete") == 1


def test_job_scan_stops_at_its_bound(metrics_client: FlaskClient, own_redis_url: str) -> None:
    client = redis.Redis.from_url(own_redis_url)
    with client.pipeline(transaction=False) as pipe:
        for index in range(MAX_SCANNED_JOBS + 50):
            pipe.hset(JobStore.key(f"bound{index}"), "state", "done")
        pipe.execute()
    samples = scrape(metrics_client)
    assert sample(samples, "medgemma_cds_jobs_scan_complete") == 0
    assert sample(samples, "medgemma_cds_jobs", state="done") <= MAX_SCANNED_JOBS


def test_model_throughput_comes_from_finished_jobs_counted_once(
    metrics_client: FlaskClient, own_redis_url: str
) -> None:
    store = JobStore(redis.Redis.from_url(own_redis_url), ttl_s=600, request_key=bytes(32))
    model = "google/medgemma-4b-it"
    for index, (tokens, seconds) in enumerate([(120, 2.0), (60, 1.0)]):
        job = ModelJobRequest(
            service_id="patient-summary",
            task="patient-summary",
            role="text",
            model=model,
            system_prompt="s",
            user_prompt=f"record {index}",
            max_new_tokens=64,
        )
        job_id, _ = store.create(job)
        fields = {
            "state": "done",
            "model": model,
            "generated_tokens": tokens,
            "seconds": seconds,
            "result": "{}",
        }
        assert store.finish(job_id, fields)
        # A redelivered task finishing the same job again adds nothing.
        assert not store.finish(job_id, fields)
    samples = scrape(metrics_client)
    assert sample(samples, "medgemma_cds_model_generated_tokens_total", model=model) == 180
    assert sample(samples, "medgemma_cds_model_generation_seconds_total", model=model) == 3.0
    assert sample(samples, "medgemma_cds_model_tokens_per_second", model=model) == 60.0


def test_prefetch_lookups_and_feedback_counters(metrics_app: Flask, metrics_client: FlaskClient) -> None:
    with metrics_app.app_context():
        observe_prefetch(0.02)
        observe_prefetch(0.3)
        count_job_lookup(hit=True)
        count_job_lookup(hit=False)
        count_job_lookup(hit=False)
        count_feedback("accepted")
        count_feedback("overridden")
        count_feedback("something-else")
    samples = scrape(metrics_client)
    assert sample(samples, "medgemma_cds_prefetch_fetch_duration_seconds_count") == 2
    assert sample(samples, "medgemma_cds_prefetch_fetch_duration_seconds_bucket", le="0.025") == 1
    assert sample(samples, "medgemma_cds_job_lookups_total", result="hit") == 1
    assert sample(samples, "medgemma_cds_job_lookups_total", result="miss") == 2
    for outcome in ("accepted", "overridden", "other"):
        assert sample(samples, "medgemma_cds_feedback_total", outcome=outcome) == 1


def test_counters_outside_a_request_are_ignored(metrics_app: Flask) -> None:
    client = metrics_app.test_client()

    def counted() -> dict:
        names = ("medgemma_cds_job_lookups_total", "medgemma_cds_feedback_total")
        return {key: value for key, value in scrape(client).items() if key[0] in names}

    before = counted()
    # Called by code running outside any app (a worker, a script): no error, and no app counts them.
    observe_prefetch(0.1)
    count_job_lookup(hit=True)
    count_feedback("accepted")
    assert counted() == before
    with metrics_app.app_context():
        count_job_lookup(hit=True)
        count_feedback("accepted")
    after = counted()
    hits = sample(after, "medgemma_cds_job_lookups_total", result="hit")
    assert hits == (sample(before, "medgemma_cds_job_lookups_total", result="hit") or 0) + 1
    accepted = sample(after, "medgemma_cds_feedback_total", outcome="accepted")
    assert accepted == (sample(before, "medgemma_cds_feedback_total", outcome="accepted") or 0) + 1


def test_scrape_survives_redis_down(settings: Settings) -> None:
    down = create_app(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    samples = scrape(down.test_client())
    assert sample(samples, "medgemma_cds_redis_up") == 0
    assert not any(name == "medgemma_cds_queue_depth" for name, _ in samples)


PROCESS = textwrap.dedent(
    """
    import json, sys
    from cds_service.app import create_app
    from cds_service.metrics import multiprocess_mode
    from cds_service.settings import Settings

    assert multiprocess_mode()
    client = create_app(Settings.model_validate_json(sys.argv[1])).test_client()
    for _ in range(int(sys.argv[2])):
        assert client.get("/healthz").status_code == 200
    print(client.get("/metrics").get_data(as_text=True))
    """
)


def test_multiprocess_mode_sums_every_process(metrics_settings: Settings, tmp_path: Path) -> None:
    """Two processes (as two gunicorn workers) share PROMETHEUS_MULTIPROC_DIR: a scrape sees both counts."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "", "PYTHONPATH": str(ROOT)}
    config = json.dumps(metrics_settings.model_dump(mode="json") | {"secret_key": "x" * 32})
    outputs = [
        subprocess.run(
            [sys.executable, "-c", PROCESS, config, str(count)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        for count in (2, 3)
    ]
    families = {f.name: f for f in text_string_to_metric_families(outputs[-1])}
    healthz = [
        s.value
        for s in families["medgemma_cds_requests"].samples
        if s.name == "medgemma_cds_requests_total" and s.labels["route"] == "/healthz"
    ]
    assert healthz == [5]
