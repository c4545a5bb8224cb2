"""The command line as a newcomer meets it: help for everything, a version, typos in settings reported, no
warnings at start, and a hook called by hand through the development issuer (trusted in development only)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from flask.testing import FlaskClient
from support import PUBLIC_URL
from support import free_port
from support import wait_for_http

from cds_service.cli import build_parser
from cds_service.cli import version
from cds_service.dev_issuer import mint_token
from cds_service.examples import load_example

SCRIPT = Path(sys.executable).parent / "medgemma-cds"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``medgemma-cds`` with ``args``; return what it printed."""
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without our settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MEDGEMMA_CDS_")}
    return env | extra


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_lists_every_subcommand_with_its_purpose() -> None:
    result = run("--help")
    assert result.returncode == 0
    out = " ".join(result.stdout.split())
    assert "``" not in result.stdout
    names = subcommands()
    assert {
        "serve",
        "worker",
        "demo",
        "token",
        "call",
        "build-tiny-model",
        "load-sample-data",
        "check",
    } <= set(names)
    for name, parser in names.items():
        purpose = " ".join((parser.description or "").rstrip(".").split())
        assert f"{name} {purpose[0].lower()}{purpose[1:]}" in out, name


def test_every_option_of_every_subcommand_has_help() -> None:
    for name, parser in subcommands().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest} has no help"
        shown = run(name, "--help")
        assert shown.returncode == 0, shown.stderr
    # Defaults are shown where there is one.
    assert "(default: 8080)" in run("serve", "--help").stdout
    assert "(default: prefork)" in run("worker", "--help").stdout


def test_version_is_printed() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"medgemma-cds {version()}" and version()[0].isdigit()


def test_an_unknown_setting_is_reported_with_the_closest_name() -> None:
    env = clean_env(MEDGEMMA_CDS_HOOK_BUDGET="500", MEDGEMMA_CDS_DEV_MODE="true", MEDGEMMA_CDS_XYZZY="1")
    result = run("call", "--list", env=env)
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        "medgemma-cds: MEDGEMMA_CDS_HOOK_BUDGET is not a setting and is ignored; "
        "did you mean MEDGEMMA_CDS_HOOK_BUDGET_MS?",
        "medgemma-cds: MEDGEMMA_CDS_XYZZY is not a setting and is ignored "
        "(docs/configuration.md lists the settings)",
    ]
    assert "order-select-penicillin-allergy" in result.stdout.split()


@dataclass(frozen=True)
class DevServer:
    url: str
    env: dict[str, str]
    log_path: Path


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[DevServer]:
    """``medgemma-cds serve`` in development mode with its defaults (SQLite, no trust file), as the README
    starts it; ``httpx2`` hidden, so authlib takes the path a plain install takes."""
    workdir = tmp_path_factory.mktemp("dev-serve")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_env(
        MEDGEMMA_CDS_DEV_MODE="true",
        MEDGEMMA_CDS_PUBLIC_URL=url,
        MEDGEMMA_CDS_REDIS_URL=redis_url,
        XDG_CACHE_HOME=str(workdir / "cache"),
        PORT=str(port),
    )
    log_path = workdir / "serve.log"
    launcher = "import sys; sys.modules['httpx2'] = None; from cds_service.cli import main; sys.exit(main())"
    process = subprocess.Popen(
        [sys.executable, "-c", launcher, "serve", "--workers", "1"],
        cwd=workdir,
        env=env | {"PYTHONPATH": os.pathsep.join(sys.path)},
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_http(f"{url}/healthz", timeout_s=90)
        yield DevServer(url=url, env=env, log_path=log_path)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_serve_starts_without_warnings_and_says_it_is_in_development_mode(dev_server: DevServer) -> None:
    log = dev_server.log_path.read_text()
    assert "Warning" not in log, log
    assert "DEVELOPMENT MODE (MEDGEMMA_CDS_DEV_MODE=true)" in log
    assert "trusting the local development issuer" in log


def test_call_prints_the_allergy_card_of_an_example(dev_server: DevServer) -> None:
    result = run("call", "order-review", "--example", "order-select-penicillin-allergy", env=dev_server.env)
    assert result.returncode == 0, result.stderr
    assert (
        "[CRITICAL] Allergy conflict: Amoxicillin 500 MG Oral Capsule vs recorded allergy to Penicillin"
        in (result.stdout)
    )
    as_json = run("call", "order-review", "--json", env=dev_server.env)
    cards = json.loads(as_json.stdout)["cards"]
    assert [
        c["indicator"] for c in cards if c["source"].get("topic", {}).get("code") == "allergy-conflict"
    ] == ["critical"]


def test_a_token_for_the_wrong_url_is_refused_and_the_log_says_what_was_expected(
    dev_server: DevServer,
) -> None:
    body = load_example("order-select-penicillin-allergy")
    token = run("token", "--service", "order-review", env=dev_server.env).stdout.strip()
    answer = httpx.post(
        f"{dev_server.url}/cds-services/order-review", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status_code == 200

    elsewhere = dev_server.env | {"MEDGEMMA_CDS_PUBLIC_URL": "http://localhost:1"}
    wrong = run("token", "--service", "order-review", env=elsewhere).stdout.strip()
    body["hookInstance"] = "00000000-0000-4000-8000-000000000001"
    refused = httpx.post(
        f"{dev_server.url}/cds-services/order-review", json=body, headers={"Authorization": f"Bearer {wrong}"}
    )
    assert refused.status_code == 401
    expected = (
        f"expected aud {dev_server.url}/cds-services/order-review (its base is MEDGEMMA_CDS_PUBLIC_URL)"
    )
    assert expected in dev_server.log_path.read_text()
    assert wrong.split(".")[1] not in dev_server.log_path.read_text()

    failed = run("call", "order-review", env=elsewhere | {"MEDGEMMA_CDS_PUBLIC_URL": "http://localhost:1"})
    assert failed.returncode == 1


def test_the_development_issuer_is_refused_outside_development_mode(
    client: FlaskClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    token = mint_token(f"{PUBLIC_URL}/cds-services/order-review")
    answer = client.post(
        "/cds-services/order-review",
        json=load_example("order-select-penicillin-allergy"),
        headers={"Authorization": f"Bearer {token}"},
    )
    assert answer.status_code == 401
