"""The README's quick start, run as a newcomer pastes it: a fresh virtualenv, the install, ``serve``, then its
``curl`` line answered with the allergy card.

The commands are read from the README itself. The only change made to them is the port: 8080 may be taken on
a shared machine, so ``serve`` gets a free one through ``$PORT`` (which its ``--port`` defaults to) and the
``curl`` line's ``127.0.0.1:8080`` is pointed at it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import ROOT
from support import free_port

README = ROOT / "README.md"


def bash_blocks() -> list[str]:
    """Return the README's ```bash blocks, in order."""
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)]


def checkout_copy(target: Path) -> None:
    """Copy the files a clone has (tracked, and new ones git doesn't ignore) into ``target``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = ROOT / name.decode()
        if source.is_file():
            (target / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name.decode())


# A fresh virtualenv and the install from the package index take a minute or two on a busy machine.
@pytest.mark.timeout(900)
def test_the_quick_start_and_its_curl_line_answer_the_allergy_card(tmp_path: Path, redis_url: str) -> None:
    quick_start, curl_line, tests_command = bash_blocks()[:3]
    assert "medgemma-cds serve" in quick_start and curl_line.startswith("curl ")
    assert tests_command == "scripts/test"
    checkout = tmp_path / "checkout"
    checkout_copy(checkout)

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_CDS_") and k != "VIRTUAL_ENV"}
    env |= {
        "PORT": str(port),
        "MEDGEMMA_CDS_PUBLIC_URL": f"http://127.0.0.1:{port}",
        # The run's own Redis database (the quick start's default, database 0, may be someone else's).
        "MEDGEMMA_CDS_REDIS_URL": redis_url,
        # The development issuer's key goes to a cache folder of the test's; pip keeps its usual cache.
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "PIP_CACHE_DIR": env.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip"),
    }
    log_path = tmp_path / "quick-start.log"
    server = subprocess.Popen(
        ["bash", "-c", quick_start],
        cwd=checkout,
        env=env,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        discovery = wait_for_discovery(f"http://127.0.0.1:{port}", server, log_path)
        assert {s["id"] for s in discovery["services"]} >= {"order-review", "patient-summary"}
        answer = subprocess.run(
            ["bash", "-c", curl_line.replace("127.0.0.1:8080", f"127.0.0.1:{port}")],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert answer.returncode == 0, answer.stderr
        cards = json.loads(answer.stdout)["cards"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    allergy = [card for card in cards if card["source"].get("topic", {}).get("code") == "allergy-conflict"]
    assert len(allergy) == 1, cards
    assert allergy[0]["indicator"] == "critical"
    assert "Amoxicillin" in allergy[0]["summary"] and "Penicillin" in allergy[0]["summary"]
    assert "DeprecationWarning" not in log_path.read_text()


def wait_for_discovery(url: str, server: subprocess.Popen[bytes], log_path: Path) -> dict[str, Any]:
    """Wait (through the install) until the service answers discovery; fail with the log if it exits."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert server.poll() is None, log_path.read_text()[-3000:]
        try:
            response = httpx.get(f"{url}/cds-services", timeout=2)
            if response.status_code == 200:
                return dict(response.json())
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"the quick start did not serve within 600 s:\n{log_path.read_text()[-3000:]}")
