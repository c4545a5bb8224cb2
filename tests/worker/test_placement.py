"""A worker whose model can't fit its device refuses at start, before any weight is read."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

from transformers import Gemma3TextConfig

from cds_service.settings import Settings


def start_text_worker(**settings: str) -> subprocess.CompletedProcess[str]:
    """Run a text worker with only these settings (and a secret) until it stops on its own."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MEDGEMMA_CDS_")} | {
        "MEDGEMMA_CDS_SECRET_KEY": secrets.token_urlsafe(32),
        # Nothing listens here: the worker must stop before it ever connects.
        "MEDGEMMA_CDS_REDIS_URL": "redis://127.0.0.1:9/0",
        **settings,
    }
    return subprocess.run(
        [str(Path(sys.executable).parent / "medgemma-cds"), "worker", "--queue", "text"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_a_model_larger_than_the_free_memory_stops_the_worker_with_a_clear_error(tmp_path: Path) -> None:
    # Only a config: the size check builds the model on the meta device, so no weight file is needed.
    folder = tmp_path / "oversized-gemma3"
    Gemma3TextConfig(
        vocab_size=262_208,
        hidden_size=8192,
        intermediate_size=32_768,
        num_hidden_layers=120,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=256,
    ).save_pretrained(folder)
    done = start_text_worker(
        MEDGEMMA_CDS_TEXT_MODEL=str(folder), MEDGEMMA_CDS_DEVICE="cuda", MEDGEMMA_CDS_TEXT_DEVICE="cpu"
    )

    assert done.returncode == 2, done.stdout + done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("medgemma-cds worker: oversized-gemma3 needs "), done.stderr
    assert " GiB on cpu (" in error and " GiB is free: place it on another device" in error
    assert "MEDGEMMA_CDS_TEXT_DEVICE" in error and "Traceback" not in done.stderr
    assert str(tmp_path) not in done.stderr


def test_each_queue_has_its_own_device_and_falls_back_to_device() -> None:
    placed = Settings(device="cuda:0", text_device="cuda:1")
    assert placed.model_of("text") == ("google/medgemma-27b-text-it", None, "cuda:1")
    assert placed.model_of("image") == ("google/medgemma-4b-it", None, "cuda:0")
    assert Settings(device="cpu").model_of("text")[2] == "cpu"


def test_a_model_that_cannot_be_found_stops_the_worker_with_one_line(tmp_path: Path) -> None:
    done = start_text_worker(
        MEDGEMMA_CDS_TEXT_MODEL=str(tmp_path / "no-such-checkpoint"),
        MEDGEMMA_CDS_DEVICE="cpu",
        HF_HUB_OFFLINE="1",
    )

    assert done.returncode == 2, done.stdout + done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("medgemma-cds worker: cannot read no-such-checkpoint's config"), done.stderr
    assert "MEDGEMMA_CDS_TEXT_MODEL" in error and "Traceback" not in done.stderr
