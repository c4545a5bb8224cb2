"""The one Celery task: thin. It re-reads the job by id, runs ``execute_job``, and stores the result once."""

from __future__ import annotations

import logging
import os
import socket

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from cds_service.image_reads import ImageReads
from cds_service.jobs import TASK_NAME
from cds_service.jobs import JobRequestUnreadable
from cds_service.jobs import JobStore
from cds_service.jobs import job_request_key
from cds_service.settings import Settings
from worker.images import ReadImage

log = logging.getLogger(__name__)
# A job that kills its worker every time (a poison input) is given up after this many deliveries.
MAX_ATTEMPTS = 3


def run_model_job(settings: Settings, store: JobStore, job_id: str) -> None:
    """Run one stored job unless it is finished or over its attempts; the result is written once."""
    try:
        request = store.request_of(job_id)
    except JobRequestUnreadable as problem:
        # Every retry would fail the same way: the job fails now, saying which setting differs.
        log.error("model job failed: %s", problem)
        store.finish(job_id, {"state": "failed", "error": str(problem)})
        return
    record = store.get(job_id)
    if request is None or record is None or record.state in ("done", "failed"):
        return
    from worker.celery_app import heartbeat_key

    attempts = store.start(job_id, worker=f"{socket.gethostname()}:{os.getpid()}", heartbeat=heartbeat_key())
    if attempts == 0:
        return  # the record went (Redis lost it): the next hook asks again
    if attempts > MAX_ATTEMPTS:
        store.finish(job_id, {"state": "failed", "error": f"gave up after {MAX_ATTEMPTS} attempts"})
        return
    from worker.execute import execute_job

    reads = ImageReads(store.redis, settings)

    def keep(image: ReadImage) -> None:
        # Stored before the result: a hook that sees the job done finds the picture the model read.
        reads.save(job_id, image.read, image.png)

    try:
        fields = execute_job(settings, request, keep)
    except SoftTimeLimitExceeded:
        fields = {"state": "failed", "error": "model task exceeded its time limit"}
    except Exception as exc:  # noqa: BLE001 - any failure is recorded on the job, which the hook then reports
        # The message may quote input data; the record keeps only the exception class.
        log.error("model job failed: %s", type(exc).__name__)
        fields = {"state": "failed", "error": f"model task failed ({type(exc).__name__})"}
    store.finish(job_id, fields, identity={"service_id": request.service_id, "task": request.task})
    log.info("model job finished", extra={"job": job_id[:12], "state": fields["state"], "attempt": attempts})


def register_tasks(app: Celery, settings: Settings) -> None:
    """Register the model task on ``app``; its Redis connection is opened once per worker process."""
    connection: dict[int, JobStore] = {}

    def job_store() -> JobStore:
        pid = os.getpid()
        if pid not in connection:
            connection[pid] = JobStore(
                redis.Redis.from_url(settings.redis_url),
                settings.result_ttl_s,
                request_key=job_request_key(settings),
            )
        return connection[pid]

    @app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def model_job(job_id: str) -> None:
        run_model_job(settings, job_store(), job_id)
