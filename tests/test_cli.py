"""``medgemma-cds check``: the readiness report of a running deployment, as an operator runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from support import FhirServer
from support import LiveServer
from support import ModelWorker
from support import free_port

from cds_service.jobs import QUEUES
from cds_service.readiness import check_workers
from cds_service.settings import Settings

SECRET = "hf_not_a_real_token_5c1d"


def check(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run ``medgemma-cds check`` and return its exit code and output."""
    script = Path(sys.executable).parent / "medgemma-cds"
    result = subprocess.run(
        [str(script), "check", *args], env=env, capture_output=True, text=True, timeout=60
    )
    return result.returncode, result.stdout + result.stderr


def wait_for_workers(settings: Settings, timeout_s: float = 90) -> dict[str, Any]:
    """Return the workers check once both queues have a worker (they load torch first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check_workers(settings)
        if result["ok"] or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def test_check_reports_a_ready_deployment_with_its_workers(
    live_server: LiveServer, model_worker: ModelWorker, fhir_server: FhirServer
) -> None:
    env = live_server.env | {"MEDGEMMA_CDS_HF_TOKEN": SECRET}
    assert wait_for_workers(Settings(redis_url=env["MEDGEMMA_CDS_REDIS_URL"]))["ok"]

    code, out = check(env, "--fhir-base", fhir_server.base_url)
    assert code == 0, out
    report = json.loads(out)
    assert report["ready"] is True
    checks = report["checks"]
    assert checks["redis"]["ok"] and checks["database"]["ok"]
    assert checks["database"]["schema"] == checks["database"]["head"]
    assert checks["fhir_server"] == checks["fhir_server"] | {"ok": True, "fhir_version": "4.0.1"}
    queues = checks["workers"]["queues"]
    assert queues["text"] and queues["image"]
    assert all(name.startswith("text@") for name in queues["text"])
    assert set(queues) == set(QUEUES)
    assert report["config"]["hf_token"] == "**********"
    assert SECRET not in out
    assert report["config"]["redis_url"] == env["MEDGEMMA_CDS_REDIS_URL"]

    code, out = check(env, "--worker")
    assert code == 0 and "a model worker on this host answers" in out


def test_check_says_what_is_down(live_server: LiveServer) -> None:
    dead = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    env = live_server.env | {"MEDGEMMA_CDS_REDIS_URL": dead}
    code, out = check(env, "--fhir-base", f"http://127.0.0.1:{free_port()}/fhir")
    assert code == 1
    report = json.loads(out)
    assert report["ready"] is False
    assert report["checks"]["redis"] == report["checks"]["redis"] | {"ok": False, "error": "ConnectionError"}
    assert report["checks"]["fhir_server"]["ok"] is False
    assert report["checks"]["workers"]["ok"] is False
    assert report["checks"]["database"]["ok"] is True, report["checks"]["database"]
    assert "s3cret" not in out and report["config"]["redis_url"].startswith("redis://:**********@")

    code, out = check(env, "--worker")
    assert code == 1 and "no model worker on this host answers" in out


def test_a_malformed_setting_stops_serve_with_one_line_naming_it() -> None:
    script = Path(sys.executable).parent / "medgemma-cds"
    cases = {
        # A bare URL where a JSON list belongs: the classic mistake.
        "MEDGEMMA_CDS_FHIR_SERVER_ALLOWLIST": ("https://fhir.hospital.test/r4", "a JSON list of strings"),
        "MEDGEMMA_CDS_HOOK_BUDGET_MS": ("1.5s", "a whole number"),
        "MEDGEMMA_CDS_AUTH_DISABLED": ("sometimes", "true or false"),
    }
    for name, (value, expected) in cases.items():
        env = {"PATH": "/usr/bin:/bin", name: value}
        result = subprocess.run(
            [str(script), "serve", "--port", str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert result.stdout == ""
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"medgemma-cds: {name}") and expected in line, line
        assert value not in line  # a value may be a secret: never echoed
