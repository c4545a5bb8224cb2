"""Runs a model job: the request's data in, fields of the finished job record out. No Celery here."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pydantic import BaseModel

from cds_service.settings import Settings
from cds_service.wire import ModelJobRequest
from fhir_mappings.images import IMAGE_NOT_READ
from fhir_mappings.images import ImageRejected
from fhir_mappings.model_outputs import ImagingReadOutput
from fhir_mappings.model_outputs import OrderReviewOutput
from fhir_mappings.model_outputs import PatientSummaryOutput
from worker.batching import DynamicBatcher
from worker.images import ReadImage
from worker.images import read_image
from worker.runtime import GenerationRequest
from worker.runtime import ModelRuntime
from worker.runtime import load_runtime

OUTPUT_SCHEMAS: dict[str, type[BaseModel]] = {
    "patient-summary": PatientSummaryOutput,
    "imaging-read": ImagingReadOutput,
    "order-review": OrderReviewOutput,
}

#: A job whose output reaches its token budget runs once more with this many times the budget (up to the
#: request's limit): greedy decoding would otherwise cut it at the same place again.
RETRY_BUDGET_FACTOR = 2
MAX_NEW_TOKENS_LIMIT = 8192

_loaded: dict[tuple[str, str | None, str], tuple[ModelRuntime, DynamicBatcher]] = {}
_loaded_lock = threading.Lock()


def model_for(settings: Settings, request: ModelJobRequest) -> tuple[ModelRuntime, DynamicBatcher]:
    """Return this process's runtime and batcher for the request's model, loading it on first use on the
    device its role is placed on (``TEXT_DEVICE`` / ``IMAGE_DEVICE``, else ``DEVICE``).

    Loading happens here, lazily on the first task, never in ``worker_process_init`` (Celery kills a handler
    that blocks over 4 s) and never per task.
    """
    model, revision, device = settings.model_of(request.role)
    if (request.model, request.revision) != (model, revision):
        # A message may only name a model this worker was configured with, never make it load another.
        raise ValueError("the job names a model this worker is not configured for")
    with _loaded_lock:
        if (model, revision, device) not in _loaded:
            token = settings.hf_token.get_secret_value() if settings.hf_token else None
            runtime = load_runtime(model, revision, device, hf_token=token)
            batcher = DynamicBatcher(runtime, settings.max_batch_size, settings.batch_wait_ms)
            _loaded[(model, revision, device)] = (runtime, batcher)
        return _loaded[(model, revision, device)]


def execute_job(
    settings: Settings, request: ModelJobRequest, on_read: Callable[[ReadImage], None] = lambda read: None
) -> dict[str, Any]:
    """Return the job record fields for a finished job: done with result, or failed with the reason.

    Images are fetched and decoded first, before any model is loaded; ``on_read`` hears of each one. An
    image that can't be read fails the job with ``IMAGE_NOT_READ`` and the reason, which the hook shows.
    An output cut at its token budget is run again with a larger budget; one still cut fails, marked
    ``truncated``. A done result lists the free-text fields that fill their length limit in ``truncated``.
    """
    try:
        images = [read_image(settings, reference) for reference in request.images]
    except ImageRejected as rejected:
        return {"state": "failed", "error": f"{IMAGE_NOT_READ}{rejected}"}
    for image in images:
        on_read(image)
    runtime, batcher = model_for(settings, request)
    generation = GenerationRequest(
        system_prompt=request.system_prompt,
        user_text=request.user_prompt,
        output_schema=OUTPUT_SCHEMAS[request.task],
        images=[image.image for image in images],
        max_new_tokens=request.max_new_tokens,
    )
    result = batcher.submit(generation)
    budgets = [generation.max_new_tokens]
    if result.cut and generation.max_new_tokens < MAX_NEW_TOKENS_LIMIT:
        larger = min(generation.max_new_tokens * RETRY_BUDGET_FACTOR, MAX_NEW_TOKENS_LIMIT)
        retried = batcher.submit(replace(generation, max_new_tokens=larger))
        budgets.append(larger)
        result = replace(retried, seconds=result.seconds + retried.seconds)
    fields: dict[str, Any] = {
        "model": runtime.model_id,
        "model_version": runtime.model_version,
        "generated_tokens": result.generated_tokens,
        "seconds": round(result.seconds, 4),
    }
    if result.cut:
        tried = " and ".join(str(budget) for budget in budgets)
        return fields | {
            "state": "failed",
            "error": f"the answer did not fit its token budget (cut at {tried} new tokens)",
            "truncated": json.dumps(["max_new_tokens"]),
        }
    if result.output is None:
        return fields | {"state": "failed", "error": result.error or "no output"}
    done = fields | {"state": "done", "result": result.output.model_dump_json()}
    return done | ({"truncated": json.dumps(list(result.capped))} if result.capped else {})
