"""A model job end to end in one process, on the tiny checkpoint: budget, retry, job record and card."""

from __future__ import annotations

import base64
import io

import redis
from PIL import Image

from cds_service.jobs import FAILED_TTL_S
from cds_service.jobs import JobStore
from cds_service.jobs import job_request_key
from cds_service.settings import Settings
from cds_service.wire import Card
from cds_service.wire import ImageReference
from cds_service.wire import JobRecord
from cds_service.wire import ModelJobRequest
from fhir_mappings.ai_cards import summary_job_cards
from fhir_mappings.prompts import SYSTEM_PROMPT
from fhir_mappings.prompts import summary_prompt
from worker.execute import execute_job
from worker.images import read_image
from worker.tiny_model import gemma3_processor
from worker.tiny_model import gemma_tokenizer

RECORD = (
    '[Condition/c1] 2012-06-04 problem: "Hypertension"\n'
    '[Observation/o1] 2024-01-02 observation: "BP" = "150/95"'
)


def _request(settings: Settings, max_new_tokens: int) -> ModelJobRequest:
    return ModelJobRequest(
        service_id="patient-summary",
        task="patient-summary",
        role="text",
        model=settings.text_model,
        system_prompt=SYSTEM_PROMPT,
        user_prompt=summary_prompt(RECORD),
        evidence=["Condition/c1", "Observation/o1"],
        max_new_tokens=max_new_tokens,
    )


def _finished(
    settings: Settings, redis_client: redis.Redis, request: ModelJobRequest
) -> tuple[JobRecord, int]:
    """Run the job as the worker does and return its stored record and the record's time to live."""
    store = JobStore(redis_client, settings.result_ttl_s, request_key=job_request_key(settings))
    job_id, _ = store.create(request)
    store.start(job_id, "test")
    store.finish(job_id, execute_job(settings, request))
    record = store.get(job_id)
    assert record is not None
    return record, int(redis_client.ttl(store.key(job_id)))


def _cards(record: JobRecord) -> list[Card]:
    return summary_job_cards(
        record, ["Condition/c1", "Observation/o1"], None, lambda job: f"https://cds.test/{job}"
    )


def test_an_answer_cut_at_its_budget_is_rerun_with_a_larger_one(
    settings: Settings, redis_client: redis.Redis
) -> None:
    # The tiny model's summary takes ~400 tokens: 256 cuts it, the rerun's 512 holds it.
    record, _ = _finished(settings, redis_client, _request(settings, 256))

    assert record.state == "done", record.error
    assert record.generated_tokens is not None and 256 < record.generated_tokens <= 512
    # Random weights write every text to its limit: the record says which, and the card says so.
    assert record.truncated is not None and "summary" in record.truncated
    (card,) = _cards(record)
    assert card.summary == "AI pre-visit summary (draft, needs clinician review)"
    assert "**Text cut short:** summary" in (card.detail or "")


def test_an_answer_that_never_fits_fails_with_a_card_that_says_so(
    settings: Settings, redis_client: redis.Redis
) -> None:
    record, ttl = _finished(settings, redis_client, _request(settings, 16))

    assert record.state == "failed"
    assert record.error == "the answer did not fit its token budget (cut at 16 and 32 new tokens)"
    assert record.truncated == ["max_new_tokens"] and record.generated_tokens == 32
    # Greedy decoding would cut it the same way again: it is kept like a result, not retried in 5 minutes.
    assert ttl > FAILED_TTL_S
    (card,) = _cards(record)
    assert card.summary == "Pre-visit summary: AI analysis failed (answer cut short)"


def test_the_model_gets_the_decoded_image_and_its_processor_resizes_it(settings: Settings) -> None:
    wide = Image.new("RGB", (1200, 600), (200, 30, 30))
    wide.paste((20, 20, 220), (600, 0, 1200, 600))
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    reference = ImageReference(
        content_hash="wide",
        resource="Media/wide",
        content_type="image/png",
        data_b64=base64.b64encode(buffer.getvalue()).decode(),
    )

    read = read_image(settings, reference)

    # No black bars before the processor: it gets the whole picture, in its own aspect.
    assert read.image.size == (1200, 600)
    pixels = gemma3_processor(gemma_tokenizer()).image_processor(read.image, return_tensors="pt")[
        "pixel_values"
    ]
    assert tuple(pixels.shape) == (1, 3, 896, 896)
    # The processor stretches it to fill 896 x 896: no row or column is padding.
    assert float(pixels.min()) > -1.0
