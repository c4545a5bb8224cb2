"""Prometheus metrics of the API at ``GET /metrics``: requests, hook and prefetch latency, queues, jobs.

Counted in the process: requests by route, service and status; hook latency per service; each FHIR read made
to fill prefetch; job lookups (hit or miss); feedback outcomes. Read from Redis at scrape time, so every API
process reports the same values: the depth of the two Celery queues (LLEN), live workers per queue (their
heartbeats), job records by state (a SCAN bounded at ``MAX_SCANNED_JOBS`` keys) and the models' generated
tokens and generation seconds, which ``JobStore.finish`` adds to two Redis hashes when a job finishes; the
precompute triggers' progress (sweep, jobs by state, requests by trigger and outcome) and the zero-wait rate
(the share of records whose first chart open carried the AI card), kept in Redis by ``JobQueue``.

Gunicorn runs several worker processes. When ``PROMETHEUS_MULTIPROC_DIR`` names an empty folder before
prometheus-client is first imported (its multiprocess mode), the in-process counters of every gunicorn worker
are summed at each scrape; without it each process counts alone and a scrape sees the process that answered.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
from flask import Blueprint
from flask import Flask
from flask import Response
from flask import current_app
from flask import g
from flask import has_app_context
from flask import request
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Histogram
from prometheus_client import generate_latest
from prometheus_client import multiprocess
from prometheus_client import values
from prometheus_client.core import CounterMetricFamily
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cds_service.jobs import MODEL_SECONDS_KEY
from cds_service.jobs import MODEL_TOKENS_KEY
from cds_service.jobs import PRECOMPUTE_QUEUES
from cds_service.jobs import QUEUES
from cds_service.jobs import ZERO_WAIT_KEY
from cds_service.jobs import JobStore
from cds_service.jobs import live_workers
from cds_service.precompute import precompute_status

bp = Blueprint("metrics", __name__)

#: A scrape counts at most this many job records, so a huge backlog can't make /metrics slow.
MAX_SCANNED_JOBS = 10_000
# Kombu's Redis transport keeps a message sent with priority p > 0 in the list "{queue}\x06\x16{p}".
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
_JOB_STATES = ("queued", "running", "done", "failed")
_HOOK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FEEDBACK_OUTCOMES = {"accepted", "overridden"}


def multiprocess_mode() -> bool:
    """Return whether prometheus-client was imported in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``)."""
    return values.ValueClass is not values.MutexValue


class RedisCollector(Collector):
    """Reads queue depths, job states and model totals from Redis at scrape time."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def collect(self) -> Iterator[Any]:
        """Yield the Redis-backed families; only ``medgemma_cds_redis_up 0`` when Redis doesn't answer."""
        up = GaugeMetricFamily("medgemma_cds_redis_up", "Whether Redis answered this scrape (1) or not (0).")
        try:
            families = list(self._families())
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Any]:
        depth = GaugeMetricFamily(
            "medgemma_cds_queue_depth", "Model tasks waiting in each Celery queue.", labels=["queue"]
        )
        queues = [*QUEUES.values(), *PRECOMPUTE_QUEUES.values()]
        with self.client.pipeline(transaction=False) as pipe:
            for name in queues:
                pipe.llen(name)
                for step in _PRIORITY_STEPS:
                    pipe.llen(f"{name}{_PRIORITY_SEPARATOR}{step}")
            lengths = pipe.execute()
        per_queue = len(_PRIORITY_STEPS) + 1
        for index, name in enumerate(queues):
            depth.add_metric([name], sum(lengths[index * per_queue : (index + 1) * per_queue]))
        yield depth

        live = GaugeMetricFamily(
            "medgemma_cds_live_workers",
            "Model worker processes whose heartbeat is fresh, per queue role.",
            labels=["role"],
        )
        for role, count in live_workers(self.client).items():
            live.add_metric([role], count)
        yield live

        counts, complete = self._job_states()
        jobs = GaugeMetricFamily(
            "medgemma_cds_jobs", "Model job records in Redis by state.", labels=["state"]
        )
        for state in _JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        scan = GaugeMetricFamily(
            "medgemma_cds_jobs_scan_complete",
            f"1 when every job record was counted, 0 when the scan stopped at {MAX_SCANNED_JOBS} keys.",
        )
        scan.add_metric([], 1 if complete else 0)
        yield scan

        tokens = {k.decode(): int(v) for k, v in self.client.hgetall(MODEL_TOKENS_KEY).items()}
        seconds = {k.decode(): float(v) for k, v in self.client.hgetall(MODEL_SECONDS_KEY).items()}
        tokens_total = CounterMetricFamily(
            "medgemma_cds_model_generated_tokens",
            "Tokens generated by finished model jobs.",
            labels=["model"],
        )
        seconds_total = CounterMetricFamily(
            "medgemma_cds_model_generation_seconds",
            "Generation time of finished model jobs.",
            labels=["model"],
        )
        rate = GaugeMetricFamily(
            "medgemma_cds_model_tokens_per_second",
            "Generated tokens per second of generation, averaged over every finished job "
            "(for a recent rate use rate(tokens_total) / rate(seconds_total)).",
            labels=["model"],
        )
        for model in sorted(tokens.keys() | seconds.keys()):
            tokens_total.add_metric([model], tokens.get(model, 0))
            seconds_total.add_metric([model], seconds.get(model, 0.0))
            if seconds.get(model):
                rate.add_metric([model], tokens.get(model, 0) / seconds[model])
        yield tokens_total
        yield seconds_total
        yield rate
        yield from self._precompute()
        yield from self._zero_wait()

    def _precompute(self) -> Iterator[Any]:
        """Yield the precompute triggers' progress: the newest sweep, jobs by state, requests by outcome."""
        status = precompute_status(self.client)
        jobs = GaugeMetricFamily(
            "medgemma_cds_precompute_jobs",
            "Jobs asked for by precompute triggers (sweep, appointment-book, encounter-start, FHIR "
            "Subscriptions), by state now (expired: the record is gone).",
            labels=["state"],
        )
        for state in (*_JOB_STATES, "expired"):
            jobs.add_metric([state], status["jobs"].get(state, 0))
        yield jobs
        requests = CounterMetricFamily(
            "medgemma_cds_precompute_requests",
            "What each precompute trigger found per patient: a job enqueued, existing, done or failed, or "
            "none asked for (unavailable data, nothing to do, unreadable image, read failed).",
            labels=["trigger", "outcome"],
        )
        for key, count in sorted(status["requests"].items()):
            trigger, _, outcome = key.partition(":")
            requests.add_metric([trigger, outcome], count)
        yield requests
        sweep = status["sweep"]
        patients = GaugeMetricFamily(
            "medgemma_cds_precompute_sweep_patients",
            "The newest sweep's patients: booked or arrived that day (total) and handled so far (done).",
            labels=["progress"],
        )
        patients.add_metric(["total"], float(sweep.get("patients", 0)))
        patients.add_metric(["done"], float(sweep.get("done", 0)))
        yield patients
        running = GaugeMetricFamily(
            "medgemma_cds_precompute_sweep_running", "1 while a sweep is running, else 0."
        )
        running.add_metric([], 1 if sweep.get("state") == "running" else 0)
        yield running
        throughput = GaugeMetricFamily(
            "medgemma_cds_precompute_sweep_jobs_per_second",
            "Jobs the newest finished sweep asked for per second (it is rate-limited).",
        )
        throughput.add_metric([], float(sweep.get("jobs_per_second", 0)))
        yield throughput

    def _zero_wait(self) -> Iterator[Any]:
        """Yield the zero-wait rate: the share of records whose first chart open had the AI result ready."""
        counts = {k.decode(): int(v) for k, v in self.client.hgetall(ZERO_WAIT_KEY).items()}
        first = CounterMetricFamily(
            "medgemma_cds_first_opens",
            "Chart opens (patient-view) that were the first for their record's AI job, per service.",
            labels=["service"],
        )
        ready = CounterMetricFamily(
            "medgemma_cds_first_opens_ai_ready",
            "First chart opens whose AI job was already done, so the AI card came with the first answer.",
            labels=["service"],
        )
        ratio = GaugeMetricFamily(
            "medgemma_cds_zero_wait_ratio",
            "Zero-wait rate: first_opens_ai_ready / first_opens, per service.",
            labels=["service"],
        )
        services = sorted({key.rpartition(":")[0] for key in counts})
        for service in services:
            opened, done = counts.get(f"{service}:first", 0), counts.get(f"{service}:ready", 0)
            first.add_metric([service], opened)
            ready.add_metric([service], done)
            if opened:
                ratio.add_metric([service], done / opened)
        yield first
        yield ready
        yield ratio

    def _job_states(self) -> tuple[dict[str, int], bool]:
        """Count job records by state, reading at most ``MAX_SCANNED_JOBS`` keys."""
        counts: dict[str, int] = {}
        keys: list[bytes] = []
        complete = True
        for key in self.client.scan_iter(match=JobStore.key("*"), count=1000):
            if len(keys) >= MAX_SCANNED_JOBS:
                complete = False
                break
            keys.append(key)
        for start in range(0, len(keys), 1000):
            with self.client.pipeline(transaction=False) as pipe:
                for key in keys[start : start + 1000]:
                    pipe.hget(key, "state")
                for state in pipe.execute():
                    # A record that expired between SCAN and HGET has no state any more.
                    if state is not None:
                        counts[state.decode()] = counts.get(state.decode(), 0) + 1
        return counts, complete


