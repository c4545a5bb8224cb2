"""Zero-wait AI: the model jobs a chart open will ask for, asked for before the chart opens.

Triggers outside the hook path live here: the sweep of a day's Appointments (``medgemma-cds precompute``) and
FHIR R4 Subscription notifications of new imaging (``/fhir-notifications``). Each builds the call a chart
open would make for the patient (the service's declared prefetch, read from the FHIR server by the same
``resolve_prefetch``, the same day) and hands it to the function that service's chart open uses
(``request_summary_job``, ``request_imaging_job``), so the job ids are the ones the chart open computes. Their
jobs go to the lower-priority precompute queues and nobody waits on them. The appointment-prep and
encounter-prep services do the same through the ordinary hook path.

Progress is kept in Redis (``SWEEP_KEY``, and ``jobs.PRECOMPUTE_*``) for ``/metrics`` and ``medgemma-cds
check``; nothing that names a patient is logged or printed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from datetime import UTC
from datetime import date
from datetime import datetime
from datetime import time as dt_time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
from pydantic import ValidationError

from cds_service.errors import BadRequest
from cds_service.errors import CdsError
from cds_service.fhir_client import FhirReader
from cds_service.fhir_client import FhirReadError
from cds_service.hook_io import RecordImages
from cds_service.jobs import PRECOMPUTE_JOBS_KEY
from cds_service.jobs import PRECOMPUTE_QUEUES
from cds_service.jobs import PRECOMPUTE_REQUESTS_KEY
from cds_service.jobs import Capacity
from cds_service.jobs import JobQueue
from cds_service.jobs import JobStore
from cds_service.jobs import TaskMessages
from cds_service.jobs import job_request_key
from cds_service.prefetch import ParsedPrefetchCache
from cds_service.prefetch import resolve_prefetch
from cds_service.registry import Registry
from cds_service.registry import load_registry
from cds_service.settings import Settings
from cds_service.wire import HookCall
from cds_service.wire import HookRequest
from cds_service.wire import JobRecord
from cds_service.wire import PatientViewContext
from fhir_mappings.appointments import appointment_patients
from fhir_mappings.appointments import patient_id_of
from fhir_mappings.images import ImageRejected
from fhir_mappings.imaging import imaging_worklist
from fhir_mappings.read_models import Bundle
from fhir_mappings.read_models import BundleEntry
from fhir_mappings.read_models import read_resource
from fhir_mappings.record import bundle_resources
from hooks.imaging_report_draft import request_imaging_job
from hooks.patient_summary import request_summary_job
from worker.celery_app import make_celery

#: The user a precomputed call is made as; it only fills prefetch tokens (the services declare none of it).
PRECOMPUTE_USER = "Practitioner/medgemma-cds-precompute"
#: Hash of the newest sweep's progress (day, counts, times), read by /metrics and ``medgemma-cds check``.
SWEEP_KEY = "mgcds:precompute:sweep"
SWEEP_KEY_TTL_S = 7 * 24 * 3600
#: Refreshed by ``medgemma-cds precompute --daily-at`` while it waits for its next sweep (its healthcheck).
SCHEDULER_KEY = "mgcds:precompute:scheduler"
SCHEDULER_TTL_S = 180
#: Resource types whose change may bring a new image to draft a report for (FHIR R4 Subscription criteria).
IMAGING_TYPES = ("ImagingStudy", "Media", "DocumentReference", "DiagnosticReport")
APPOINTMENT_PAGE = 100
MAX_APPOINTMENT_PAGES = 50

# What a trigger found for one patient. A job was asked for: it was new, already queued or running, already
# done, or had failed (as JobQueue counts them). No job was asked for: a prefetch key was unreadable, there
# was nothing to do (no patient, no unreported image), the image was unusable, or reading the record failed.
ENQUEUED, EXISTING, READY, JOB_FAILED = "enqueued", "existing", "done", "failed"
UNAVAILABLE, NOTHING, UNREADABLE, READ_FAILED = "unavailable", "nothing", "unreadable-image", "read-failed"


def operator_reader(settings: Settings, http: httpx.Client, base_url: str, token: str | None) -> FhirReader:
    """Return a reader of a FHIR server the operator configured: it is trusted as given (the request guard's
    allowlist is for servers a caller names), plain HTTP included, as on a compose network."""
    return FhirReader(
        http,
        base_url,
        token,
        allowlist=[base_url.rstrip("/")],
        allow_http_loopback=settings.fhir_allow_http_loopback,
    )


@dataclass
class Requested:
    """What asking for one job found: created it, found it queued or running, found it done, or failed."""

    created: bool = False
    record: JobRecord | None = None

    def outcome(self) -> str:
        """Return enqueued, existing, done or failed (failed too when Redis could not be asked)."""
        if self.created:
            return ENQUEUED
        state = self.record.state if self.record is not None else "failed"
        return READY if state == "done" else JOB_FAILED if state == "failed" else EXISTING


class Precomputer:
    """Asks for the jobs a patient's chart open will ask for, on the precompute queues, without waiting."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        store: JobStore,
        capacity: Capacity,
        messages: TaskMessages,
        executor: Executor,
        today: Callable[[], date] = date.today,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.capacity = capacity
        self.messages = messages
        self.executor = executor
        self.today = today

    def chart_call(self, service_id: str, reader: FhirReader, fhir_base: str, patient_id: str) -> HookCall:
        """Return the call the service's chart open (patient-view) would make, its prefetch read from the
        FHIR server. Raises CdsError (a read failed) or ValidationError (not a valid patient id)."""
        definition = self.registry.services[service_id]
        context = PatientViewContext(user_id=PRECOMPUTE_USER, patient_id=patient_id)
        request = HookRequest(
            hook="patient-view",
            hook_instance=uuid.uuid4(),
            fhir_server=fhir_base,
            context=context.model_dump(by_alias=True, exclude_none=True),
        )
        prefetched = resolve_prefetch(
            definition.prefetch, {}, context, lambda: reader, self.executor, ParsedPrefetchCache(0)
        )
        return HookCall(
            service_id=service_id,
            request=request,
            context=context,
            prefetch=prefetched.resources,
            public_url=self.settings.public_url.rstrip("/"),
            content_hashes=prefetched.content_hashes,
            unavailable=prefetched.unavailable,
            tolerated=prefetched.tolerated,
            today=self.today(),
            images=RecordImages(self.settings, fhir_base, reader.access_token),
        )

    def _jobs(self, service_id: str, trigger: str, requested: Requested) -> JobQueue:
        def seen(job_id: str, created: bool, record: JobRecord | None) -> None:
            requested.created, requested.record = created, record

        return JobQueue(
            self.store,
            self.messages,
            self.settings,
            service_id,
            deadline=time.monotonic(),
            capacity=self.capacity,
            background=True,
            trigger=trigger,
            on_request=seen,
        )

    def summary(self, reader: FhirReader, fhir_base: str, patient_id: str, trigger: str) -> str:
        """Ask for the patient's AI pre-visit summary job; return the outcome (enqueued, existing, ...)."""
        return self._counted(trigger, self._summary(reader, fhir_base, patient_id, trigger))

    def imaging(self, reader: FhirReader, fhir_base: str, patient_id: str, trigger: str) -> str:
        """Ask for the imaging-read job of the patient's newest unreported image; return the outcome."""
        return self._counted(trigger, self._imaging(reader, fhir_base, patient_id, trigger))

    def _counted(self, trigger: str, outcome: str) -> str:
        # A job asked for is counted by its JobQueue; here the outcomes where none was.
        if outcome in (UNAVAILABLE, NOTHING, UNREADABLE, READ_FAILED):
            try:
                self.store.redis.hincrby(PRECOMPUTE_REQUESTS_KEY, f"{trigger}:{outcome}", 1)
            except redis.RedisError:
                pass
        return outcome

    def _summary(self, reader: FhirReader, fhir_base: str, patient_id: str, trigger: str) -> str:
        try:
            call = self.chart_call("patient-summary", reader, fhir_base, patient_id)
        except (CdsError, ValidationError):
            return READ_FAILED
        # With a key unreadable the chart open would read another record: its job would be another job.
        if call.unavailable:
            return UNAVAILABLE
        if call.prefetch["patient"] is None:
            return NOTHING
        requested = Requested()
        request_summary_job(replace(call, jobs=self._jobs("patient-summary", trigger, requested)))
        return requested.outcome()

    def _imaging(self, reader: FhirReader, fhir_base: str, patient_id: str, trigger: str) -> str:
        try:
            call = self.chart_call("imaging-report-draft", reader, fhir_base, patient_id)
        except (CdsError, ValidationError):
            return READ_FAILED
        if call.unavailable:
            return UNAVAILABLE
        p = call.prefetch
        sources, _ = imaging_worklist(p["studies"], p["media"], p["documents"], p["reports"])
        if not sources:
            return NOTHING
        requested = Requested()
        jobs = self._jobs("imaging-report-draft", trigger, requested)
        try:
            request_imaging_job(replace(call, jobs=jobs), sources[0])
        except ImageRejected:
            return UNREADABLE
        return requested.outcome()


