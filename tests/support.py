"""Helpers shared by the tests: server handles, the test JWT issuer, free ports and process environments."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import ECKey

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "cds_service" / "data" / "sample"
SHARED_DATA = ROOT.parent / "shared" / "data"
PG_ADMIN_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
FHIR_TOKEN = "fhir-test-token-3f9a"
PUBLIC_URL = "http://cds.test"
#: On the served instance's hook FHIR server allowlist but not its review app's allowed ``iss``.
HOOK_ONLY_FHIR_SERVER = "https://open-launcher.example/fhir"
ISSUER = "https://ehr.test"
#: A second EHR the service trusts, with its own key: it must never see or decide the first one's drafts.
OTHER_ISSUER = "https://other-ehr.test"
# One secret for the in-process app and every service and worker process: job requests in Redis are
# encrypted with a key derived from it, so a worker with another secret could not read them.
SECRET_KEY = "test-secret-key-shared-by-api-and-workers-5e2b"


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

    def post(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Create a resource on the server; return it as stored (with its id)."""
        response = httpx.post(
            f"{self.base_url}/{resource['resourceType']}",
            json=resource,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/fhir+json"},
        )
        response.raise_for_status()
        return dict(response.json())

    def search(self, query: str) -> list[dict[str, Any]]:
        """Return the resources a search answers with."""
        return [entry["resource"] for entry in self.get(query).get("entry", [])]

    def secrets(self) -> dict[str, str]:
        """Return what must never reach a log: the token, each sample patient's id, names and identifiers."""
        secrets = {"FHIR access token": self.token}
        for patient_id in self.patients.values():
            secrets[f"patient id {patient_id}"] = patient_id
            patient = self.get(f"Patient/{patient_id}")
            for name in patient.get("name", []):
                for part in [name.get("family"), *name.get("given", [])]:
                    if part:
                        secrets[f"patient name {part}"] = part
            for identifier in patient.get("identifier", []):
                secrets[f"patient identifier {identifier['value']}"] = identifier["value"]
        return secrets


def fhir_access(base_url: str, token: str) -> dict[str, Any]:
    """Return the ``fhirServer`` and ``fhirAuthorization`` fields of a hook body (§FHIR Resource Access)."""
    authorization = {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read",
        "subject": "cds-service",
    }
    return {"fhirServer": base_url, "fhirAuthorization": authorization}


def leaks_in_log(path: Path, secrets: dict[str, str]) -> list[str]:
    """Return the labels of the secrets that appear in a process's log file."""
    text = path.read_text(errors="replace")
    return [label for label, value in secrets.items() if value in text]


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
        return jwt.encode(
            {"alg": "ES384", "typ": "JWT", "kid": self.kid}, body, self.key, algorithms=["ES384"]
        )

    def headers(self, path: str) -> dict[str, str]:
        """Return an Authorization header for a call to ``PUBLIC_URL + path``."""
        return {"Authorization": f"Bearer {self.token(PUBLIC_URL + path)}"}


@dataclass(frozen=True)
class LiveServer:
    """The service run as users run it: ``medgemma-cds serve`` (gunicorn) on a loopback port."""

    url: str
    env: dict[str, str]
    log_path: Path | None = None


