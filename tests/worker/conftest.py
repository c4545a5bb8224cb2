"""Worker fixtures: the tiny Gemma3 checkpoints, built once per run, and runtimes loaded from them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from worker.runtime import ModelRuntime
from worker.runtime import load_runtime
from worker.tiny_model import build_tiny_model

CHEST_XRAY = Path(__file__).resolve().parents[3] / "shared" / "data" / "images" / "cxr-00000001_000.png"


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run the worker tests on one torch thread, restoring the count afterwards.

    The tiny model gains nothing from intra-op threads, and on a busy 2-core host their spinning made these
    tests ten times slower (load 4: 234 s with 2 threads, 24 s with 1).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def text_only_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return the folder of the text-only tiny checkpoint, shaped like medgemma-27b-text-it, with a tokenizer
    one entry longer than the model's vocabulary (the layout llguidance refused)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gemma3-text"), text_only=True, vocab="one-short")


@pytest.fixture(scope="session")
def runtime(tiny_model_dir: Path) -> ModelRuntime:
    """Return the image-text tiny checkpoint loaded on CPU, as a worker loads MedGemma."""
    return load_runtime(str(tiny_model_dir), None, "cpu")


@pytest.fixture(scope="session")
def text_only_runtime(text_only_model_dir: Path) -> ModelRuntime:
    """Return the text-only tiny checkpoint loaded on CPU."""
    return load_runtime(str(text_only_model_dir), None, "cpu")


@pytest.fixture(scope="session")
def chest_xray() -> Image.Image:
    """Return a grayscale frontal chest X-ray, shrunk so the image processor's resize stays cheap."""
    with Image.open(CHEST_XRAY) as image:
        return image.resize((128, 128))
