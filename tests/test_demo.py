"""``medgemma-cds demo`` as a user runs it: its own Redis, API and worker, cards printed, nothing left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from support import free_port

MARKER = "DEMO_TEST_RUN"
RULE_SUMMARY = "1 active problem, 3 active medications, 3 allergies"
DUPLICATE = "[WARNING] Duplicate therapy: Hydrochlorothiazide 25 MG Oral Tablet duplicates active"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's model cache, shared by this module: the first run builds the tiny model."""
    return tmp_path_factory.mktemp("demo-cache")


def demo_env(run: str) -> dict[str, str]:
    """The caller's environment without our settings, a Redis URL nothing answers, and a marker to find
    every process the demo starts (children inherit it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_CDS_")}
    env["MEDGEMMA_CDS_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    env[MARKER] = run
    return env


def processes_marked(run: str) -> list[int]:
    """Return the ids of live processes whose environment carries this run's marker."""
    needle = f"{MARKER}={run}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def command(port: int, cache_dir: Path, *extra: str) -> list[str]:
    script = Path(sys.executable).parent / "medgemma-cds"
    return [str(script), "demo", "--port", str(port), "--cache-dir", str(cache_dir), *extra]


def test_demo_prints_both_hooks_cards_and_stops_everything(cache_dir: Path) -> None:
    run = uuid.uuid4().hex
    port = free_port()
    result = subprocess.run(
        command(port, cache_dir, "--wait", "30", "--once"),
        env=demo_env(run),
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "started redis-server" in out and "started api" in out and "started worker" in out
    assert "building the tiny random-weight Gemma3 checkpoint" in out
    assert "== patient-view -> patient-summary" in out
    assert f"[INFO] {RULE_SUMMARY}" in out
    assert "== order-select -> order-review" in out
    assert DUPLICATE in out
    assert "suggestion: Remove this draft order (recommended)" in out
    assert (
        "[INFO] AI pre-visit summary (draft, needs clinician review)" in out
        or "AI analysis still running" in out
    )
    assert f"discovery:  http://127.0.0.1:{port}/cds-services" in out
    if "Pre-visit summary: AI analysis queued" in out or "Pre-visit summary: AI analysis running" in out:
        # The first call answered before the job was done: its status URL is printed.
        assert f"job status: http://127.0.0.1:{port}/jobs/" in out
    assert "https://sandbox.cds-hooks.org" in out
    for name in ("worker", "api", "redis-server"):
        assert f"stopped {name}" in out
    assert processes_marked(run) == []


def test_ctrl_c_stops_a_kept_running_demo(cache_dir: Path) -> None:
    run = uuid.uuid4().hex
    port = free_port()
    process = subprocess.Popen(
        command(port, cache_dir, "--wait", "0"),
        env=demo_env(run),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        assert process.stdout is not None
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Running. Press Ctrl-C"):
                break
        out = "".join(lines)
        assert "Running. Press Ctrl-C" in out, out
        assert "building the tiny" not in out  # the first test's checkpoint is reused
        assert RULE_SUMMARY in out and DUPLICATE in out
        assert "AI analysis still running after 0 s" in out or "AI card arrived" in out
        assert len(processes_marked(run)) >= 4  # the demo, redis-server, the API and the worker

        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, out + rest
    assert "interrupted: stopping what the demo started" in rest
    assert processes_marked(run) == []
