"""Safe defaults: outside development mode the service refuses to start trusting the public CDS Hooks sandbox,
or with a placeholder or short secret key; ``medgemma-cds serve`` says why in one line and exits 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from support import ROOT

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


def test_the_random_default_secret_and_an_own_issuer_start(settings: Settings, issuer: Any) -> None:
    fresh = Settings(
        database_url=settings.database_url, redis_url=settings.redis_url, trusted_issuers=issuer.trust_file
    )
    assert len(fresh.secret_key.get_secret_value()) >= 32
    assert not fresh.development
    assert create_app(fresh).extensions["cds"].settings is fresh
    check_production_safety(Settings())  # no trust file at all: every call is refused, nothing unsafe


def test_an_unreadable_trust_file_is_left_to_the_verifier(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    check_production_safety(Settings(trusted_issuers=broken))
    check_production_safety(Settings(trusted_issuers=tmp_path / "missing.json"))


def serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``medgemma-cds serve`` with only the given settings (on a port nothing else uses)."""
    script = Path(sys.executable).parent / "medgemma-cds"
    base = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
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