# --- The day's sweep ------------------------------------------------------------------------------------


@dataclass
class SweepReport:
    """What a sweep did: appointments and patients found, and the outcome for each patient."""

    day: date
    appointments: int = 0
    patients: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def requested(self) -> int:
        """Return the patients whose job was asked for (new, already queued or running, or already done)."""
        return sum(self.outcomes.get(kind, 0) for kind in (ENQUEUED, EXISTING, READY))

    @property
    def jobs_per_second(self) -> float:
        """Return the jobs asked for per second of sweeping."""
        return self.requested / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """Return the report as one line of counts (no patient is named)."""
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(self.outcomes.items()))
        return (
            f"{self.day.isoformat()}: {self.appointments} appointments, {self.patients} patients"
            f"{': ' + counts if counts else ''}; {self.requested} jobs in {self.seconds:.1f} s "
            f"({self.jobs_per_second:.1f} jobs/s)"
        )


def day_appointments(reader: FhirReader, base_url: str, day: date) -> list[Any]:
    """Return the Appointments of ``day`` that are booked or arrived, following the search's next links
    (only under ``base_url``, the server the operator named)."""
    query: str | None = f"Appointment?date={day.isoformat()}&status=booked,arrived&_count={APPOINTMENT_PAGE}"
    base = base_url.rstrip("/")
    found: list[Any] = []
    for _ in range(MAX_APPOINTMENT_PAGES):
        if query is None:
            break
        data, _seconds = reader.read(query)
        page = read_resource(data)
        found += bundle_resources(page, "Appointment")
        links = data.get("link") if isinstance(data.get("link"), list) else []
        following = [
            link.get("url") for link in links if isinstance(link, dict) and link.get("relation") == "next"
        ]
        query = following[0] if following and isinstance(following[0], str) else None
        if query is not None and not _same_server(query, base):
            raise FhirReadError("invalid", "the FHIR server's next link points at another server")
    return found


