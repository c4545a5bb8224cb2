"""Safe defaults: outside development mode the service refuses to start trusting the public CDS Hooks sandbox,
or with a placeholder or short secret key; ``medgemma-cds serve`` says why in one line and exits 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from support import ROOT
from support import SECRET_KEY
from support import RedisServer
from support import model_env
from support import service_env

from cds_service.app import create_app
from cds_service.settings import Settings
from cds_service.settings import SettingsProblem
from cds_service.settings import check_production_safety

SANDBOX_TRUST = ROOT / "cds_service" / "data" / "trusted-issuers.sandbox.json"
SANDBOX_JWKS = ROOT / "cds_service" / "data" / "jwks" / "cds-hooks-sandbox.jwks.json"
PLACEHOLDER = "change-me-to-a-long-random-value"


def trust_file(tmp_path: Path, issuers: dict[str, Any]) -> Path:
    """Write a trusted-issuers file and return its path."""
    path = tmp_path / "trusted-issuers.json"
    path.write_text(json.dumps({"issuers": issuers}))
    return path


def unsafe_trust(tmp_path: Path) -> dict[str, Path]:
    """Trust files that each trust the sandbox in another way."""
    shutil.copy(SANDBOX_JWKS, tmp_path / "copied.jwks.json")
    return {
        "shipped sandbox file": SANDBOX_TRUST,
        "sandbox key set under another issuer name": trust_file(
            tmp_path, {"https://ehr.example.org": {"jwks_file": "copied.jwks.json"}}
        ),
    }


@pytest.mark.parametrize("how", ["shipped sandbox file", "sandbox key set under another issuer name"])
def test_trusting_the_sandbox_is_refused_outside_development(
    settings: Settings, tmp_path: Path, how: str
) -> None:
    unsafe = settings.model_copy(update={"trusted_issuers": unsafe_trust(tmp_path)[how]})
    with pytest.raises(SettingsProblem) as refused:
        create_app(unsafe)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("MEDGEMMA_CDS_TRUSTED_ISSUERS trusts the public CDS Hooks sandbox")
    assert "anyone could mint its JWTs" in message
    assert "MEDGEMMA_CDS_DEV_MODE=true for local development" in message


@pytest.mark.parametrize(
    "issuers",
    [
        {"https://sandbox.cds-hooks.org/": {"jwks_uri": "https://keys.example.org/jwks.json"}},
        {"https://ehr.example.org": {"jku_allowed": ["https://sandbox.cds-hooks.org/.well-known/jwks.json"]}},
        {"https://ehr.example.org": {"jwks_uri": "https://SANDBOX.cds-hooks.org/.well-known/jwks.json"}},
    ],
)
def test_the_sandbox_named_by_issuer_or_key_url_is_refused(tmp_path: Path, issuers: dict[str, Any]) -> None:
    unsafe = Settings(trusted_issuers=trust_file(tmp_path, issuers))
    with pytest.raises(SettingsProblem, match="trusts the public CDS Hooks sandbox"):
        check_production_safety(unsafe)


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        (PLACEHOLDER, "is a published placeholder"),
        ("Change-Me", "is a published placeholder"),
        ("x" * 31, "is shorter than 32 characters"),
        ("test-review-link-secret", "is shorter than 32 characters"),
    ],
)
def test_a_placeholder_or_short_secret_is_refused_outside_development(
    settings: Settings, secret: str, why: str
) -> None:
    unsafe = settings.model_copy(update={"secret_key": SecretStr(secret)})
    with pytest.raises(SettingsProblem) as refused:
        create_app(unsafe)
    message = str(refused.value)
    assert message.startswith(f"MEDGEMMA_CDS_SECRET_KEY {why}")
    assert "\n" not in message and "MEDGEMMA_CDS_DEV_MODE=true" in message
    # The message names the variable, never its value.
    assert secret not in message


@pytest.mark.parametrize("development", [{"dev_mode": True}, {"auth_disabled": True}])
def test_development_mode_allows_all_of_it(settings: Settings, development: dict[str, bool]) -> None:
    relaxed = settings.model_copy(
        update={"trusted_issuers": SANDBOX_TRUST, "secret_key": SecretStr(PLACEHOLDER), **development}
    )
    assert create_app(relaxed).extensions["cds"].settings.development


def test_no_secret_key_refuses_to_start_outside_development_mode(settings: Settings, issuer: Any) -> None:
    fresh = Settings(
        database_url=settings.database_url, redis_url=settings.redis_url, trusted_issuers=issuer.trust_file
    )
    # The random default would die with the process, and no separately started worker could read a job.
    with pytest.raises(SettingsProblem, match="MEDGEMMA_CDS_SECRET_KEY is not set"):
        create_app(fresh)
    set_secret = Settings(secret_key=SECRET_KEY, trusted_issuers=issuer.trust_file)
    check_production_safety(set_secret)
    check_production_safety(Settings(dev_mode=True))
    check_production_safety(
        Settings(secret_key=SECRET_KEY)
    )  # no trust file: every call refused, nothing unsafe


def test_an_unreadable_trust_file_is_left_to_the_verifier(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    check_production_safety(Settings(secret_key=SECRET_KEY, trusted_issuers=broken))
    check_production_safety(Settings(secret_key=SECRET_KEY, trusted_issuers=tmp_path / "missing.json"))


def serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``medgemma-cds serve`` with only the given settings (on a port nothing else uses)."""
    script = Path(sys.executable).parent / "medgemma-cds"
    base = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [str(script), "serve", "--host", "127.0.0.1", "--port", "1"],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "start"),
    [
        ({"MEDGEMMA_CDS_TRUSTED_ISSUERS": str(SANDBOX_TRUST)}, "MEDGEMMA_CDS_TRUSTED_ISSUERS trusts"),
        ({"MEDGEMMA_CDS_SECRET_KEY": PLACEHOLDER}, "MEDGEMMA_CDS_SECRET_KEY is a published placeholder"),
        ({"MEDGEMMA_CDS_SECRET_KEY": "short"}, "MEDGEMMA_CDS_SECRET_KEY is shorter than 32 characters"),
    ],
)
def test_serve_refuses_in_one_line_and_exits_2(env: dict[str, str], start: str) -> None:
    result = serve(env)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"medgemma-cds: {start}")
    assert lines[0].endswith("or set MEDGEMMA_CDS_DEV_MODE=true for local development")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["serve", "--port", "1"],
        ["worker", "--queue", "text"],
        ["precompute", "--fhir-base", "https://x.test/r4"],
    ],
    ids=["serve", "worker", "precompute"],
)
def test_serve_worker_and_precompute_refuse_to_start_without_a_secret_key(command: list[str]) -> None:
    script = Path(sys.executable).parent / "medgemma-cds"
    base = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([str(script), *command], env=base, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("medgemma-cds: MEDGEMMA_CDS_SECRET_KEY is not set")
    assert line.endswith("or set MEDGEMMA_CDS_DEV_MODE=true for local development")


def test_readyz_and_check_say_when_a_worker_has_another_secret_key(
    settings: Settings, redis_server: RedisServer, issuer: Any, tmp_path: Path, tiny_model_dir: Path
) -> None:
    redis_url = redis_server.new_database()
    api = settings.model_copy(update={"redis_url": redis_url})
    # The worker checks its model's size against the device at start: the tiny checkpoint, as no hub answers.
    env = service_env(
        settings.database_url, redis_url, issuer, "http://cds.test", **model_env(tiny_model_dir)
    )
    script = Path(sys.executable).parent / "medgemma-cds"
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [str(script), "worker", "--queue", "text", "--pool", "solo"],
        env=env | {"MEDGEMMA_CDS_SECRET_KEY": "another-secret-than-the-apis-0123456789"},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        client = create_app(api).test_client()
        deadline = time.monotonic() + 90
        while (body := client.get("/readyz").json).get("workers", {}).get("text", 0) == 0:
            assert time.monotonic() < deadline and worker.poll() is None, log.read_text()
            time.sleep(0.5)
        assert body["status"] == "degraded" and body["workersWithAnotherSecretKey"] == 1
        assert "workers:secret-key" in body["missing"]

        result = subprocess.run([str(script), "check"], env=env, capture_output=True, text=True, timeout=120)
        report = json.loads(result.stdout)
        assert result.returncode == 1 and report["ready"] is False
        assert report["checks"]["secret_key"]["ok"] is False
        assert "another MEDGEMMA_CDS_SECRET_KEY" in report["checks"]["secret_key"]["error"]
        assert "another-secret" not in result.stdout + result.stderr
    finally:
        worker.terminate()
        worker.wait(timeout=30)
