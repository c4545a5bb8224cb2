"""Runs a model job: the request's data in, fields of the finished job record out. No Celery here."""

from __future__ import annotations

import threading
from collections.abc import Callable
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

_loaded: dict[tuple[str, str | None], tuple[ModelRuntime, DynamicBatcher]] = {}
_loaded_lock = threading.Lock()


def model_for(settings: Settings, model: str, revision: str | None) -> tuple[ModelRuntime, DynamicBatcher]:
    """Return this process's runtime and batcher for a configured model, loading the model on first use.

    Loading happens here, lazily on the first task, never in ``worker_process_init`` (Celery kills a handler
    that blocks over 4 s) and never per task.
    """
    configured = {
        (settings.text_model, settings.text_model_revision),
        (settings.image_model, settings.image_model_revision),
    }
    if (model, revision) not in configured:
        # A message may only name a model this worker was configured with, never make it load another.
        raise ValueError("the job names a model this worker is not configured for")
    with _loaded_lock:
        if (model, revision) not in _loaded:
            token = settings.hf_token.get_secret_value() if settings.hf_token else None
            runtime = load_runtime(model, revision, settings.device, hf_token=token)
            batcher = DynamicBatcher(runtime, settings.max_batch_size, settings.batch_wait_ms)
            _loaded[(model, revision)] = (runtime, batcher)
        return _loaded[(model, revision)]


def execute_job(
    settings: Settings, request: ModelJobRequest, on_read: Callable[[ReadImage], None] = lambda read: None
) -> dict[str, Any]:
    """Return the job record fields for a finished job: done with result, or failed with the reason.

    Images are fetched and decoded first, before any model is loaded; ``on_read`` hears of each one. An
    image that can't be read fails the job with ``IMAGE_NOT_READ`` and the reason, which the hook shows.
    """
    try:
        images = [read_image(settings, reference) for reference in request.images]
    except ImageRejected as rejected:
        return {"state": "failed", "error": f"{IMAGE_NOT_READ}{rejected}"}
    for image in images:
        on_read(image)
    runtime, batcher = model_for(settings, request.model, request.revision)
    generation = GenerationRequest(
        system_prompt=request.system_prompt,
        user_text=request.user_prompt,
        output_schema=OUTPUT_SCHEMAS[request.task],
        images=[image.image for image in images],
        max_new_tokens=request.max_new_tokens,
    )
    result = batcher.submit(generation)
    fields: dict[str, Any] = {
        "model": runtime.model_id,
        "model_version": runtime.model_version,
        "generated_tokens": result.generated_tokens,
        "seconds": round(result.seconds, 4),
    }
    if result.output is None:
        return fields | {"state": "failed", "error": result.error or "no output"}
    return fields | {"state": "done", "result": result.output.model_dump_json()}
