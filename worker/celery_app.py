"""The Celery app of the model workers, built from ``Settings`` (never at import time).

Redis is broker and result backend. Two queues, so text and image models can run on different GPUs, each with
a lower-priority twin for precomputed work that the same workers serve once the interactive queue is empty.
Importing this module never imports torch: the API process builds the same app only to send tasks.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

import redis
from celery import Celery
from kombu import Queue

from cds_service.jobs import HEARTBEAT_PREFIX
from cds_service.jobs import HEARTBEAT_S
from cds_service.jobs import HEARTBEAT_TTL_S
from cds_service.jobs import PRECOMPUTE_QUEUES
from cds_service.jobs import QUEUES
from cds_service.settings import Settings
from cds_service.settings import key_fingerprint

log = logging.getLogger(__name__)
#: ``{prefix}{queue}:{host}:{pid}``: which model a live worker runs on which device, kept with its heartbeat.
PLACEMENT_PREFIX = "mgcds:worker-placement:"


def make_celery(settings: Settings) -> Celery:
    """Return a Celery app configured for the model queues, with the model task registered."""
    app = Celery("medgemma_cds", broker=settings.redis_url, backend=settings.redis_url, set_as_current=False)
    app.conf.update(
        # JSON only: a pickle message from anyone who can write to Redis would be code execution.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Late ack + reject on a lost worker: a task killed mid-run is redelivered; it is idempotent.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        result_expires=settings.result_ttl_s,
        # A message unacked past the visibility timeout is redelivered, so it must outlast the hard limit.
        broker_transport_options={
            "visibility_timeout": settings.task_time_limit_s + 60,
            # One BRPOP over a worker's queues in name order: interactive work first, then precompute
            # (kombu's default, round_robin, would let tomorrow's sweep delay a chart opened now).
            "queue_order_strategy": "sorted",
        },
        broker_connection_retry_on_startup=True,
        # The API sends from inside a hook: it must fail fast rather than retry a dead broker.
        task_publish_retry=False,
        broker_connection_timeout=1,
        task_queues=[Queue(name) for name in [*QUEUES.values(), *PRECOMPUTE_QUEUES.values()]],
        task_default_queue=QUEUES["text"],
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        # A "task-sent" event is a second publish on every hook's enqueue, and nothing here consumes it.
        task_send_sent_event=False,
    )
    from worker.tasks import register_tasks

    register_tasks(app, settings)
    return app


_heartbeat_key: str | None = None


def heartbeat_key() -> str | None:
    """Return the key of this worker's heartbeat (None outside a worker): a job it runs names it, so a
    hook can tell when the worker holding the job died."""
    return _heartbeat_key


def start_heartbeat(settings: Settings, queue: str, placement: str = "") -> Callable[[], None]:
    """Start a daemon thread that tells the API (``readyz``, the AI states) this worker is alive for
    ``queue``; return what ends it at a clean stop, so hooks say "unavailable" at once, not after the TTL.
    ``placement`` (which model on which device) is kept beside it, for ``check --worker``."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    key = f"{HEARTBEAT_PREFIX}{queue}:{socket.gethostname()}:{os.getpid()}"
    placement_key = f"{PLACEMENT_PREFIX}{queue}:{socket.gethostname()}:{os.getpid()}"
    # The value is the secret's fingerprint: readyz and `check` tell a worker that can't read the API's jobs.
    fingerprint = key_fingerprint(settings)

    stopped = threading.Event()
    global _heartbeat_key
    _heartbeat_key = key  # prefork children inherit it: the jobs they run name this process's heartbeat

    def beat() -> None:
        while not stopped.is_set():
            try:
                client.set(key, fingerprint, ex=HEARTBEAT_TTL_S)
                if placement:
                    client.set(placement_key, placement, ex=HEARTBEAT_TTL_S)
            except redis.RedisError:
                pass  # Redis is down: the key expires and readyz reports the worker missing, as it should.
            stopped.wait(HEARTBEAT_S)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)

    def stop() -> None:
        stopped.set()
        thread.join(timeout=5)  # its last beat, if one is under way, lands before the key goes
        try:
            client.delete(key, placement_key)
        except redis.RedisError:
            pass  # the key expires by itself

    thread.start()
    return stop


def local_placements(settings: Settings) -> list[str]:
    """Return one line per live worker on this host: its queue, process and which model is on which device."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    lines = []
    try:
        for key in sorted(client.scan_iter(match=f"{PLACEMENT_PREFIX}*", count=200)):
            queue, host, pid = key.decode().removeprefix(PLACEMENT_PREFIX).split(":", 2)
            value = client.get(key)
            if host == socket.gethostname() and value is not None:
                lines.append(f"{queue} worker (pid {pid}): {value.decode()}")
    finally:
        client.close()
    return lines


def worker_queues(role: str) -> list[str]:
    """Return the queues a worker of ``role`` consumes, in the order it serves them: interactive first."""
    # The transport serves them in sorted name order, which the names are chosen to make this order.
    return [QUEUES[role], PRECOMPUTE_QUEUES[role]]


def run_worker(settings: Settings, *, queue: str, concurrency: int, pool: str) -> int:
    """Run a worker consuming one model role's queues (interactive, then precompute) until it is stopped."""
    # One torch thread per prefork child: N children each spawning all-core thread pools thrash the CPU.
    if pool == "prefork":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    from worker.runtime import plan_placement_apart

    # Before any task: a model that can't fit its device stops the worker now, with what to change.
    model, revision, device = settings.model_of(queue)
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    placement = plan_placement_apart(model, revision, device, token)
    placement.check()
    log.info("model placement: %s", placement.describe())
    app = make_celery(settings)
    stop_heartbeat = start_heartbeat(settings, queue, placement.describe())
    argv = [
        "worker",
        f"--queues={','.join(worker_queues(queue))}",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--hostname={queue}@%h-{os.getpid()}",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
    ]
    try:
        app.worker_main(argv)
    finally:
        stop_heartbeat()
    return 0
