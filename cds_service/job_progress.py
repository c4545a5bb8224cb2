"""Where a waiting model job stands, read live: live workers for its queue, jobs ahead of it, expected wait.

The card and the job's page both say it in words (``fhir_mappings.ai_cards.ai_state``); this module only
reads Redis. Nothing here is stored: a queue moves, so the answer is as of the read.
"""

from __future__ import annotations

import redis

from cds_service.jobs import MODEL_JOBS_KEY
from cds_service.jobs import MODEL_SECONDS_KEY
from cds_service.jobs import PRECOMPUTE_QUEUES
from cds_service.jobs import QUEUES
from cds_service.jobs import Capacity
from cds_service.wire import JobRecord
from cds_service.wire import ModelRole

#: Messages read from a queue to find a job; past this the job is "behind many", position unknown.
MAX_SCAN = 1000
SCAN_CHUNK = 100


def role_of(task: str) -> ModelRole:
    """Return the queue role of a model task: the image model reads images, the text model the rest."""
    return "image" if task == "imaging-read" else "text"


def jobs_ahead(client: redis.Redis, job_id: str, role: str) -> int | None:
    """Return how many messages a worker takes before this job's, or None when it is too far back to find.

    kombu's Redis transport pushes on the left and pops on the right, and workers empty the interactive queue
    before its precompute queue; a job not on either queue has been handed to a worker (0 ahead). Each queue
    is read from its newest end in chunks, so a job a hook has just asked for is found in the first read.
    """
    needle = job_id.encode()
    ahead_of_queue = 0
    for queue in (QUEUES[role], PRECOMPUTE_QUEUES[role]):
        length = int(client.llen(queue))
        for start in range(0, min(length, MAX_SCAN), SCAN_CHUNK):
            for offset, message in enumerate(client.lrange(queue, start, start + SCAN_CHUNK - 1)):
                if needle in message:
                    return ahead_of_queue + max(0, length - 1 - (start + offset))
        if length > MAX_SCAN:
            return None
        ahead_of_queue += length
    return 0


def mean_job_seconds(client: redis.Redis, model: str) -> float | None:
    """Return the mean seconds a job of ``model`` has taken, or None before the first one finished."""
    seconds, jobs = client.hmget(MODEL_SECONDS_KEY, model), client.hget(MODEL_JOBS_KEY, model)
    if not jobs or not seconds[0] or int(jobs) == 0:
        return None
    return float(seconds[0]) / int(jobs)


def with_progress(
    record: JobRecord | None, client: redis.Redis, capacity: Capacity, model: str
) -> JobRecord | None:
    """Return a waiting job's record with its live workers, jobs ahead and expected wait filled in.

    A finished (or missing) record is returned as it is. A Redis error leaves the record without progress:
    the card then says only that the job is queued or running.
    """
    if record is None or record.state not in ("queued", "running"):
        return record
    role = role_of(record.task)
    try:
        workers = capacity.workers().get(role, 0)
        if record.state == "running" or workers == 0:
            return record.model_copy(update={"workers": workers})
        ahead = jobs_ahead(client, record.id, role)
        mean = mean_job_seconds(client, model)
    except redis.RedisError:
        return record
    expected = None if ahead is None or mean is None else round((ahead // workers + 1) * mean, 1)
    return record.model_copy(update={"workers": workers, "ahead": ahead, "expected_wait_s": expected})
