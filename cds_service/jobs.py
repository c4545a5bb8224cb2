"""Model jobs as the API sees them: idempotent ids, a Redis job record, enqueue once, wait within the budget.

A job's id hashes everything its result depends on, so the same unchanged record never enqueues twice and a
finished result is one Redis read away. Redis may lose everything: a lost record (or half of one, left by a
worker finishing after a restart) is recomputed under the same id, a worker finishing a lost record writes
it whole, and a job whose worker died (its heartbeat expired) is queued again by the next hook for it.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from typing import Any
from typing import Literal

import orjson
import redis
from celery import Celery
from cryptography.fernet import Fernet
from cryptography.fernet import InvalidToken
from kombu.entity import PERSISTENT_DELIVERY_MODE

from cds_service.settings import Settings
from cds_service.settings import key_fingerprint
from cds_service.settings import purpose_key
from cds_service.signed_links import sign_link
from cds_service.wire import ImageReference
from cds_service.wire import JobRecord
from cds_service.wire import ModelJobRequest
from cds_service.wire import ModelRole
from cds_service.wire import ModelTask

log = logging.getLogger(__name__)

TASK_NAME = "medgemma_cds.run_model_job"
QUEUES: dict[str, str] = {"text": "medgemma-text", "image": "medgemma-image"}
#: Lower-priority queues for precomputed work (the day's sweep, appointment-book, FHIR Subscriptions). The
#: same workers consume them, after the interactive ones: kombu's Redis transport with
#: ``queue_order_strategy="sorted"`` asks for its queues in name order in one BRPOP, and Redis pops from the
#: first non-empty one; each name here sorts right after its interactive queue's.
PRECOMPUTE_QUEUES: dict[str, str] = {"text": "medgemma-text-precompute", "image": "medgemma-image-precompute"}
#: ``{prefix}{job id}`` exists while a job waits on a precompute queue: a chart open that finds the job still
#: queued takes the mark (DEL answers 1 to one caller only) and sends it again on the interactive queue.
PRECOMPUTE_MARK_PREFIX = "mgcds:precompute:queued:"
#: The ids of jobs asked for by precompute triggers (a set that expires with the results), for /metrics.
PRECOMPUTE_JOBS_KEY = "mgcds:precompute:jobs"
#: Hash of ``{trigger}:{outcome}`` counts: what each precompute trigger asked for and found.
PRECOMPUTE_REQUESTS_KEY = "mgcds:metrics:precompute-requests"
#: ``{prefix}{service}:{hash of job id}`` marks a record's first chart open (it expires with the result);
#: the hash of ``{service}:first`` and ``{service}:ready`` counts gives the zero-wait rate.
FIRST_CALL_PREFIX = "mgcds:first-call:"
ZERO_WAIT_KEY = "mgcds:metrics:zero-wait"
# A failed job is kept briefly so a burst of hooks doesn't hammer a broken input, then retried.
FAILED_TTL_S = 300
#: A job still queued this long after its message was sent, with its queue empty and no precompute mark, has
#: lost its message (taken by a worker that died before starting it, or dropped by Redis): it is sent again.
QUEUED_GRACE_S = 30
#: Redis hashes (field: model id) added to once per finished job; /metrics reads model tokens/s from them,
#: and hooks the mean seconds a job takes (seconds / jobs) to judge whether waiting can pay off.
MODEL_TOKENS_KEY = "mgcds:metrics:generated-tokens"
MODEL_SECONDS_KEY = "mgcds:metrics:generation-seconds"
MODEL_JOBS_KEY = "mgcds:metrics:finished-jobs"
#: How long a process trusts what it last read of the workers and the queues.
CAPACITY_TTL_S = 1.0
# Workers refresh a key per process every HEARTBEAT_S; one that stops for HEARTBEAT_TTL_S counts as gone.
HEARTBEAT_PREFIX = "mgcds:worker:"
HEARTBEAT_S = 5
HEARTBEAT_TTL_S = 15


def live_workers(redis_client: redis.Redis) -> dict[str, int]:
    """Return how many worker processes sent a heartbeat recently, per queue role (text, image)."""
    counts = dict.fromkeys(QUEUES, 0)
    for key in redis_client.scan_iter(match=HEARTBEAT_PREFIX + "*", count=200):
        role = key.decode().removeprefix(HEARTBEAT_PREFIX).split(":", 1)[0]
        if role in counts:
            counts[role] += 1
    return counts


def workers_with_another_secret(redis_client: redis.Redis, settings: Settings) -> int:
    """Return how many live worker processes have another ``MEDGEMMA_CDS_SECRET_KEY`` than ``settings``
    (their heartbeat carries its fingerprint): such a worker can read none of the API's jobs."""
    keys = list(redis_client.scan_iter(match=HEARTBEAT_PREFIX + "*", count=200))
    ours = key_fingerprint(settings).encode()
    return sum(1 for value in (redis_client.mget(keys) if keys else []) if value and value != ours)