class RedisServer:
    """A throw-away ``redis-server`` of the test run's own: a free loopback port, a temporary folder, no
    persistence (no RDB, no AOF). Its databases are handed out one per user (``database``), so no test sees
    another's keys, and nothing on the machine's own Redis is ever read or written.
    """

    DATABASES = 1024

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._next_database = 1  # database 0 is the run's shared one (``url``)

    @property
    def url(self) -> str:
        """The URL of the run's shared database (0)."""
        return self.url_of(0)

    def url_of(self, index: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{index}"

    def start(self) -> None:
        """Start the server (again, on the same port, empty: nothing persists across a restart)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("the tests need redis-server on PATH (Debian: apt install redis-server)")
        command = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir)]
        command += ["--save", "", "--appendonly", "no", "--databases", str(self.DATABASES)]
        self.process = subprocess.Popen(
            command, stdout=(self.workdir / "redis.log").open("ab"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (see {self.workdir / 'redis.log'})")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); its data is gone."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Stop and start the server: what a Redis restart without persistence does to every key."""
        self.stop()
        self.start()

    def new_database(self) -> str:
        """Return the URL of a database no one else uses (queues and heartbeats are global to a database)."""
        if self._next_database >= self.DATABASES:
            raise RuntimeError(f"the test redis-server has only {self.DATABASES} databases")
        self._next_database += 1
        return self.url_of(self._next_database - 1)


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    """Run a throw-away ``RedisServer`` for the block; stop it at the end."""
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def postgres_database() -> Iterator[str]:
    """Create a throw-away PostgreSQL database migrated to head; yield its URL; drop it at the end."""
    import psycopg

    from cds_service.store import Store

    name = f"medgemma_cds_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
        store = Store(url)
        store.migrate()
        store.engine.dispose()
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def service_env(
    database_url: str, redis_url: str, issuer: Issuer, public_url: str, **extra: str
) -> dict[str, str]:
    """Return the environment that configures a service or worker process for the test servers."""
    env = dict(os.environ)
    env.update(
        {
            "MEDGEMMA_CDS_DATABASE_URL": database_url,
            "MEDGEMMA_CDS_REDIS_URL": redis_url,
            "MEDGEMMA_CDS_PUBLIC_URL": public_url,
            "MEDGEMMA_CDS_TRUSTED_ISSUERS": str(issuer.trust_file),
            "MEDGEMMA_CDS_FHIR_ALLOW_HTTP_LOOPBACK": "true",
            "MEDGEMMA_CDS_SECRET_KEY": SECRET_KEY,
        }
    )
    env.update(extra)
    return env


def model_env(tiny_model_dir: Path) -> dict[str, str]:
    """Return the settings that point both model roles at the tiny checkpoint on CPU."""
    return {
        "MEDGEMMA_CDS_TEXT_MODEL": str(tiny_model_dir),
        "MEDGEMMA_CDS_IMAGE_MODEL": str(tiny_model_dir),
        "MEDGEMMA_CDS_DEVICE": "cpu",
        "MEDGEMMA_CDS_HOOK_BUDGET_MS": "0",
        # Random weights fill every string to its bound: give the worst case room, so outputs always parse.
        "MEDGEMMA_CDS_MAX_NEW_TOKENS": "4096",
    }


@dataclass(frozen=True)
class ModelWorker:
    """The ``medgemma-cds worker`` processes (Celery prefork), text and image queues, on the tiny model."""

    processes: list[subprocess.Popen[bytes]]
    log_dir: Path


def record_draft(
    drafts: Any,
    patient_id: str,
    fhir_server: str | None,
    *,
    image_hash: str,
    study: str | None = None,
    issuer: str = ISSUER,
    tenant: str | None = None,
) -> Any:
    """Store an AI report draft as the imaging hook called by ``issuer`` does once its job is done; return it.

    ``drafts`` is a ``cds_service.drafts.DraftService``; the same image hash, study, patient, server and
    issuer give the same draft.
    """
    from cds_service.drafts import DraftOwner
    from cds_service.wire import JobRecord
    from fhir_mappings.model_outputs import ImagingReadOutput

    job = JobRecord(
        id=f"job-{image_hash}",
        service_id="imaging-report-draft",
        task="imaging-read",
        state="done",
        created_at=datetime.now(UTC),
        model="google/medgemma-4b-it",
        model_version="rev-test",
    )
    output = ImagingReadOutput(findings="Clear lungs.", impression="No acute disease.", urgency="routine")
    image_ref = f"Media/{image_hash[:8]}"
    return drafts.record(
        job=job,
        output=output,
        image_hash=image_hash,
        image_read=None,
        image_png=b"\x89PNG",
        study=study,
        image_ref=image_ref,
        patient_id=patient_id,
        fhir_server=fhir_server,
        owner=DraftOwner(issuer, tenant),
        encounter_id=None,
        requested_by="Practitioner/requester",
        evidence=[image_ref],
    )


def waiting(what: str) -> set[str]:
    """Return the summaries an AI card may have while its job waits (``fhir_mappings.ai_cards.ai_state``):
    queued or running with a live worker, unavailable without one (whether one runs depends on what the
    session started before)."""
    return {f"{what}: AI analysis {state}" for state in ("queued", "running", "unavailable")}


@contextmanager
def served_on_sqlite(
    issuer: Issuer, redis_url: str, workdir: Path, **extra_env: str
) -> Iterator[tuple[str, Path, Path]]:
    """Run ``medgemma-cds serve`` with its default options on a SQLite file in ``workdir``; yield the URL, the
    SQLite file and the log. ``extra_env`` adds settings or environment variables."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    database = workdir / "cds.db"
    log_path = workdir / "serve.log"
    env = service_env(f"sqlite:///{database}", redis_url, issuer, url, **extra_env)
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "medgemma-cds"), "serve", "--port", str(port)],
        env=env,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    try:
        wait_for_http(f"{url}/healthz")
        yield url, database, log_path
    finally:
        process.terminate()
        process.wait(timeout=15)


class FhirStubHandler(BaseHTTPRequestHandler):
    """Base of the scripted EHR stubs the tests serve: quiet, and answers FHIR JSON."""

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
