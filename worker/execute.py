"""Runs a model job: the request's data in, fields of the finished job record out. No Celery here."""

from __future__ import annotations

import base64
import io
import threading
from typing import Any

from PIL import Image
from pydantic import BaseModel

from cds_service.settings import Settings
from cds_service.wire import ModelJobRequest
from fhir_mappings.model_outputs import ImagingReadOutput
from fhir_mappings.model_outputs import OrderReviewOutput
from fhir_mappings.model_outputs import PatientSummaryOutput
from worker.batching import DynamicBatcher
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


def decode_image(data_b64: str, max_pixels: int) -> Image.Image:
    """Return an RGB image from base64 PNG/JPEG bytes, refusing decompression bombs."""
    image = Image.open(io.BytesIO(base64.b64decode(data_b64, validate=True)))
    # Image.open reads only the header: the size is known before any pixel is decoded.
    if image.width * image.height > max_pixels:
        raise ValueError(f"image has {image.width * image.height} pixels, over the limit of {max_pixels}")
    return image.convert("RGB")


def execute_job(settings: Settings, request: ModelJobRequest) -> dict[str, Any]:
    """Return the job record fields for a finished job: done with result, or failed with the reason."""
    runtime, batcher = model_for(settings, request.model, request.revision)
    generation = GenerationRequest(
        system_prompt=request.system_prompt,
        user_text=request.user_prompt,
        output_schema=OUTPUT_SCHEMAS[request.task],
        images=[decode_image(b64, settings.max_image_pixels) for b64 in request.images_b64],
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