def _same_server(url: str, base: str) -> bool:
    target, origin = urlsplit(url), urlsplit(base)
    return (target.scheme, target.netloc) == (origin.scheme, origin.netloc) and target.path.startswith(
        origin.path
    )


class RateLimit:
    """Spaces calls at most ``per_second`` apart on average (no burst beyond one)."""

    def __init__(
        self,
        per_second: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self.clock = clock
        self.sleep = sleep
        self._next = clock()

    def wait(self) -> None:
        """Return once the next call may be made."""
        now = self.clock()
        if self._next > now:
            self.sleep(self._next - now)
        self._next = max(self._next, now) + self.interval


def sweep(
    precomputer: Precomputer,
    reader: FhirReader,
    fhir_base: str,
    day: date,
    *,
    rate: float,
    redis_client: redis.Redis,
    progress: Callable[[SweepReport, int], None] = lambda report, done: None,
) -> SweepReport:
    """Ask for the pre-visit summary of every patient booked or arrived on ``day``, at most ``rate`` patients
    a second, recording progress in Redis (``SWEEP_KEY``); FhirReadError when the schedule can't be read."""
    started = time.monotonic()
    report = SweepReport(day=day)
    _record(redis_client, {"day": day.isoformat(), "state": "running", "started_at": _now(), "done": 0})
    try:
        appointments = day_appointments(reader, fhir_base, day)
    except (FhirReadError, BadRequest, ValueError):
        _record(redis_client, {"state": "failed", "finished_at": _now()})
        raise
    patients = appointment_patients(
        Bundle(resourceType="Bundle", entry=[BundleEntry(resource=a) for a in appointments])
    )
    report.appointments, report.patients = len(appointments), len(patients)
    _record(redis_client, {"appointments": report.appointments, "patients": report.patients})
    limit = RateLimit(rate)
    for done, patient_id in enumerate(patients, start=1):
        limit.wait()
        outcome = precomputer.summary(reader, fhir_base, patient_id, trigger="sweep")
        report.outcomes[outcome] = report.outcomes.get(outcome, 0) + 1
        report.seconds = time.monotonic() - started
        _record(redis_client, {"done": done, outcome: report.outcomes[outcome], "seconds": report.seconds})
        progress(report, done)
    report.seconds = time.monotonic() - started
    _record(
        redis_client,
        {
            "state": "finished",
            "finished_at": _now(),
            "seconds": round(report.seconds, 3),
            "requested": report.requested,
            "jobs_per_second": round(report.jobs_per_second, 3),
        },
    )
    return report


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _record(client: redis.Redis, fields: dict[str, Any]) -> None:
    """Write sweep progress; a Redis hiccup must not stop the sweep (its jobs will say Redis is down)."""
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.hset(SWEEP_KEY, mapping={k: str(v) for k, v in fields.items()})
            pipe.expire(SWEEP_KEY, SWEEP_KEY_TTL_S)
            pipe.execute()
    except redis.RedisError:
        pass


def sweep_progress(client: redis.Redis) -> dict[str, str]:
    """Return the newest sweep's progress as Redis holds it (empty when none ran)."""
    return {k.decode(): v.decode() for k, v in client.hgetall(SWEEP_KEY).items()}


# --- FHIR Subscription notifications ---------------------------------------------------------------------


def notified_patient(resource: Any) -> str | None:
    """Return the id of the Patient a notified imaging resource is about (its ``subject``), or None."""
    subject = getattr(resource, "subject", None)
    return patient_id_of(subject.reference if subject is not None else None)


# --- Running a sweep: once, or every day --------------------------------------------------------------


def run_sweep(
    settings: Settings,
    fhir_base: str,
    day: date,
    *,
    token: str | None = None,
    rate: float = 5.0,
    progress: Callable[[SweepReport, int], None] = lambda report, done: None,
) -> SweepReport:
    """Sweep ``day``'s appointments on ``fhir_base`` with this deployment's Redis, queues and settings.

    The jobs are asked for as a chart open on ``day`` asks for them (the patient's age is the one on that
    day), so a sweep run the evening before still matches the next morning's chart opens.
    """
    redis_client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
    celery = make_celery(settings)
    timeout = httpx.Timeout(settings.fhir_timeout_s, connect=settings.fhir_connect_timeout_s)

    with httpx.Client(timeout=timeout) as http, ThreadPoolExecutor(8, thread_name_prefix="sweep") as pool:
        store = JobStore(redis_client, settings.result_ttl_s, request_key=job_request_key(settings))
        precomputer = Precomputer(
            settings,
            load_registry(),
            store,
            Capacity(redis_client),
            TaskMessages(celery),
            pool,
            today=lambda: day,
        )
        reader = operator_reader(settings, http, fhir_base, token)
        try:
            return sweep(
                precomputer, reader, fhir_base, day, rate=rate, redis_client=redis_client, progress=progress
            )
        finally:
            celery.close()
            redis_client.close()


def next_run(now: datetime, at: dt_time) -> datetime:
    """Return the next local time ``at`` strictly after ``now`` (a local, aware datetime)."""
    candidate = now.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
    if candidate <= now:
        candidate = (candidate + timedelta(days=1)).replace(hour=at.hour, minute=at.minute)
    return candidate


def run_daily(
    settings: Settings,
    fhir_base: str,
    at: dt_time,
    *,
    token: str | None = None,
    rate: float = 5.0,
    now: Callable[[], datetime] = lambda: datetime.now().astimezone(),
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[SweepReport, int], None] = lambda report, done: None,
    on_report: Callable[[SweepReport], None] = lambda report: None,
    days: int | None = None,
) -> None:
    """Sweep each day's appointments at local time ``at``, forever (or ``days`` times); today's too at once
    when it is past ``at`` and today's sweep has not finished (a restart mid-morning catches up).

    While waiting it refreshes ``SCHEDULER_KEY`` (the container's healthcheck reads it); a sweep that fails
    (FHIR server down) is reported and the next day's still runs.
    """
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)

    def beat(upcoming: datetime) -> None:
        try:
            client.set(SCHEDULER_KEY, upcoming.isoformat(), ex=SCHEDULER_TTL_S)
        except redis.RedisError:
            pass  # Redis is down: the healthcheck says so, and the sweep would fail anyway.

    def sweep_on(day: date) -> None:
        def keep_alive(report: SweepReport, done: int) -> None:
            beat(now())
            progress(report, done)

        try:
            on_report(run_sweep(settings, fhir_base, day, token=token, rate=rate, progress=keep_alive))
        except (FhirReadError, BadRequest, ValueError, redis.RedisError) as error:
            print(f"sweep of {day.isoformat()} failed: {getattr(error, 'detail', type(error).__name__)}")

    current = now()
    last = _safe_progress(client)
    finished_today = last.get("day") == current.date().isoformat() and last.get("state") == "finished"
    if (
        current >= current.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
        and not finished_today
    ):
        sweep_on(current.date())
    swept = 0
    while days is None or swept < days:
        upcoming = next_run(now(), at)
        while (left := (upcoming - now()).total_seconds()) > 0:
            beat(upcoming)
            sleep(min(left, 60.0))
        sweep_on(upcoming.date())
        swept += 1


