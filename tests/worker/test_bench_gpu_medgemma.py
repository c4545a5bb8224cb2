"""The GPU bench's CPU smoke mode: the service's path on the tiny checkpoints, and its own arithmetic."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu_medgemma.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu_medgemma", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclasses look their module up by name.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_smoke_run_measures_both_models_and_checks_itself() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--batches", "1,2", "--new-tokens", "16"],
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "tiny image-text (image prompts)" in out and "tiny text-only (text prompts)" in out
    rows = re.findall(r"^\s+([12]) \s+(\d+) .*$", out, re.M)
    assert [batch for batch, _ in rows] == ["1", "2", "1", "2"], out
    for line in (line for line in out.splitlines() if re.match(r"^\s+[12] ", line)):
        # Either a rate with its share of the roofline, or a run rejected because prefill outlasted it.
        assert re.search(r"\d+\.\d%$", line) or "rejected: prefill" in line, line
    # The image prompt holds the X-ray's 256 image tokens.
    image_prompt = int(rows[0][1])
    assert image_prompt > 256
    assert out.rstrip().endswith("arithmetic checks passed")


def test_a_run_whose_prefill_outlasts_it_is_rejected_not_given_a_rate() -> None:
    bench = _bench()
    good = bench.Measurement(
        batch=2,
        new_tokens=8,
        prompt_tokens=[100, 90],
        prefill_s=0.5,
        run_s=1.5,
        generated=[8, 6],
        weight_bytes=8 * 10**9,
        kv_bytes_per_step=2 * 10**9,
        bandwidth=2e12,
    )
    good.check()
    assert good.rejected is None
    assert good.decode_tokens == 7 + 5 and good.steps == 7
    assert good.tokens_per_s == pytest.approx(12 / 1.0)
    assert good.roofline_tokens_per_s == pytest.approx(2 * 2e12 / 10e9)
    assert good.roofline_fraction == pytest.approx(12 / 400)

    slow = replace(good, prefill_s=2.0)
    assert slow.rejected == "prefill (2.000 s) outlasted the whole run (1.500 s)"
    slow.check()
    with pytest.raises(AssertionError):
        replace(good, generated=[9, 6]).check()  # more tokens than the budget: the figures would lie
