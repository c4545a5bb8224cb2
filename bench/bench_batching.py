"""Prints generated tokens per second of the tiny Gemma3 model: one request at a time, then in batches.

Run: ``.venv/bin/python bench/bench_batching.py [--device cpu] [--threads 1] [--max-new-tokens 128]``.
The same eight chart-summary requests run in every mode (greedy, so the same tokens come out); each figure is
the best of ``--repeats`` runs. A batch lasts as long as its longest answer, so rows that stop early lower
the batched figures. Random weights: the figures measure the runtime and batching, not MedGemma.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fhir_mappings.model_outputs import PatientSummaryOutput
from worker.batching import DynamicBatcher
from worker.runtime import GenerationRequest
from worker.runtime import GenerationResult
from worker.runtime import ModelRuntime
from worker.runtime import load_runtime
from worker.tiny_model import build_tiny_model

NOTES = [
    "Short note.",
    "Type 2 diabetes with chronic kidney disease stage 3, eGFR 42.",
    "Warfarin 5 mg daily; ibuprofen 400 mg three times daily drafted.",
    "Hypertension on lisinopril, potassium 5.3 and creatinine rising over two weeks.",
    "Penicillin allergy; amoxicillin drafted for a chest infection.",
    "Chest pain at rest, troponin pending, aspirin given.",
    "Follow-up of pneumonia after a course of antibiotics; repeat radiograph requested.",
    "Metformin 1000 mg twice daily and an SGLT2 inhibitor proposed.",
]


def _best_rate(run: Callable[[], list[GenerationResult]], repeats: int) -> tuple[float, int]:
    """Return the best tokens per second over ``repeats`` runs of ``run``, and the tokens per run."""
    best = 0.0
    tokens = 0
    for _ in range(repeats):
        started = time.perf_counter()
        results = run()
        seconds = time.perf_counter() - started
        tokens = sum(result.generated_tokens for result in results)
        best = max(best, tokens / seconds)
    return best, tokens


def _in_batches(
    runtime: ModelRuntime, requests: list[GenerationRequest], size: int
) -> list[GenerationResult]:
    """Return the results of ``requests`` run ``size`` at a time."""
    return [
        result
        for start in range(0, len(requests), size)
        for result in runtime.generate(requests[start : start + size])
    ]


def _through_batcher(runtime: ModelRuntime, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Return the results of ``requests`` submitted at once from one thread each to a DynamicBatcher."""
    batcher = DynamicBatcher(runtime, max_batch_size=len(requests), max_wait_ms=50)
    results: list[GenerationResult] = []
    lock = threading.Lock()

    def call(request: GenerationRequest) -> None:
        result = batcher.submit(request)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=call, args=(request,)) for request in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batcher.close()
    return results


def main() -> None:
    """Build the tiny model, run the eight requests each way, and print tokens per second and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    # On a shared 2-core host, two spinning intra-op threads made timings swing tenfold; one is steady.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        model_dir = build_tiny_model(Path(folder), seed=options.seed)
        runtime = load_runtime(str(model_dir), None, options.device, num_threads=options.threads or None)
    requests = [
        GenerationRequest(
            "You are a clinical decision support assistant. Answer in JSON only.",
            note,
            PatientSummaryOutput,
            max_new_tokens=options.max_new_tokens,
        )
        for note in NOTES
    ]
    runtime.generate(requests)  # warm-up: grammars compiled, allocator and kernels primed

    sequential, tokens = _best_rate(lambda: _in_batches(runtime, requests, 1), options.repeats)
    print(
        f"device {runtime.device}, torch threads {torch.get_num_threads()}, {len(requests)} requests, ",
        end="",
    )
    print(f"{tokens} generated tokens per run")
    print(f"sequential (batch 1): {sequential:8.1f} tokens/s")
    for size in (4, 8):
        rate, _ = _best_rate(lambda size=size: _in_batches(runtime, requests, size), options.repeats)
        print(f"batched (batch {size}):   {rate:8.1f} tokens/s   x{rate / sequential:.2f} vs sequential")
    rate, _ = _best_rate(lambda: _through_batcher(runtime, requests), options.repeats)
    print(f"DynamicBatcher, 8 threads: {rate:8.1f} tokens/s   x{rate / sequential:.2f} vs sequential")


if __name__ == "__main__":
    main()