def _safe_progress(client: redis.Redis) -> dict[str, str]:
    try:
        return sweep_progress(client)
    except redis.RedisError:
        return {}


# --- Creating the Subscriptions --------------------------------------------------------------------------


def subscription_resource(resource_type: str, endpoint: str, secret: str) -> dict[str, Any]:
    """Return the R4 Subscription that notifies ``endpoint`` of every new or updated ``resource_type``.

    rest-hook with ``payload`` application/fhir+json: HAPI PUTs the resource to ``{endpoint}/{type}/{id}``;
    the header line is sent with every notification (the receiver's shared secret).
    """
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "medgemma-cds: draft imaging reports before the chart opens",
        "criteria": f"{resource_type}?",
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "header": [f"Authorization: Bearer {secret}"],
        },
    }


def subscribe(
    fhir_base: str, token: str | None, endpoint: str, secret: str, http: httpx.Client
) -> list[tuple[str, str, str]]:
    """Create (or update, when one with the same criteria and endpoint exists) a Subscription per imaging
    resource type on ``fhir_base``; return ``(criteria, Subscription/id, "created" | "updated")`` each.

    Raises httpx.HTTPStatusError when the server refuses one."""
    base = fhir_base.rstrip("/")
    headers = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    existing: dict[str, str] = {}
    found = http.get(f"{base}/Subscription", params={"url": endpoint, "_count": "100"}, headers=headers)
    if found.status_code == 200:
        for entry in found.json().get("entry") or []:
            resource = entry.get("resource") or {}
            if (resource.get("channel") or {}).get("endpoint") == endpoint and resource.get("id"):
                existing[str(resource.get("criteria"))] = str(resource["id"])
    done = []
    for resource_type in IMAGING_TYPES:
        subscription = subscription_resource(resource_type, endpoint, secret)
        criteria = subscription["criteria"]
        if criteria in existing:
            subscription["id"] = existing[criteria]
            answer = http.put(f"{base}/Subscription/{existing[criteria]}", json=subscription, headers=headers)
            what = "updated"
        else:
            answer = http.post(f"{base}/Subscription", json=subscription, headers=headers)
            what = "created"
        answer.raise_for_status()
        created_id = (answer.json() if answer.content else {}).get("id") or existing.get(criteria, "")
        done.append((criteria, f"Subscription/{created_id}", what))
    return done


