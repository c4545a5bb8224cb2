"""``medgemma-cds demo`` as a user runs it: its own Redis, FHIR server, API and workers; the summary,
order-review and imaging cards; the imaging draft signed (by the demo with ``--once``, by a person in
Chromium otherwise); the final report and its Provenance read back; nothing left running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright
from support import free_port

MARKER = "DEMO_TEST_RUN"
CHROMIUM = "/usr/bin/chromium"
RULE_SUMMARY = "1 active problem, 3 active medications, 3 allergies"
DUPLICATE = "[WARNING] Duplicate therapy: Hydrochlorothiazide 25 MG Oral Tablet duplicates active"
STARTED = ("redis-server", "fhir-server", "text-worker", "image-worker", "api")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's model cache, shared by this module: the first run builds the tiny model."""
    return tmp_path_factory.mktemp("demo-cache")


def demo_env(run: str, home: Path) -> dict[str, str]:
    """The caller's environment without our settings, a Redis URL nothing answers (the demo starts one), a
    cache folder of the test's (the development issuer's key), and a marker every child inherits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_CDS_")}
    env["MEDGEMMA_CDS_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    env["XDG_CACHE_HOME"] = str(home)
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


def assert_the_loop(out: str, port: int) -> None:
    """The cards of all three calls, the AI cards, the sign and the read-back are in the demo's output."""
    assert "== patient-view -> patient-summary (Kermit Trantow)" in out
    assert f"[INFO] {RULE_SUMMARY}" in out
    assert "== order-select -> order-review (Kermit Trantow)" in out
    assert DUPLICATE in out and "suggestion: Remove this draft order (recommended)" in out
    assert "== patient-view -> imaging-report-draft (Louis Erdman)" in out
    assert "[INFO] AI pre-visit summary (draft, needs clinician review)" in out
    assert "link: Review the draft (development link) -> " in out
    assert re.search(r"DiagnosticReport/[\w.-]+: status final", out), out
    assert re.search(r"Provenance/[\w.-]+: VERIFY by", out), out
    assert f"discovery:  http://127.0.0.1:{port}/cds-services" in out


def test_once_shows_the_whole_loop_and_stops_everything(cache_dir: Path, tmp_path: Path) -> None:
    run = uuid.uuid4().hex
    port = free_port()
    result = subprocess.run(
        command(port, cache_dir, "--wait", "240", "--once"),
        env=demo_env(run, tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for name in STARTED:
        assert f"started {name}" in out and f"stopped {name}" in out
    assert "building the tiny random-weight Gemma3 checkpoint" in out
    assert_the_loop(out, port)
    assert "Signed as Dr Demo Clinician through the development review link." in out
    assert "Running. Press Ctrl-C" not in out
    assert processes_marked(run) == []


def test_a_clinician_signs_in_chromium_and_ctrl_c_stops_the_demo(cache_dir: Path, tmp_path: Path) -> None:
    run = uuid.uuid4().hex
    port = free_port()
    process = subprocess.Popen(
        command(port, cache_dir, "--wait", "240"),
        env=demo_env(run, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def read_until(prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        assert process.stdout is not None
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip().startswith(prefix):
                return line
        raise AssertionError(f"no line starting {prefix!r}:\n{''.join(lines)}")

    try:
        link = read_until("Open the review link to sign the draft:", 600).split(": ", 1)[1].strip()
        assert "building the tiny" not in "".join(lines)  # the first test's checkpoint is reused
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(link)
            assert "AI-generated draft" in page.content()
            page.fill("#practitionerName", "Dr Chromium Clinician")
            page.click("#sign")
            page.wait_for_load_state()
            assert "Dr Chromium Clinician" in page.content()
            browser.close()
        read_until("Running. Press Ctrl-C", 120)
        out = "".join(lines)
        assert_the_loop(out, port)
        assert "Signed by Dr Chromium Clinician (Practitioner/demo-clinician)" in out
        assert len(processes_marked(run)) >= 6  # the demo, redis, the FHIR server, the API, two workers

        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, "".join(lines) + rest
    assert "interrupted: stopping what the demo started" in rest
    assert processes_marked(run) == []