def done_channel(job_id: str) -> str:
    """Return the Redis pub/sub channel a job's end is announced on (its final state is the message)."""
    return f"mgcds:job-done:{job_id}"


def now_iso() -> str:
    """Return the current UTC time as ISO-8601."""
    return datetime.now(UTC).isoformat()


def job_request_key(settings: Settings) -> bytes:
    """Return the key of job requests in Redis; the API and every worker derive the same one."""
    return purpose_key(settings, "job-request")


class JobRequestUnreadable(Exception):
    """A stored job request does not decrypt: it was queued under another ``MEDGEMMA_CDS_SECRET_KEY``."""


#: The fields of a job record a reader gets; the request (clinical text, images) is never read back.
RECORD_FIELDS = (
    "state",
    "service_id",
    "task",
    "attempts",
    "created_at",
    "started_at",
    "finished_at",
    "model",
    "model_version",
    "result",
    "error",
    "generated_tokens",
    "seconds",
    "truncated",
)


def record_from(job_id: str, fields: dict[str, str]) -> JobRecord | None:
    """Return the record these stored fields describe, or None when there is none (or only half of one)."""
    if "state" not in fields or "created_at" not in fields:
        return None
    return JobRecord(
        id=job_id,
        service_id=fields["service_id"],
        task=fields["task"],
        state=fields["state"],  # type: ignore[arg-type]
        attempts=int(fields.get("attempts", 0)),
        created_at=datetime.fromisoformat(fields["created_at"]),
        started_at=datetime.fromisoformat(fields["started_at"]) if "started_at" in fields else None,
        finished_at=datetime.fromisoformat(fields["finished_at"]) if "finished_at" in fields else None,
        model=fields.get("model"),
        model_version=fields.get("model_version"),
        result=json.loads(fields["result"]) if "result" in fields else None,
        error=fields.get("error"),
        generated_tokens=int(fields["generated_tokens"]) if "generated_tokens" in fields else None,
        seconds=float(fields["seconds"]) if "seconds" in fields else None,
        truncated=json.loads(fields["truncated"]) if "truncated" in fields else None,
    )


@dataclass(frozen=True)
class Submitted:
    """What asking for a job found: its id, whether this call created it, whether it was the record's first
    counted chart open, and its record as it stood."""

    job_id: str
    created: bool
    first_call: bool
    record: JobRecord | None


class TaskMessages:
    """The model task's Celery message, built once as ``Celery.send_task`` builds it; a job fills in its id.

    What ``celery.send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=queue)`` would push (kombu's Redis
    transport keeps a queue as a list of JSON envelopes, the body base64), so the worker consumes it as any
    Celery task, while the API pushes it in the same Redis call that creates the job's record
    (``JobStore.submit``) instead of a broker round trip of its own and a result subscription it never reads.
    """

    def __init__(self, celery: Celery) -> None:
        placeholder = "job-id"
        headers, properties, body, _sent = celery.amqp.create_task_message(
            placeholder, TASK_NAME, [placeholder], {}, reply_to=celery.thread_oid
        )
        self._headers = headers
        self._properties = {**properties, "delivery_mode": PERSISTENT_DELIVERY_MODE, "priority": 0}
        self._embed = body[2]

    def message(self, job_id: str, queue: str) -> bytes:
        """Return the message that runs the model task on ``job_id``, for ``queue``."""
        args = [job_id]
        return orjson.dumps(
            {
                "body": base64.b64encode(orjson.dumps([args, {}, self._embed])).decode(),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {**self._headers, "id": job_id, "root_id": job_id, "argsrepr": repr(args)},
                "properties": {
                    **self._properties,
                    "correlation_id": job_id,
                    "delivery_info": {"exchange": "", "routing_key": queue},
                    "body_encoding": "base64",
                    "delivery_tag": str(uuid.uuid4()),
                },
            }
        )