@dataclass(frozen=True)
class Metrics:
    """The app's metric objects and the registry ``/metrics`` renders; kept in ``app.extensions``."""

    registry: CollectorRegistry
    requests: Counter
    hook_latency: Histogram
    prefetch_latency: Histogram
    job_lookups: Counter
    feedback: Counter
    tolerated: Counter
    limits: Counter
    service_ids: frozenset[str]

    @classmethod
    def create(cls, client: redis.Redis, service_ids: frozenset[str]) -> Metrics:
        """Return fresh metrics: registered in a registry of this app's own, or, in multiprocess mode, in
        files that a ``MultiProcessCollector`` sums at each scrape."""
        registry = CollectorRegistry()
        own: CollectorRegistry | None = registry
        if multiprocess_mode():
            multiprocess.MultiProcessCollector(registry)
            own = None
        registry.register(RedisCollector(client))
        return cls(
            registry=registry,
            requests=Counter(
                "medgemma_cds_requests",
                "HTTP requests by route, CDS service (hook and feedback calls) and status.",
                ["route", "service", "status"],
                registry=own,
            ),
            hook_latency=Histogram(
                "medgemma_cds_hook_duration_seconds",
                "Time to answer a hook call, per service (any status).",
                ["service"],
                buckets=_HOOK_BUCKETS,
                registry=own,
            ),
            prefetch_latency=Histogram(
                "medgemma_cds_prefetch_fetch_duration_seconds",
                "Time of each FHIR read made to fill prefetch the EHR didn't send.",
                buckets=_FETCH_BUCKETS,
                registry=own,
            ),
            job_lookups=Counter(
                "medgemma_cds_job_lookups",
                "Model job lookups by hooks: hit = a finished result was there, miss = waited or enqueued.",
                ["result"],
                registry=own,
            ),
            feedback=Counter(
                "medgemma_cds_feedback",
                "Feedback items received, by outcome (§Feedback: accepted | overridden).",
                ["outcome"],
                registry=own,
            ),
            tolerated=Counter(
                "medgemma_cds_fhir_tolerated",
                "Repairs made reading inbound FHIR that strict R4 rejects (prefetch, draftOrders, reads), "
                "by kind; see README 'What is tolerated'.",
                ["service", "kind"],
                registry=own,
            ),
            limits=Counter(
                "medgemma_cds_limits",
                "Hook calls that met a per-call limit, by service and limit: draft-orders, prefetch-entries "
                "(the rest was not checked, and a card says so) or cards (the rest rolled into one card).",
                ["service", "limit"],
                registry=own,
            ),
            service_ids=service_ids,
        )


