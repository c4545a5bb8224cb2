"""Dynamic batching on the real tiny-model runtime: concurrent callers share generate calls, get their own."""

from __future__ import annotations

import threading
from collections.abc import Callable
from collections.abc import Iterator

import pytest
from PIL import Image

from fhir_mappings.model_outputs import ImagingReadOutput
from fhir_mappings.model_outputs import OrderReviewOutput
from fhir_mappings.model_outputs import PatientSummaryOutput
from worker.batching import DynamicBatcher
from worker.runtime import GenerationRequest
from worker.runtime import GenerationResult
from worker.runtime import ModelRuntime

SYSTEM = "You are a clinical decision support assistant. Answer in JSON only."
NOTES = [
    "Short note.",
    "Type 2 diabetes with chronic kidney disease stage 3.",
    "Warfarin 5 mg daily; ibuprofen 400 mg three times daily drafted.",
    "Hypertension on lisinopril, potassium 5.3, creatinine rising over two weeks of follow-up.",
    "Penicillin allergy; amoxicillin drafted.",
    "Chest pain at rest, troponin pending.",
]


def _requests(count: int) -> list[GenerationRequest]:
    schemas = [PatientSummaryOutput, OrderReviewOutput]
    return [
        GenerationRequest(SYSTEM, NOTES[i % len(NOTES)], schemas[i % 2], max_new_tokens=48)
        for i in range(count)
    ]


def _submit_together(
    batcher: DynamicBatcher, requests: list[GenerationRequest]
) -> list[GenerationResult | Exception]:
    """Return each request's outcome, the requests submitted from one thread each, released at once."""
    outcomes: list[GenerationResult | Exception | None] = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def call(index: int) -> None:
        start.wait()
        try:
            outcomes[index] = batcher.submit(requests[index])
        except Exception as failure:
            outcomes[index] = failure

    threads = [threading.Thread(target=call, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(outcome is not None for outcome in outcomes)
    return [outcome for outcome in outcomes if outcome is not None]


@pytest.fixture
def make_batcher() -> Iterator[Callable[[ModelRuntime, int, int], DynamicBatcher]]:
    """Yield a factory of batchers, all closed after the test."""
    batchers: list[DynamicBatcher] = []

    def make(runtime: ModelRuntime, max_batch_size: int, max_wait_ms: int) -> DynamicBatcher:
        batchers.append(DynamicBatcher(runtime, max_batch_size, max_wait_ms))
        return batchers[-1]

    yield make
    for batcher in batchers:
        batcher.close()


def test_concurrent_submissions_share_generate_calls(
    runtime: ModelRuntime, make_batcher: Callable[..., DynamicBatcher]
) -> None:
    requests = _requests(6)
    alone = [runtime.generate([request])[0] for request in requests]
    batcher = make_batcher(runtime, 8, 500)

    outcomes = _submit_together(batcher, requests)

    results = [outcome for outcome in outcomes if isinstance(outcome, GenerationResult)]
    assert len(results) == len(requests)
    assert round(sum(1 / result.batch_size for result in results)) <= 2
    # Every caller gets the answer to its own request, the same as when it runs alone.
    assert [result.text for result in results] == [result.text for result in alone]


def test_batches_never_exceed_max_batch_size(
    runtime: ModelRuntime, make_batcher: Callable[..., DynamicBatcher]
) -> None:
    batcher = make_batcher(runtime, 2, 500)

    results = _submit_together(batcher, _requests(5))

    sizes = [result.batch_size for result in results if isinstance(result, GenerationResult)]
    assert len(sizes) == 5 and max(sizes) <= 2
    assert round(sum(1 / size for size in sizes)) >= 3


def test_no_wait_still_serves_a_single_request(
    runtime: ModelRuntime, make_batcher: Callable[..., DynamicBatcher]
) -> None:
    batcher = make_batcher(runtime, 4, 0)

    result = batcher.submit(_requests(1)[0])

    assert result.batch_size == 1 and result.generated_tokens > 0


def test_a_failing_request_does_not_fail_its_batch(
    text_only_runtime: ModelRuntime, chest_xray: Image.Image, make_batcher: Callable[..., DynamicBatcher]
) -> None:
    batcher = make_batcher(text_only_runtime, 8, 500)
    image_request = GenerationRequest(SYSTEM, "Read this.", ImagingReadOutput, images=[chest_xray])

    outcomes = _submit_together(batcher, [*_requests(2), image_request])

    assert isinstance(outcomes[2], ValueError)
    assert all(isinstance(outcome, GenerationResult) for outcome in outcomes[:2])


def test_a_closed_batcher_refuses_requests(runtime: ModelRuntime) -> None:
    batcher = DynamicBatcher(runtime, 4, 10)
    batcher.close()
    batcher.close()

    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(_requests(1)[0])


@pytest.mark.parametrize(("max_batch_size", "max_wait_ms"), [(0, 10), (4, -1)])
def test_batcher_rejects_bad_limits(runtime: ModelRuntime, max_batch_size: int, max_wait_ms: int) -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(runtime, max_batch_size, max_wait_ms)
