"""Decode throughput of a Gemma3 model with MedGemma-4B's real shape (random weights, bf16) on one GPU.

Builds ``Gemma3ForConditionalGeneration`` from the published configuration of google/medgemma-4b-it (the
shape only: layer sizes below; no weights are downloaded), measures HBM bandwidth with a device copy, then
greedy decode tokens/s at batch 1 (sequential), 4 and 8, and compares each with the memory-bandwidth
roofline: one decode step must read every decoder weight once, so a step takes at least
``weight bytes / bandwidth`` and a batch of B yields at most ``B * bandwidth / weight bytes`` tokens/s.

Runs well inside 10 minutes on an H100/H200: ``python bench/bench_gpu_medgemma.py``.
CPU smoke test of the script: ``python bench/bench_gpu_medgemma.py --device cpu --layers 1 --new-tokens 4``.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import Gemma3Config

# google/medgemma-4b-it config.json (same shape as gemma-3-4b-it): the text decoder and the SigLIP tower.
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


def hbm_bandwidth(device: torch.device, gigabytes: float = 2.0) -> float:
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


def timed_generate(
    model: torch.nn.Module, batch: int, prompt: int, new_tokens: int, device: torch.device
) -> float:
    """Return seconds for one greedy generate of ``new_tokens`` tokens for ``batch`` random prompts."""
    input_ids = torch.randint(10, 1000, (batch, prompt), device=device)
    attention = torch.ones_like(input_ids)
    synchronize(device)
    started = time.perf_counter()
    model.generate(
        input_ids=input_ids,
        attention_mask=attention,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
    )
    synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    """Build the model, measure bandwidth and decode rates, print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (smoke tests)")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,4,8")
    options = parser.parse_args()
    device = torch.device(options.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    text = dict(MEDGEMMA_4B_TEXT)
    if options.layers:
        text["num_hidden_layers"] = options.layers
    config = Gemma3Config(text_config=text, vision_config=MEDGEMMA_4B_VISION, mm_tokens_per_image=256)
    from transformers import Gemma3ForConditionalGeneration

    started = time.perf_counter()
    with torch.device(device):
        model = Gemma3ForConditionalGeneration(config).to(dtype).eval()
    built_s = time.perf_counter() - started
    decoder = model.model.language_model
    # A decode step reads every decoder weight and the (tied) output embedding once.
    weight_bytes = sum(p.numel() * p.element_size() for p in decoder.parameters())
    bandwidth = hbm_bandwidth(device, 2.0 if device.type == "cuda" else 0.25)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}; dtype {dtype}; model built in {built_s:.1f} s")
    print(f"decoder weights {weight_bytes / 1e9:.2f} GB; measured bandwidth {bandwidth / 1e12:.2f} TB/s")
    roofline_step_s = weight_bytes / bandwidth
    print(
        f"roofline: {roofline_step_s * 1000:.2f} ms per decode step, "
        f"{1 / roofline_step_s:.0f} tokens/s per sequence"
    )
    print(f"prompt {options.prompt} tokens, {options.new_tokens} new tokens, greedy")
    print(f"{'batch':>5} {'tokens/s':>10} {'per step':>10} {'x batch 1':>10} {'of roofline':>12}")
    timed_generate(model, 1, options.prompt, 2, device)  # warm-up: kernels, caches
    baseline = None
    with torch.inference_mode():
        for batch in (int(b) for b in options.batches.split(",")):
            prefill = timed_generate(model, batch, options.prompt, 1, device)
            total = timed_generate(model, batch, options.prompt, options.new_tokens, device)
            decode_s = max(total - prefill, 1e-9)
            step_s = decode_s / (options.new_tokens - 1)
            rate = batch / step_s
            baseline = baseline or rate
            roofline = batch / roofline_step_s
            print(
                f"{batch:>5} {rate:>10.1f} {step_s * 1000:>8.2f}ms "
                f"{rate / baseline:>10.2f} {rate / roofline:>11.0%}"
            )


if __name__ == "__main__":
    main()