class WriteBackCollector(Collector):
    """Counts signed reports by where they are (written, pending, failed) from the store at scrape time."""

    def __init__(self, drafts: Any) -> None:
        self.drafts = drafts

    def collect(self) -> Iterator[Any]:
        """Yield the write-back family; nothing when the database doesn't answer (readyz says so)."""
        try:
            counts = self.drafts.write_back_counts()
        except Exception:  # noqa: BLE001 - a scrape must not fail with the database
            return
        reports = GaugeMetricFamily(
            "medgemma_cds_writeback_reports",
            "Signed reports by write-back state: written, pending (being retried), failed (needs attention).",
            labels=["state"],
        )
        for state, count in sorted(counts.items()):
            reports.add_metric([state], count)
        yield reports


def init_metrics(app: Flask) -> None:
    """Install the metrics on ``app``: the ``/metrics`` blueprint and the request hooks that count and time.

    Call it in ``create_app`` after the ``Services`` bundle is in ``app.extensions["cds"]``.
    """
    services = app.extensions["cds"]
    app.extensions["metrics"] = Metrics.create(services.redis, frozenset(services.registry.services))
    app.extensions["metrics"].registry.register(WriteBackCollector(services.drafts))
    app.before_request(_start_timer)
    app.after_request(_count_request)
    app.register_blueprint(bp)