class JobStore:
    """Job records in Redis: ``mgcds:job:{id}`` hashes that expire, written by the API and the workers.

    The ``request`` field holds clinical text and images: it is encrypted (Fernet, keyed by
    ``job_request_key``), and deleted when the job finishes; the result stays until the record expires.
    """

    # A hook's whole job request in one round trip, atomic: create the record unless it exists (its fields
    # and expiry set only by the call that created it, so a concurrent hook finds it whole or not at all)
    # and push its task message on the queue; or, for a chart open finding a job still marked as waiting on
    # a precompute queue, take the mark and push the message on the interactive queue. Then the counts for
    # /metrics, and the record's fields (never the request) for the caller.
    # KEYS: record, queue, precompute mark, first-call marker, zero-wait counts, precompute requests and
    # jobs. ARGV: service id, task, created at, sealed request, ttl, message ('' = none), mode (interactive |
    # background | none), first-call service ('' = not counted), trigger ('' = none), job id, now (epoch
    # seconds), QUEUED_GRACE_S, then the names of the record's fields to return (RECORD_FIELDS).
    _REQUEST = """
    if redis.call('HEXISTS', KEYS[1], 'created_at') == 0 then
        -- Half a record (a worker wrote to it after Redis lost the rest): missing, so made again.
        redis.call('DEL', KEYS[1])
    end
    local created = redis.call('HSETNX', KEYS[1], 'state', 'queued')
    if created == 1 then
        redis.call('HSET', KEYS[1], 'service_id', ARGV[1], 'task', ARGV[2], 'created_at', ARGV[3],
                   'attempts', 0, 'request', ARGV[4], 'sent_at', ARGV[11])
        redis.call('EXPIRE', KEYS[1], ARGV[5])
        if ARGV[7] == 'background' then redis.call('SET', KEYS[3], 1, 'EX', ARGV[5]) end
        if ARGV[6] ~= '' then redis.call('LPUSH', KEYS[2], ARGV[6]) end
    elseif ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'state') == 'running' then
        -- Running on a worker whose heartbeat is gone (it died): released, and queued again at once.
        local beat = redis.call('HGET', KEYS[1], 'heartbeat')
        if beat and redis.call('EXISTS', beat) == 0 then
            redis.call('HSET', KEYS[1], 'state', 'queued', 'sent_at', ARGV[11])
            redis.call('HDEL', KEYS[1], 'worker', 'heartbeat', 'started_at')
            redis.call('LPUSH', KEYS[2], ARGV[6])
        end
    elseif ARGV[7] == 'interactive' and redis.call('HGET', KEYS[1], 'state') == 'queued' then
        if redis.call('DEL', KEYS[3]) == 1 then
            redis.call('LPUSH', KEYS[2], ARGV[6])
            redis.call('HSET', KEYS[1], 'sent_at', ARGV[11])
        elseif redis.call('LLEN', KEYS[2]) == 0
            and ARGV[11] - (redis.call('HGET', KEYS[1], 'sent_at') or 0) > tonumber(ARGV[12]) then
            -- Queued past the grace with nothing on its queue: its message is lost; sent again.
            redis.call('LPUSH', KEYS[2], ARGV[6])
            redis.call('HSET', KEYS[1], 'sent_at', ARGV[11])
        end
    end
    local fields = redis.call('HMGET', KEYS[1], unpack(ARGV, 13))
    local state = fields[1]
    local first = 0
    if ARGV[8] ~= '' and redis.call('SET', KEYS[4], 1, 'NX', 'EX', ARGV[5]) then
        first = 1
        redis.call('HINCRBY', KEYS[5], ARGV[8] .. ':first', 1)
        if state == 'done' then redis.call('HINCRBY', KEYS[5], ARGV[8] .. ':ready', 1) end
    end
    if ARGV[9] ~= '' then
        local outcome = 'existing'
        if created == 1 then
            outcome = 'enqueued'
        elseif state == 'done' or state == 'failed' then
            outcome = state
        end
        redis.call('HINCRBY', KEYS[6], ARGV[9] .. ':' .. outcome, 1)
        redis.call('SADD', KEYS[7], ARGV[10])
        redis.call('EXPIRE', KEYS[7], ARGV[5])
    end
    return {created, first, fields}
    """

    def __init__(self, redis_client: redis.Redis, ttl_s: int, *, request_key: bytes) -> None:
        self.redis = redis_client
        self.ttl_s = ttl_s
        self._box = Fernet(base64.urlsafe_b64encode(request_key))
        self._request = redis_client.register_script(self._REQUEST)
        self._start = redis_client.register_script(self._START)

    @staticmethod
    def key(job_id: str) -> str:
        """Return the Redis key of a job."""
        return f"mgcds:job:{job_id}"

    def create(self, request: ModelJobRequest) -> tuple[str, JobRecord | None]:
        """Create the record unless one exists, queueing nothing; return the id and, when this call created
        it, its record."""
        submitted = self.submit(request, request.job_id(), b"", "", mode="none")
        return submitted.job_id, submitted.record if submitted.created else None

    def submit(
        self,
        request: ModelJobRequest,
        job_id: str,
        message: bytes,
        queue: str,
        *,
        mode: Literal["interactive", "background", "none"],
        first_call_service: str = "",
        trigger: str = "",
    ) -> Submitted:
        """Ask for a job in one Redis round trip (``_REQUEST``); return what it found or made.

        ``message`` (a ``TaskMessages.message`` for ``job_id``) goes on ``queue`` when the record is created,
        or, ``interactive``, when a precompute mark is taken. ``first_call_service`` counts a chart open's
        first call for the record towards the zero-wait rate; ``trigger`` counts a precompute trigger's
        request.
        """
        created_at = datetime.now(UTC)
        marker = hashlib.sha256(job_id.encode()).hexdigest()[:32]
        created, first, fields = self._request(
            keys=[
                self.key(job_id),
                queue,
                PRECOMPUTE_MARK_PREFIX + job_id,
                f"{FIRST_CALL_PREFIX}{first_call_service}:{marker}",
                ZERO_WAIT_KEY,
                PRECOMPUTE_REQUESTS_KEY,
                PRECOMPUTE_JOBS_KEY,
            ],
            args=[
                request.service_id,
                request.task,
                created_at.isoformat(),
                self._box.encrypt(request.model_dump_json().encode()),
                self.ttl_s,
                message,
                mode,
                first_call_service,
                trigger,
                job_id,
                int(time.time()),
                QUEUED_GRACE_S,
                *RECORD_FIELDS,
            ],
        )
        found = {name: value.decode() for name, value in zip(RECORD_FIELDS, fields, strict=True) if value}
        record = record_from(job_id, found)
        return Submitted(job_id, bool(created), bool(first), record)

    def request_of(self, job_id: str) -> ModelJobRequest | None:
        """Return the stored request of a job, or None when the record or its request (job finished) is gone.

        Raises JobRequestUnreadable when it does not decrypt with this store's key: the process reading it
        has another ``MEDGEMMA_CDS_SECRET_KEY`` than the one that queued it (a silent None would leave the
        job queued until it expires).
        """
        sealed = self.redis.hget(self.key(job_id), "request")
        if not sealed:
            return None
        try:
            plain = self._box.decrypt(sealed)
        except InvalidToken:
            raise JobRequestUnreadable(
                "the job request does not decrypt: the API and the worker must share MEDGEMMA_CDS_SECRET_KEY"
            ) from None
        return ModelJobRequest.model_validate_json(plain)

    def get(self, job_id: str) -> JobRecord | None:
        """Return the job's record, or None."""
        values = self.redis.hmget(self.key(job_id), RECORD_FIELDS)
        return record_from(job_id, {k: v.decode() for k, v in zip(RECORD_FIELDS, values, strict=True) if v})

    # Only a whole record is started: after Redis lost it, a worker's start must not leave half of one.
    _START = """
    if redis.call('HEXISTS', KEYS[1], 'created_at') == 0 then return 0 end
    local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
    redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[1], 'worker', ARGV[2])
    if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'heartbeat', ARGV[3]) end
    return attempts
    """

    def start(self, job_id: str, worker: str, heartbeat: str | None = None) -> int:
        """Mark a job running on ``worker``; return the attempt number (redeliveries count up), 0 when the
        record is gone. ``heartbeat`` is the key of the worker's heartbeat: once it expires, the next hook
        for the job releases it (queued again) instead of waiting on a dead worker."""
        return int(self._start(keys=[self.key(job_id)], args=[now_iso(), worker, heartbeat or ""]))

    def finish(self, job_id: str, fields: dict[str, Any], identity: dict[str, str] | None = None) -> bool:
        """Store a result once: a redelivered task that finishes again leaves the first result in place.

        When Redis lost the record meanwhile (a restart), ``identity`` (its service id and task) makes it a
        whole record again, so the result is found; without it nothing is written (a result with no record
        would read as missing and block the recompute).
        """
        key = self.key(job_id)
        # WATCH/MULTI makes "not done yet → write result" atomic against a concurrent redelivery.
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    if pipe.hget(key, "state") in (b"done", b"failed"):
                        pipe.unwatch()
                        return False
                    lost = not pipe.hexists(key, "created_at")
                    if lost and identity is None:
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    if lost:
                        pipe.hset(key, mapping={**(identity or {}), "created_at": now_iso(), "attempts": 1})
                    pipe.hset(key, mapping={**fields, "finished_at": now_iso()})
                    # The inputs (clinical text, images) go as the result arrives; only the result is kept.
                    pipe.hdel(key, "request")
                    # An answer that did not fit its (already enlarged) budget would be cut the same way
                    # again: greedy decoding is deterministic. It is kept like a result.
                    settled = fields["state"] == "done" or "truncated" in fields
                    pipe.expire(key, self.ttl_s if settled else FAILED_TTL_S)
                    if fields["state"] == "done" and "generated_tokens" in fields:
                        # In the same transaction as the result, so a redelivered job adds nothing twice.
                        model = str(fields.get("model", ""))
                        pipe.hincrby(MODEL_TOKENS_KEY, model, int(fields["generated_tokens"]))
                        pipe.hincrbyfloat(MODEL_SECONDS_KEY, model, float(fields["seconds"]))
                        pipe.hincrby(MODEL_JOBS_KEY, model, 1)
                    # Hooks waiting on this job wake on the message instead of polling the record.
                    pipe.publish(done_channel(job_id), str(fields["state"]))
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue


class Capacity:
    """What the model side can do now: live workers per role, queue depth, mean seconds per job.

    Read from Redis at most once per CAPACITY_TTL_S per process (a SCAN of heartbeats is too dear for every
    hook), shared by every request of the process.
    """

    def __init__(self, redis_client: redis.Redis) -> None:
        self.redis = redis_client
        self._lock = threading.Lock()
        self._read_at = -CAPACITY_TTL_S
        self._workers: dict[str, int] = {}

    def workers(self) -> dict[str, int]:
        """Return live worker processes per role, as of at most CAPACITY_TTL_S ago."""
        with self._lock:
            if time.monotonic() - self._read_at >= CAPACITY_TTL_S:
                self._workers = live_workers(self.redis)
                self._read_at = time.monotonic()
            return self._workers

    def can_finish(self, role: str, model: str, seconds_left: float) -> bool:
        """Return whether a job queued now could plausibly finish within ``seconds_left``.

        No live worker: never. Otherwise the queue ahead, shared among the workers, times the mean job
        time of this model must fit; with no job finished yet there is no estimate, so it may.
        """
        workers = self.workers().get(role, 0)
        if workers == 0 or seconds_left <= 0:
            return False
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(MODEL_SECONDS_KEY, model).hget(MODEL_JOBS_KEY, model).llen(QUEUES[role])
            seconds, jobs, waiting = pipe.execute()
        if not jobs or not seconds:
            return True
        mean = float(seconds) / max(int(jobs), 1)
        return (int(waiting) // workers + 1) * mean <= seconds_left


class JobQueue:
    """The handle a hook handler gets (``wire.ModelJobs``): model work that never waits past the deadline.

    ``background``: a precompute trigger nobody waits on; new jobs go to a precompute queue and are marked
    so a chart open can move them ahead. ``trigger`` names a precompute trigger, whose
    requests are counted for /metrics. ``count_first_calls``: this is a chart open (patient-view), whose
    first call per record counts towards the zero-wait rate. ``on_request`` hears of each job asked for: its
    id, whether this call created it, and its record as returned.
    """

    def __init__(
        self,
        store: JobStore,
        messages: TaskMessages,
        settings: Settings,
        service_id: str,
        deadline: float,
        capacity: Capacity,
        on_lookup: Callable[[bool], None] = lambda hit: None,
        *,
        background: bool = False,
        trigger: str | None = None,
        count_first_calls: bool = False,
        on_request: Callable[[str, bool, JobRecord | None], None] | None = None,
    ) -> None:
        self._on_lookup = on_lookup
        self.capacity = capacity
        self.store = store
        self._messages = messages
        self._settings = settings
        self._service_id = service_id
        self.deadline = deadline
        self.background = background
        self.trigger = trigger
        self.count_first_calls = count_first_calls
        self._on_request = on_request

    def for_service(self, service_id: str) -> JobQueue:
        """Return this handle asking on behalf of ``service_id`` (same deadline, queue and counting)."""
        twin = copy.copy(self)
        twin._service_id = service_id
        return twin

    def request(
        self,
        task: ModelTask,
        role: ModelRole,
        system_prompt: str,
        user_prompt: str,
        *,
        evidence: list[str],
        input_hashes: list[str],
        images: list[ImageReference] | None = None,
    ) -> JobRecord | None:
        """Enqueue the job unless it exists, wait until done or the deadline; None without Redis.

        The wait holds no thread busy: it blocks on the job's done-channel (a gevent worker serves other
        requests meanwhile), and it is skipped when the queue ahead says the job can't finish in time.
        """
        settings = self._settings
        model, revision = (
            (settings.text_model, settings.text_model_revision)
            if role == "text"
            else (settings.image_model, settings.image_model_revision)
        )
        job = ModelJobRequest(
            service_id=self._service_id,
            task=task,
            role=role,
            model=model,
            revision=revision,
            system_prompt=system_prompt,
            user_prompt=user_prompt,
            images=images or [],
            evidence=evidence,
            input_hashes=input_hashes,
            max_new_tokens=settings.max_new_tokens,
        )
        job_id = job.job_id()
        queue = (PRECOMPUTE_QUEUES if self.background else QUEUES)[role]
        try:
            submitted = self.store.submit(
                job,
                job_id,
                self._messages.message(job_id, queue),
                queue,
                mode="background" if self.background else "interactive",
                first_call_service=self._service_id if self.count_first_calls else "",
                trigger=self.trigger or "",
            )
            record = submitted.record
            self._on_lookup(record is not None and record.state == "done")
            if record is not None and record.state in ("queued", "running"):
                if self.capacity.can_finish(role, model, self.deadline - time.monotonic()):
                    record = self._wait(job_id)
                    if submitted.first_call and record is not None and record.state == "done":
                        # Ready by the end of the first chart open's wait: it counts as zero-wait too.
                        self.store.redis.hincrby(ZERO_WAIT_KEY, f"{self._service_id}:ready", 1)
            if self._on_request is not None:
                self._on_request(job_id, submitted.created, record)
            # Imported here: job_progress reads this module's queues and keys.
            from cds_service.job_progress import with_progress

            # Where a waiting job stands (live workers, jobs ahead), for the card to say in words.
            return with_progress(record, self.store.redis, self.capacity, model)
        except Exception as exc:  # noqa: BLE001 - Redis or broker down: degrade to the rule cards
            log.warning("model job unavailable: %s", type(exc).__name__)
            return None

    def _wait(self, job_id: str) -> JobRecord | None:
        pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(done_channel(job_id))
            # Read again once subscribed: a job that ended in between would otherwise be waited out.
            current: JobRecord | None = self.store.get(job_id)
            while current is not None and current.state in ("queued", "running"):
                left = self.deadline - time.monotonic()
                if left <= 0:
                    break
                if pubsub.get_message(timeout=left) is not None:
                    current = self.store.get(job_id)
            return current
        finally:
            pubsub.close()

    def job_url(self, job_id: str) -> str:
        """Return the public URL of a job's status, signed so a clinician's browser can open it."""
        token = sign_link(self._settings, "job-status", job_id)
        return f"{self._settings.public_url.rstrip('/')}/jobs/{job_id}?access={token}"
