"""Model jobs as the API sees them: idempotent ids, a Redis job record, enqueue once, wait within the budget.

A job's id hashes everything its result depends on, so the same unchanged record never enqueues twice and a
finished result is one Redis read away. Redis may lose everything: a lost record is simply recomputed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC
from datetime import datetime
from typing import Any

import redis

from cds_service.settings import Settings
from cds_service.signed_links import sign_link
from cds_service.wire import JobRecord
from cds_service.wire import ModelJobRequest
from cds_service.wire import ModelRole
from cds_service.wire import ModelTask

log = logging.getLogger(__name__)

TASK_NAME = "medgemma_cds.run_model_job"
QUEUES: dict[str, str] = {"text": "medgemma-text", "image": "medgemma-image"}
# A failed job is kept briefly so a burst of hooks doesn't hammer a broken input, then retried.
FAILED_TTL_S = 300
#: Redis hashes (field: model id) added to once per finished job; /metrics reads model tokens/s from them,
#: and hooks the mean seconds a job takes (seconds / jobs) to judge whether waiting can pay off.
MODEL_TOKENS_KEY = "mgcds:metrics:generated-tokens"
MODEL_SECONDS_KEY = "mgcds:metrics:generation-seconds"
MODEL_JOBS_KEY = "mgcds:metrics:finished-jobs"
#: How long a process trusts what it last read of the workers and the queues.
CAPACITY_TTL_S = 1.0
# Workers refresh a key per process every HEARTBEAT_S; one that stops for HEARTBEAT_TTL_S counts as gone.
HEARTBEAT_PREFIX = "mgcds:worker:"
HEARTBEAT_S = 10
HEARTBEAT_TTL_S = 30


def live_workers(redis_client: redis.Redis) -> dict[str, int]:
    """Return how many worker processes sent a heartbeat recently, per queue role (text, image)."""
    counts = dict.fromkeys(QUEUES, 0)
    for key in redis_client.scan_iter(match=HEARTBEAT_PREFIX + "*", count=200):
        role = key.decode().removeprefix(HEARTBEAT_PREFIX).split(":", 1)[0]
        if role in counts:
            counts[role] += 1
    return counts


def done_channel(job_id: str) -> str:
    """Return the Redis pub/sub channel a job's end is announced on (its final state is the message)."""
    return f"mgcds:job-done:{job_id}"


def now_iso() -> str:
    """Return the current UTC time as ISO-8601."""
    return datetime.now(UTC).isoformat()


class JobStore:
    """Job records in Redis: ``mgcds:job:{id}`` hashes that expire, written by the API and the workers."""

    # Create-if-absent in one round trip: the record's fields and expiry are set only by the call that
    # created it, so a concurrent hook for the same record finds it whole or not at all.
    _CREATE = """
    if redis.call('HSETNX', KEYS[1], 'state', 'queued') == 0 then return 0 end
    redis.call('HSET', KEYS[1], 'service_id', ARGV[1], 'task', ARGV[2], 'created_at', ARGV[3],
               'attempts', 0, 'request', ARGV[4])
    redis.call('EXPIRE', KEYS[1], ARGV[5])
    return 1
    """

    def __init__(self, redis_client: redis.Redis, ttl_s: int) -> None:
        self.redis = redis_client
        self.ttl_s = ttl_s
        self._create = redis_client.register_script(self._CREATE)

    @staticmethod
    def key(job_id: str) -> str:
        """Return the Redis key of a job."""
        return f"mgcds:job:{job_id}"

    def create(self, request: ModelJobRequest) -> tuple[str, JobRecord | None]:
        """Create the record unless one exists; return the id and, when this call created it, its record."""
        job_id = request.job_id()
        created_at = datetime.now(UTC)
        created = self._create(
            keys=[self.key(job_id)],
            args=[
                request.service_id,
                request.task,
                created_at.isoformat(),
                request.model_dump_json(),
                self.ttl_s,
            ],
        )
        if not created:
            return job_id, None
        record = JobRecord(
            id=job_id, service_id=request.service_id, task=request.task, state="queued", created_at=created_at
        )
        return job_id, record

    def request_of(self, job_id: str) -> ModelJobRequest | None:
        """Return the stored request of a job, or None when the record is gone."""
        raw = self.redis.hget(self.key(job_id), "request")
        return ModelJobRequest.model_validate_json(raw) if raw else None

    def get(self, job_id: str) -> JobRecord | None:
        """Return the job's record, or None."""
        fields = {k.decode(): v.decode() for k, v in self.redis.hgetall(self.key(job_id)).items()}
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
        )

    def start(self, job_id: str, worker: str) -> int:
        """Mark a job running on ``worker``; return the attempt number (redeliveries count up)."""
        key = self.key(job_id)
        attempts = int(self.redis.hincrby(key, "attempts", 1))
        self.redis.hset(key, mapping={"state": "running", "started_at": now_iso(), "worker": worker})
        return attempts

    def finish(self, job_id: str, fields: dict[str, Any]) -> bool:
        """Store a result once: a redelivered task that finishes again leaves the first result in place."""
        key = self.key(job_id)
        # WATCH/MULTI makes "not done yet → write result" atomic against a concurrent redelivery.
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    if pipe.hget(key, "state") in (b"done", b"failed"):
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.hset(key, mapping={**fields, "finished_at": now_iso()})
                    pipe.expire(key, self.ttl_s if fields["state"] == "done" else FAILED_TTL_S)
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
        seconds, jobs = self.redis.hmget(MODEL_SECONDS_KEY, model), self.redis.hget(MODEL_JOBS_KEY, model)
        if not jobs or not seconds[0]:
            return True
        mean = float(seconds[0]) / max(int(jobs), 1)
        waiting = int(self.redis.llen(QUEUES[role]))
        return (waiting // workers + 1) * mean <= seconds_left


class JobQueue:
    """The handle a hook handler gets (``wire.ModelJobs``): model work that never waits past the deadline."""

    def __init__(
        self,
        store: JobStore,
        send: Callable[[str, str], None],
        settings: Settings,
        service_id: str,
        deadline: float,
        capacity: Capacity,
        on_lookup: Callable[[bool], None] = lambda hit: None,
    ) -> None:
        self._on_lookup = on_lookup
        self.capacity = capacity
        self.store = store
        self._send = send
        self._settings = settings
        self._service_id = service_id
        self.deadline = deadline

    def request(
        self,
        task: ModelTask,
        role: ModelRole,
        system_prompt: str,
        user_prompt: str,
        *,
        evidence: list[str],
        input_hashes: list[str],
        images_b64: list[str] | None = None,
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
            images_b64=images_b64 or [],
            evidence=evidence,
            input_hashes=input_hashes,
            max_new_tokens=settings.max_new_tokens,
        )
        try:
            job_id, created = self.store.create(job)
            if created is not None:
                self._send(job_id, role)
            record = created or self.store.get(job_id)
            self._on_lookup(record is not None and record.state == "done")
            if record is None or record.state not in ("queued", "running"):
                return record
            if not self.capacity.can_finish(role, model, self.deadline - time.monotonic()):
                return record
            return self._wait(job_id)
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
