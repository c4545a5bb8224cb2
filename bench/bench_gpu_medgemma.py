"""Decode throughput of the service's model path on one GPU, for MedGemma 4B (image) and 27B (text) shapes.

What runs is what a worker runs: ``ModelRuntime.generate`` with llguidance-constrained JSON, the chat template
through the processor, left-padded batches. The 4B reads the sample chest X-ray through its vision tower under
the imaging prompt; the 27B gets the pre-visit summary prompt of the two sample Synthea charts (alternating,
so rows differ in length as they do in service). Weights are random bf16 in each model's published shape
(nothing is downloaded); the tokenizer has Gemma's size (262,145 entries, the image token last, 262,208
logits), so the constraint's token masks cost what they cost with the real one. Random weights write every
string to its limit, so rows run to ``--new-tokens`` as a long answer would.

For each model and batch size B, two generate calls on the same requests:

- ``prefill_s``: ``max_new_tokens=1`` (vision tower, prompt, first token);
- ``run_s``: ``max_new_tokens=N``;
- ``decode_s = run_s - prefill_s`` covers the remaining steps, and ``decode tokens`` the tokens after each
  row's first. A run whose prefill takes as long as the whole run has no decode time to measure: it is
  reported as rejected, never as a rate.

Roofline: a decode step reads every decoder weight once (the tied output embedding included, the vision tower
not) and each row's KV cache (sliding-window layers at most their window), so a step takes at least
``step bytes / bandwidth``, and B rows give at most ``B * bandwidth / step bytes`` tokens/s. Bandwidth is
measured with a device copy. Decode tokens/s are printed as a fraction of that bound.

GPU (well inside 10 minutes on an H100/H200): ``python bench/bench_gpu_medgemma.py``
CPU smoke (tiny checkpoints, checks its own arithmetic, run by the tests): ``... --smoke``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForCausalLM
from transformers import AutoModelForImageTextToText
from transformers import Gemma3Config
from transformers import Gemma3TextConfig

from fhir_mappings.model_outputs import ImagingReadOutput
from fhir_mappings.model_outputs import PatientSummaryOutput
from fhir_mappings.prompts import SYSTEM_PROMPT
from fhir_mappings.prompts import imaging_prompt
from fhir_mappings.prompts import imaging_system_prompt
from fhir_mappings.prompts import summary_prompt
from fhir_mappings.read_models import read_resource
from fhir_mappings.record_context import record_context
from worker.runtime import GenerationRequest
from worker.runtime import ModelRuntime
from worker.runtime import load_runtime
from worker.tiny_model import GEMMA3_CHAT_TEMPLATE
from worker.tiny_model import build_tiny_model
from worker.tiny_model import gemma3_processor
from worker.tiny_model import gemma_tokenizer
from worker.tiny_model import medgemma_generation_config

SAMPLES = Path(__file__).resolve().parents[1] / "cds_service" / "data" / "sample"
CHEST_XRAY = SAMPLES / "cxr-00000001_000.png"
#: What the patient-summary hook gives the record (hooks/patient_summary.py CONTEXT_TOKENS).
SUMMARY_CONTEXT_TOKENS = 1500
GEMMA_TOKENIZER_SIZE = 262_145

# google/medgemma-4b-it config.json (the shape of gemma-3-4b-it): the text decoder and the SigLIP tower.
MEDGEMMA_4B_TEXT = {
    "vocab_size": 262_208,
    "hidden_size": 2560,
    "intermediate_size": 10_240,
    "num_hidden_layers": 34,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 1024,
    "max_position_embeddings": 131_072,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
}
MEDGEMMA_4B_VISION = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 896,
    "patch_size": 14,
    "vision_use_head": False,
}
# google/medgemma-27b-text-it config.json (the text shape of gemma-3-27b-it).
MEDGEMMA_27B_TEXT = {
    "vocab_size": 262_208,
    "hidden_size": 5376,
    "intermediate_size": 21_504,
    "num_hidden_layers": 62,
    "num_attention_heads": 32,
    "num_key_value_heads": 16,
    "head_dim": 128,
    "query_pre_attn_scalar": 168,
    "sliding_window": 1024,
    "max_position_embeddings": 131_072,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
}


@dataclass(frozen=True)
class Measurement:
    """One batch size's two timed calls and what the roofline needs; every figure printed derives from it."""

    batch: int
    new_tokens: int
    prompt_tokens: list[int]
    prefill_s: float
    run_s: float
    generated: list[int]
    weight_bytes: int
    kv_bytes_per_step: int
    bandwidth: float

    @property
    def decode_s(self) -> float:
        """Return the seconds of the steps after the first token."""
        return self.run_s - self.prefill_s

    @property
    def steps(self) -> int:
        """Return the decode steps the batch ran: its longest row's tokens after the first."""
        return max(self.generated) - 1

    @property
    def decode_tokens(self) -> int:
        """Return the tokens the rows generated after their first (the first belongs to prefill)."""
        return sum(max(tokens - 1, 0) for tokens in self.generated)

    @property
    def rejected(self) -> str | None:
        """Return why the run can't give a decode rate, or None when it can."""
        if self.steps < 1:
            return "no decode step (every row stopped at its first token)"
        if self.decode_s <= 0:
            return f"prefill ({self.prefill_s:.3f} s) outlasted the whole run ({self.run_s:.3f} s)"
        return None

    @property
    def tokens_per_s(self) -> float:
        """Return decode tokens per second of the batch."""
        return self.decode_tokens / self.decode_s

    @property
    def step_bytes(self) -> int:
        """Return the bytes one decode step reads at least: the decoder weights and the batch's KV cache."""
        return self.weight_bytes + self.kv_bytes_per_step

    @property
    def roofline_tokens_per_s(self) -> float:
        """Return the bandwidth bound: B tokens per step, a step no faster than reading its bytes."""
        return self.batch * self.bandwidth / self.step_bytes

    @property
    def roofline_fraction(self) -> float:
        """Return decode tokens/s as a fraction of the roofline."""
        return self.tokens_per_s / self.roofline_tokens_per_s

    def check(self) -> None:
        """Raise AssertionError when the figures disagree with the raw measurement they derive from."""
        assert len(self.generated) == len(self.prompt_tokens) == self.batch
        assert all(1 <= tokens <= self.new_tokens for tokens in self.generated), self.generated
        assert math.isclose(self.prefill_s + self.decode_s, self.run_s)
        if self.rejected is not None:
            return
        assert 0 < self.decode_tokens <= self.batch * self.steps
        assert math.isclose(self.tokens_per_s * self.decode_s, self.decode_tokens)
        assert math.isclose(self.roofline_fraction * self.roofline_tokens_per_s, self.tokens_per_s)
        assert math.isclose(self.roofline_tokens_per_s * self.step_bytes, self.batch * self.bandwidth)


