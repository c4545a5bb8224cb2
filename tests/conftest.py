"""Shared fixtures: real PostgreSQL, Redis and FHIR server, a JWT issuer the service trusts, app and client.

Servers start once per run; each test gets a fresh app over them (flaskr's settings → app → client chain).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from joserfc import jwt
from joserfc.jwk import ECKey

from cds_service.app import create_app
from cds_service.settings import Settings
from cds_service.store import Store

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "cds_service" / "data" / "sample"
SHARED_DATA = ROOT.parent / "shared" / "data"
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
PG_ADMIN_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
FHIR_TOKEN = "fhir-test-token-3f9a"
PUBLIC_URL = "http://cds.test"
ISSUER = "https://ehr.test"


def free_port() -> int:
    """Return a free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, timeout_s: float = 30.0, headers: dict[str, str] | None = None) -> None:
    """Poll ``url`` until it answers anything below 500."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, headers=headers, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout_s} s")


@dataclass(frozen=True)
class FhirServer:
    """A running sekmet FHIR R4 server loaded with the sample patients."""

    base_url: str
    token: str
    patients: dict[str, str]  # family name -> Patient id

    def get(self, path: str) -> dict[str, Any]:
        """GET a resource or search from the server as JSON."""
        response = httpx.get(f"{self.base_url}/{path}", headers={"Authorization": f"Bearer {self.token}"})
        response.raise_for_status()
        return dict(response.json())


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServer]:
    """Start sekmet on a free loopback port (bearer auth on) and load the sample transaction Bundles."""
    workdir = tmp_path_factory.mktemp("fhir")
    port = free_port()
    base = f"http://127.0.0.1:{port}/fhir"
    config = {
        "base_url": base,
        "host": "127.0.0.1",
        "port": port,
        "data_dir": str(workdir),
        "simulator": {"enabled": False},
        "log_inbound": False,
        "validation": {"inbound": "off"},
        "server_auth": {"types": ["bearer"], "tokens": [FHIR_TOKEN]},
    }
    (workdir / "cfg.yaml").write_text(json.dumps(config))
    sekmet = Path(sys.executable).parent / "sekmet"
    process = subprocess.Popen(
        [str(sekmet), "serve", "-c", str(workdir / "cfg.yaml")],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "sekmet.log").open("w"),
    )
    try:
        wait_for_http(f"{base}/metadata")
        patients: dict[str, str] = {}
        headers = {"Authorization": f"Bearer {FHIR_TOKEN}", "Content-Type": "application/fhir+json"}
        for bundle in sorted(SAMPLE.glob("*.json")):
            answer = httpx.post(base, content=bundle.read_bytes(), headers=headers, timeout=60)
            answer.raise_for_status()
            for entry in answer.json()["entry"]:
                resource = entry.get("resource", {})
                if resource.get("resourceType") == "Patient":
                    patients[resource["name"][0]["family"]] = resource["id"]
        yield FhirServer(base_url=base, token=FHIR_TOKEN, patients=patients)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """Create a throw-away PostgreSQL database for this run, migrated to head; dropped afterwards."""
    name = f"medgemma_cds_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    store = Store(url)
    store.migrate()
    store.engine.dispose()
    yield url
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    """The test Redis database, emptied once at the start of the run."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    return client


@dataclass(frozen=True)
class Issuer:
    """An EHR that signs CDS Hooks JWTs (ES384) with a key the service trusts through a JWKS file."""

    iss: str
    key: ECKey
    kid: str
    trust_file: Path

    def token(self, audience: str, **claims: Any) -> str:
        """Return a fresh signed JWT for ``audience`` as the spec's §Trusting CDS Clients shapes it."""
        now = int(time.time())
        body = {"iss": self.iss, "aud": audience, "exp": now + 300, "iat": now, "jti": uuid.uuid4().hex}
        body.update(claims)
        return jwt.encode({"alg": "ES384", "typ": "JWT", "kid": self.kid}, body, self.key, algorithms=["ES384"])

    def headers(self, path: str) -> dict[str, str]:
        """Return an Authorization header for a call to ``PUBLIC_URL + path``."""
        return {"Authorization": f"Bearer {self.token(PUBLIC_URL + path)}"}


@pytest.fixture(scope="session")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    """Generate an ES384 key, write its public JWKS and a trusted-issuers file naming it."""
    workdir = tmp_path_factory.mktemp("trust")
    key = ECKey.generate_key("P-384")
    kid = key.thumbprint()
    public = key.as_dict(private=False) | {"kid": kid, "alg": "ES384", "use": "sig"}
    (workdir / "ehr.jwks.json").write_text(json.dumps({"keys": [public]}))
    trust_file = workdir / "trusted-issuers.json"
    trust_file.write_text(json.dumps({"issuers": {ISSUER: {"jwks_file": "ehr.jwks.json"}}}))
    return Issuer(iss=ISSUER, key=key, kid=kid, trust_file=trust_file)


@pytest.fixture
def settings(database_url: str, redis_client: redis.Redis, issuer: Issuer) -> Settings:
    """Settings for one test: real PostgreSQL and Redis, auth on with the test issuer, loopback FHIR allowed."""
    return Settings(
        database_url=database_url,
        redis_url=REDIS_URL,
        public_url=PUBLIC_URL,
        trusted_issuers=issuer.trust_file,
        fhir_allow_http_loopback=True,
        hook_budget_ms=300,
    )


@pytest.fixture
def app(settings: Settings) -> Flask:
    """A fresh app over the shared servers."""
    return create_app(settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """Flask test client of the app."""
    return app.test_client()


@pytest.fixture
def hook_body() -> Callable[..., dict[str, Any]]:
    """Build a minimal valid hook request body for a hook and patient."""

    def build(hook: str, patient_id: str, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "hook": hook,
            "hookInstance": str(uuid.uuid4()),
            "context": {"userId": "Practitioner/COREPRACTITIONER1", "patientId": patient_id},
        }
        body.update(extra)
        return body

    return build


@dataclass(frozen=True)
class LiveServer:
    """The service run as users run it: ``medgemma-cds serve`` (gunicorn) on a loopback port."""

    url: str
    env: dict[str, str]


def service_env(database_url: str, issuer: Issuer, public_url: str, **extra: str) -> dict[str, str]:
    """Return the environment that configures a service or worker process for the test servers."""
    env = dict(os.environ)
    env.update(
        {
            "MEDGEMMA_CDS_DATABASE_URL": database_url,
            "MEDGEMMA_CDS_REDIS_URL": REDIS_URL,
            "MEDGEMMA_CDS_PUBLIC_URL": public_url,
            "MEDGEMMA_CDS_TRUSTED_ISSUERS": str(issuer.trust_file),
            "MEDGEMMA_CDS_FHIR_ALLOW_HTTP_LOOPBACK": "true",
        }
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def live_server(database_url: str, issuer: Issuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Start ``medgemma-cds serve`` once per run and stop it at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = service_env(database_url, issuer, url)
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "medgemma-cds"), "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_http(f"{url}/healthz")
        yield LiveServer(url=url, env=env)
    finally:
        process.terminate()
        process.wait(timeout=15)