# --- Progress, as /metrics and `medgemma-cds check` show it ----------------------------------------------

#: A status read counts the states of at most this many precomputed jobs.
MAX_COUNTED_JOBS = 10_000
# Kombu's Redis transport keeps a message sent with priority p > 0 in the list "{queue}\x06\x16{p}".
_PRIORITY_LISTS = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def precompute_status(client: redis.Redis) -> dict[str, Any]:
    """Return precompute progress from Redis: the newest sweep, the scheduler's next run, the depth of each
    precompute queue, the states of the precomputed jobs and what each trigger asked for (counts only)."""
    with client.pipeline(transaction=False) as pipe:
        for name in PRECOMPUTE_QUEUES.values():
            for suffix in _PRIORITY_LISTS:
                pipe.llen(name + suffix)
        pipe.get(SCHEDULER_KEY)
        pipe.hgetall(PRECOMPUTE_REQUESTS_KEY)
        answers = pipe.execute()
    per_queue = len(_PRIORITY_LISTS)
    depths = {
        name: sum(answers[index * per_queue : (index + 1) * per_queue])
        for index, name in enumerate(PRECOMPUTE_QUEUES.values())
    }
    scheduler, requests = answers[-2], answers[-1]
    job_ids = []
    for job_id in client.sscan_iter(PRECOMPUTE_JOBS_KEY, count=1000):
        if len(job_ids) >= MAX_COUNTED_JOBS:
            break
        job_ids.append(job_id.decode())
    states: dict[str, int] = {}
    for start in range(0, len(job_ids), 1000):
        with client.pipeline(transaction=False) as pipe:
            for job_id in job_ids[start : start + 1000]:
                pipe.hget(JobStore.key(job_id), "state")
            for state in pipe.execute():
                # A record that expired (or was lost with Redis) no longer has a state.
                name = state.decode() if state is not None else "expired"
                states[name] = states.get(name, 0) + 1
    return {
        "sweep": sweep_progress(client),
        "scheduler_next_run": scheduler.decode() if scheduler else None,
        "queues": depths,
        "jobs": states,
        "requests": {k.decode(): int(v) for k, v in requests.items()},
    }