def _metrics() -> Metrics | None:
    return current_app.extensions.get("metrics") if has_app_context() else None


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _count_request(response: Response) -> Response:
    metrics = _metrics()
    if metrics is None:
        return response
    rule = request.url_rule
    service_id = (request.view_args or {}).get("service_id")
    # Only declared ids become label values: a caller can't grow the series with made-up ids.
    service = "" if service_id is None else service_id if service_id in metrics.service_ids else "unknown"
    route = rule.rule if rule is not None else "unmatched"
    metrics.requests.labels(route=route, service=service, status=str(response.status_code)).inc()
    started = g.get("metrics_started")
    if (
        request.method == "POST"
        and route == "/cds-services/<service_id>"
        and service != "unknown"
        and started
    ):
        metrics.hook_latency.labels(service=service).observe(time.perf_counter() - started)
    return response


def observe_prefetch(seconds: float) -> None:
    """Record one FHIR read made to fill prefetch; pass it as ``on_fetch`` to ``run_service``."""
    metrics = _metrics()
    if metrics is not None:
        metrics.prefetch_latency.observe(seconds)


def count_tolerated(service_id: str, tolerated: Mapping[str, int]) -> None:
    """Count the repairs one hook call's inbound FHIR needed, by kind (no content, only kinds)."""
    metrics = _metrics()
    if metrics is not None:
        for kind, count in tolerated.items():
            metrics.tolerated.labels(service=service_id, kind=kind).inc(count)


def count_limit(service_id: str, limit: str) -> None:
    """Count a hook call that met a per-call limit; pass it (bound to the service) as ``on_limit``."""
    metrics = _metrics()
    if metrics is not None:
        metrics.limits.labels(service=service_id, limit=limit).inc()


def count_job_lookup(hit: bool) -> None:
    """Count a hook's model job lookup: ``hit`` when a finished result was already there."""
    metrics = _metrics()
    if metrics is not None:
        metrics.job_lookups.labels(result="hit" if hit else "miss").inc()


def count_feedback(outcome: str) -> None:
    """Count one feedback item by its outcome (anything but accepted/overridden counts as "other")."""
    metrics = _metrics()
    if metrics is not None:
        metrics.feedback.labels(outcome=outcome if outcome in _FEEDBACK_OUTCOMES else "other").inc()


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    """The Prometheus text exposition of the app's metrics (no PHI: counts, durations and model ids only)."""
    registry = current_app.extensions["metrics"].registry
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