def hbm_bandwidth(device: torch.device, gigabytes: float) -> float:
    """Return measured device memory bandwidth in bytes/s (a copy reads and writes every byte)."""
    source = torch.empty(int(gigabytes * 2**30), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    started = time.perf_counter()
    repeats = 10
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    return 2 * source.numel() * repeats / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decoder_bytes(runtime: ModelRuntime) -> int:
    """Return the bytes of the weights a decode step reads: the language model (tied output layer once)."""
    model = runtime.model
    decoder = model.model.language_model if runtime.accepts_images else model
    weights = {id(p): p for p in (*decoder.parameters(), *model.get_output_embeddings().parameters())}
    return sum(p.numel() * p.element_size() for p in weights.values())


def kv_bytes_per_step(runtime: ModelRuntime, prompt_tokens: list[int], new_tokens: int) -> int:
    """Return the KV cache bytes a decode step reads, at the run's mean context length, for every row."""
    config = runtime.model.config.get_text_config()
    per_layer_token = 2 * config.num_key_value_heads * config.head_dim * runtime.dtype.itemsize
    # Left padding: every row's cache spans the longest prompt.
    context = max(prompt_tokens) + new_tokens // 2
    spans = [
        min(context, config.sliding_window) if kind == "sliding_attention" else context
        for kind in config.layer_types
    ]
    return len(prompt_tokens) * sum(spans) * per_layer_token


def sample_requests(kind: str, batch: int, new_tokens: int) -> list[GenerationRequest]:
    """Return ``batch`` requests as the service sends them: an imaging read of the sample chest X-ray, or
    the pre-visit summary of the sample charts."""
    if kind == "image":
        with Image.open(CHEST_XRAY) as image:
            xray = image.convert("RGB")
        request = GenerationRequest(
            system_prompt=imaging_system_prompt("DX"),
            user_text=imaging_prompt("Digital Radiography Chest study", "DX"),
            output_schema=ImagingReadOutput,
            images=[xray],
            max_new_tokens=new_tokens,
        )
        return [request] * batch
    prompts = [summary_prompt(chart_record(path)) for path in sorted(SAMPLES.glob("*.json"))]
    return [
        GenerationRequest(
            SYSTEM_PROMPT, prompts[row % len(prompts)], PatientSummaryOutput, max_new_tokens=new_tokens
        )
        for row in range(batch)
    ]


def chart_record(path: Path) -> str:
    """Return the record context the patient-summary hook builds for one sample chart."""
    bundle = json.loads(path.read_text())
    resources = [entry["resource"] for entry in bundle["entry"]]

    def searchset(kind: str) -> Any:
        entries = [{"resource": r} for r in resources if r["resourceType"] == kind]
        return read_resource({"resourceType": "Bundle", "type": "searchset", "entry": entries})

    patient = read_resource(next(r for r in resources if r["resourceType"] == "Patient"))
    return record_context(
        patient,
        searchset("Condition"),
        searchset("MedicationRequest"),
        searchset("AllergyIntolerance"),
        searchset("Observation"),
        token_budget=SUMMARY_CONTEXT_TOKENS,
        today=date(2025, 1, 1),
    ).text


def measure(runtime: ModelRuntime, kind: str, batch: int, new_tokens: int, bandwidth: float) -> Measurement:
    """Return the prefill and full-run timings of one batch through ``runtime.generate``."""
    device = runtime.device

    def timed(limit: int) -> tuple[float, list[Any]]:
        requests = sample_requests(kind, batch, limit)
        synchronize(device)
        started = time.perf_counter()
        results = runtime.generate(requests)
        synchronize(device)
        return time.perf_counter() - started, results

    prefill_s, _ = timed(1)
    run_s, results = timed(new_tokens)
    prompts = [result.prompt_tokens for result in results]
    return Measurement(
        batch=batch,
        new_tokens=new_tokens,
        prompt_tokens=prompts,
        prefill_s=prefill_s,
        run_s=run_s,
        generated=[result.generated_tokens for result in results],
        weight_bytes=decoder_bytes(runtime),
        kv_bytes_per_step=kv_bytes_per_step(runtime, prompts, new_tokens),
        bandwidth=bandwidth,
    )


def random_runtime(name: str, device: torch.device) -> ModelRuntime:
    """Return a runtime over random bf16 weights in a MedGemma shape, with a Gemma-sized tokenizer."""
    tokenizer = gemma_tokenizer(GEMMA_TOKENIZER_SIZE)
    text = Gemma3TextConfig(**(MEDGEMMA_4B_TEXT if name == "medgemma-4b-it" else MEDGEMMA_27B_TEXT))
    accepts_images = name == "medgemma-4b-it"
    with torch.device(device):
        if accepts_images:
            config = Gemma3Config(
                text_config=text.to_dict(),
                vision_config=MEDGEMMA_4B_VISION,
                mm_tokens_per_image=256,
                boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
                eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
                image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
            )
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
            processor: Any = gemma3_processor(tokenizer)
        else:
            model = AutoModelForCausalLM.from_config(text, dtype=torch.bfloat16)
            tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
            processor = tokenizer
    model.eval()
    model.generation_config = medgemma_generation_config(tokenizer)
    return ModelRuntime(
        model_id=f"google/{name} (random weights)",
        model_version="shape-only",
        processor=processor,
        model=model,
        device=device,
        dtype=torch.bfloat16,
        accepts_images=accepts_images,
    )


def tiny_runtimes(folder: Path) -> dict[str, tuple[ModelRuntime, str]]:
    """Return the tiny checkpoints the tests use, image-text and text-only, loaded on the CPU."""
    image = build_tiny_model(folder / "image")
    text = build_tiny_model(folder / "text", text_only=True, vocab="one-short")
    return {
        "tiny image-text": (load_runtime(str(image), None, "cpu"), "image"),
        "tiny text-only": (load_runtime(str(text), None, "cpu"), "text"),
    }


def report(
    name: str, kind: str, runtime: ModelRuntime, batches: list[int], new_tokens: int, bandwidth: float
) -> list[Measurement]:
    """Print one model's table and return its measurements (each checked against its own arithmetic)."""
    measure(runtime, kind, 1, 4, bandwidth)  # warm-up: kernels, caches, grammar compilation
    weights = decoder_bytes(runtime)
    print(f"\n{name} ({kind} prompts): decoder weights {weights / 1e9:.2f} GB, {new_tokens} new tokens")
    print(
        f"{'batch':>5} {'prompt':>7} {'prefill s':>10} {'run s':>8} {'tokens':>7} {'tokens/s':>9} "
        f"{'ms/step':>8} {'roofline':>9} {'of roofline':>12}"
    )
    measurements = []
    for batch in batches:
        found = measure(runtime, kind, batch, new_tokens, bandwidth)
        found.check()
        measurements.append(found)
        head = f"{batch:>5} {max(found.prompt_tokens):>7} {found.prefill_s:>10.3f} {found.run_s:>8.3f}"
        if found.rejected:
            print(f"{head}  rejected: {found.rejected}")
            continue
        print(
            f"{head} {found.decode_tokens:>7} {found.tokens_per_s:>9.1f} "
            f"{found.decode_s / found.steps * 1000:>8.2f} {found.roofline_tokens_per_s:>9.0f} "
            f"{found.roofline_fraction:>11.1%}"
        )
    return measurements


def check_rejection() -> None:
    """Raise AssertionError unless a run whose prefill outlasts it is rejected rather than given a rate."""
    slow_prefill = Measurement(
        batch=2,
        new_tokens=8,
        prompt_tokens=[100, 90],
        prefill_s=2.0,
        run_s=1.5,
        generated=[8, 8],
        weight_bytes=10**9,
        kv_bytes_per_step=10**6,
        bandwidth=1e12,
    )
    assert slow_prefill.rejected is not None and "outlasted" in slow_prefill.rejected
    slow_prefill.check()


def main() -> int:
    """Run the benchmark (or the CPU smoke run) and print the tables."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny checkpoints, self-checks")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="medgemma-4b-it,medgemma-27b-text-it")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--new-tokens", type=int, default=256)
    options = parser.parse_args()
    batches = [int(b) for b in options.batches.split(",")]
    check_rejection()
    if options.smoke:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        bandwidth = hbm_bandwidth(device, 0.0625)
        print(f"smoke run on CPU; copy bandwidth {bandwidth / 1e9:.1f} GB/s (the roofline means little here)")
        with tempfile.TemporaryDirectory() as folder:
            for name, (runtime, kind) in tiny_runtimes(Path(folder)).items():
                report(name, kind, runtime, batches, options.new_tokens, bandwidth)
        print("\narithmetic checks passed")
        return 0
    device = torch.device(options.device)
    bandwidth = hbm_bandwidth(device, 2.0)
    print(f"device {torch.cuda.get_device_name(device)}; measured bandwidth {bandwidth / 1e12:.2f} TB/s")
    for name in options.models.split(","):
        started = time.perf_counter()
        runtime = random_runtime(name, device)
        print(f"{name}: built in {time.perf_counter() - started:.0f} s")
        kind = "image" if runtime.accepts_images else "text"
        report(name, kind, runtime, batches, options.new_tokens, bandwidth)
        del runtime
        torch.cuda.empty_cache()
    print("\narithmetic checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
