"""Shared fixtures: real PostgreSQL, Redis and FHIR server, a JWT issuer the service trusts, app and client.

Servers start once per run; each test gets a fresh app over them (flaskr's settings → app → client chain).
Helpers and handles the fixtures return live in ``support.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from joserfc.jwk import ECKey
from pacs import OTHER_USER
from pacs import PACS_USER
from pacs import Pacs
from pacs import basic_authorization
from pacs import running_pacs
from smart_server import SmartServer
from smart_server import smart_server  # noqa: F401  (session fixture: a SMART server in front of fhir_server)
from support import FHIR_TOKEN
from support import HOOK_ONLY_FHIR_SERVER
from support import ISSUER
from support import OTHER_ISSUER
from support import PUBLIC_URL
from support import SECRET_KEY
from support import FhirServer
from support import Issuer
from support import LiveServer
from support import ModelWorker
from support import RedisServer
from support import free_port
from support import leaks_in_log
from support import model_env
from support import postgres_database
from support import redis_server as start_redis_server
from support import service_env
from support import wait_for_http

from cds_service.app import create_app
from cds_service.settings import ENV_PREFIX
from cds_service.settings import Settings

# The suite configures everything it starts itself: settings from the developer's shell (a production
# database or Redis among them) must never reach a test's app, CLI run or service process.
for _name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
    del os.environ[_name]


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
        # Loaded the way operators load it: the CLI (run twice: the second run must skip both patients).
        command = [str(Path(sys.executable).parent / "medgemma-cds"), "load-sample-data", "--fhir-base", base]
        command += ["--token", FHIR_TOKEN]
        first = subprocess.run(command, capture_output=True, text=True, check=True)
        second = subprocess.run(command, capture_output=True, text=True, check=True)
        assert first.stdout.count("resources loaded") == 2, first.stdout
        assert second.stdout.count("already loaded") == 2, second.stdout
        listed = httpx.get(f"{base}/Patient", headers={"Authorization": f"Bearer {FHIR_TOKEN}"}).json()
        patients = {e["resource"]["name"][0]["family"]: e["resource"]["id"] for e in listed["entry"]}
        assert len(patients) == len(listed["entry"]) == 2
        yield FhirServer(base_url=base, token=FHIR_TOKEN, patients=patients)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A throw-away PostgreSQL database for this run, migrated to head; dropped afterwards."""
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """This run's own redis-server (free port, temporary folder, no persistence), stopped at the end."""
    with start_redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """The run's shared database on its own redis-server: every app and service process the tests start."""
    return redis_server.url


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> redis.Redis:
    """A client of this run's Redis database."""
    return redis.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def issuers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Issuer]:
    """Two EHRs, each with its own ES384 key and public JWKS, and one trusted-issuers file naming both."""
    workdir = tmp_path_factory.mktemp("trust")
    trust_file = workdir / "trusted-issuers.json"
    trusted: dict[str, Any] = {}
    keys: dict[str, tuple[ECKey, str]] = {}
    for number, iss in enumerate((ISSUER, OTHER_ISSUER)):
        key = ECKey.generate_key("P-384")
        kid = key.thumbprint()
        public = key.as_dict(private=False) | {"kid": kid, "alg": "ES384", "use": "sig"}
        (workdir / f"ehr{number}.jwks.json").write_text(json.dumps({"keys": [public]}))
        trusted[iss] = {"jwks_file": f"ehr{number}.jwks.json"}
        keys[iss] = (key, kid)
    trust_file.write_text(json.dumps({"issuers": trusted}))
    return {iss: Issuer(iss=iss, key=key, kid=kid, trust_file=trust_file) for iss, (key, kid) in keys.items()}


@pytest.fixture(scope="session")
def issuer(issuers: dict[str, Issuer]) -> Issuer:
    """The EHR the tests call as: its JWTs are trusted."""
    return issuers[ISSUER]


@pytest.fixture(scope="session")
def other_issuer(issuers: dict[str, Issuer]) -> Issuer:
    """A second trusted EHR with its own key (tenancy: it sees nothing of the first one's)."""
    return issuers[OTHER_ISSUER]


@pytest.fixture
def settings(database_url: str, redis_url: str, issuer: Issuer, tiny_model_dir: Path) -> Settings:
    """Settings for one test: real PostgreSQL and Redis, auth on (test issuer), loopback FHIR."""
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        public_url=PUBLIC_URL,
        trusted_issuers=issuer.trust_file,
        fhir_allow_http_loopback=True,
        secret_key=SECRET_KEY,
        # No wait: a new model job always shows its "running" card (tests of the wait use their own budget).
        hook_budget_ms=0,
        text_model=str(tiny_model_dir),
        image_model=str(tiny_model_dir),
        device="cpu",
    )


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    """A fresh app over the shared servers; its audit rows written and its connections closed after."""
    app = create_app(settings)
    yield app
    services = app.extensions["cds"]
    services.audit.flush()
    services.store.engine.dispose()


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tiny random-weight Gemma3 image-text checkpoint once per run (as build-tiny-model does)."""
    from worker.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def pacs_ports() -> dict[str, tuple[int, int]]:
    """Free (HTTP, DICOM) ports for the test PACS, chosen before the servers that allowlist them start."""
    return {name: (free_port(), free_port()) for name in ("pacs", "other_pacs")}


@pytest.fixture(scope="session")
def pacs(pacs_ports: dict[str, tuple[int, int]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    """Orthanc with DICOMweb, accepting the workers' configured credential (DICOMWEB_AUTHORIZATION)."""
    with running_pacs(tmp_path_factory.mktemp("pacs"), *pacs_ports["pacs"], PACS_USER) as server:
        yield server


@pytest.fixture(scope="session")
def other_pacs(
    pacs_ports: dict[str, tuple[int, int]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pacs]:
    """A second allowlisted Orthanc that accepts another user only: the workers' requests get a 401."""
    with running_pacs(tmp_path_factory.mktemp("other-pacs"), *pacs_ports["other_pacs"], OTHER_USER) as server:
        yield server


@pytest.fixture(scope="session")
def live_server(
    database_url: str,
    redis_url: str,
    issuer: Issuer,
    tiny_model_dir: Path,
    fhir_server: FhirServer,
    smart_server: SmartServer,  # noqa: F811 - the fixture imported above
    pacs_ports: dict[str, tuple[int, int]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """Start ``medgemma-cds serve`` once per run: the review app registered with the test SMART server, and
    signed reports written back to the test FHIR server when the EHR grants no write."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = service_env(
        database_url,
        redis_url,
        issuer,
        url,
        MEDGEMMA_CDS_FHIR_SERVER_ALLOWLIST=json.dumps(
            [fhir_server.base_url, smart_server.iss, HOOK_ONLY_FHIR_SERVER]
        ),
        MEDGEMMA_CDS_REVIEW_ISS_ALLOWLIST=json.dumps([smart_server.iss]),
        MEDGEMMA_CDS_SMART_CLIENT_ID=smart_server.client_id,
        MEDGEMMA_CDS_FHIR_WRITEBACK_URL=fhir_server.base_url,
        MEDGEMMA_CDS_FHIR_WRITEBACK_TOKEN=fhir_server.token,
        MEDGEMMA_CDS_DICOMWEB_ALLOWLIST=json.dumps(
            [f"http://127.0.0.1:{http}/dicom-web" for http, _ in pacs_ports.values()]
        ),
        MEDGEMMA_CDS_DICOMWEB_AUTHORIZATION=basic_authorization(PACS_USER),
        **model_env(tiny_model_dir),
    )
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "medgemma-cds"), "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_http(f"{url}/healthz")
        yield LiveServer(url=url, env=env, log_path=log_path)
    finally:
        process.terminate()
        process.wait(timeout=15)
    # Everything the end-to-end tests sent through the server: no token, name, id or identifier was logged.
    leaks = leaks_in_log(log_path, fhir_server.secrets())
    assert not leaks, f"the service logged {leaks} ({log_path})"


@pytest.fixture(scope="session")
def model_worker(
    live_server: LiveServer, fhir_server: FhirServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelWorker]:
    """Start a text worker and an image worker configured like the live server; stop them at the end."""
    log_dir = tmp_path_factory.mktemp("worker")
    processes = [
        subprocess.Popen(
            [
                str(Path(sys.executable).parent / "medgemma-cds"),
                "worker",
                "--queue",
                queue,
                "--concurrency",
                "1",
            ],
            env=live_server.env,
            stdout=(log_dir / f"{queue}.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        for queue in ("text", "image")
    ]
    try:
        yield ModelWorker(processes=processes, log_dir=log_dir)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
    for log_path in log_dir.glob("*.log"):
        leaks = leaks_in_log(log_path, fhir_server.secrets())
        assert not leaks, f"a worker logged {leaks} ({log_path})"
