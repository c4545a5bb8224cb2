"""Prints hook throughput and latency of patient-summary over real HTTP, against a bare endpoint and a peer.

Run: ``.venv/bin/python bench/bench_hooks.py [--requests 1500] [--concurrency 16] [--workers 2]``.

1. patient-summary with full prefetch (the demo patient), authentication off, hook budget 0: the rule card is
   built and the summary job is enqueued once (the same record afterwards is a Redis lookup), never waited
   for; each call also writes its audit row to PostgreSQL. Served by ``medgemma-cds serve`` (gunicorn
   gthread) and compared, as a ratio, with a bare Flask JSON endpoint served by gunicorn with the same
   workers and threads, in the same run.
2. The same hook with no prefetch: its five keys read from a sekmet FHIR server behind a loopback proxy that
   adds 20 ms to every request, filled concurrently (the service's executor) vs one at a time
   (``resolve_prefetch`` with a one-thread executor); and over HTTP, no prefetch vs full prefetch.
3. The peer: HealthChain (PyPI, in ``bench/.venv-peer``) serving the same card with uvicorn and the same
   number of worker processes.

The load generator is threads with one keep-alive httpx client each, bounded by request count and time, on
loopback only; it shares the machine's cores with the server, equally for every target. Figures, no asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cds_service.demo import hook_bodies  # noqa: E402

BIN = Path(sys.executable).parent
PEER_VENV = ROOT / "bench" / ".venv-peer"
PEER_PACKAGE = "healthchain==0.16.1"
PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
FHIR_TOKEN = "bench-fhir-token"
ADDED_LATENCY_S = 0.020


# --- Servers ---------------------------------------------------------------------------------------------


def free_port() -> int:
    """Return a free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Wait until ``url`` answers below 500; raise if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


@contextmanager
def running(
    argv: list[str], ready_url: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[None]:
    """Run a server process until the block ends; its output goes to a temporary log shown on failure."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_for(ready_url, process)
            except RuntimeError:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace")[-3000:])
                raise
            yield
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def serve_bare(port: int, workers: int, threads: int) -> None:
    """Serve a bare Flask JSON endpoint under gunicorn exactly as ``medgemma-cds serve`` is configured."""
    from flask import Flask
    from flask import jsonify
    from flask import request
    from gunicorn.app.base import BaseApplication

    app = Flask("bare")

    @app.post("/cds-services/<service_id>")
    def bare(service_id: str) -> Any:
        request.get_json()
        return jsonify({"cards": []})

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify({"status": "ok"})

    class Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"127.0.0.1:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", threads)
            self.cfg.set("timeout", 60)
            self.cfg.set("accesslog", None)

        def load(self) -> Any:
            return app

    Gunicorn().run()


@contextmanager
def redis_server() -> Iterator[str]:
    """Run a throw-away redis-server on a free port; yield its URL."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait()


@contextmanager
def database(workdir: Path) -> Iterator[str]:
    """Yield a throw-away PostgreSQL database URL (SQLite in ``workdir`` when PostgreSQL doesn't answer)."""
    try:
        import psycopg

        name = f"medgemma_cds_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=2) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except Exception:  # noqa: BLE001 - no PostgreSQL here: the audit rows go to SQLite instead
        yield f"sqlite:///{workdir / 'bench.db'}"
        return
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def sekmet(workdir: Path) -> Iterator[tuple[str, str]]:
    """Run sekmet (bearer auth) with the demo patient loaded; yield its base URL and the patient's id."""
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
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "sekmet.yaml").write_text(json.dumps(config))
    argv = [str(BIN / "sekmet"), "serve", "-c", str(workdir / "sekmet.yaml")]
    with running(argv, f"{base}/metadata", cwd=workdir):
        from cds_service.demo import DEMO_BUNDLE

        answer = httpx.post(
            base,
            content=DEMO_BUNDLE.read_bytes(),
            headers={"Authorization": f"Bearer {FHIR_TOKEN}", "Content-Type": "application/fhir+json"},
            timeout=60,
        )
        answer.raise_for_status()
        patient_id = next(
            e["resource"]["id"] for e in answer.json()["entry"] if e["resource"]["resourceType"] == "Patient"
        )
        yield base, patient_id


@contextmanager
def latency_proxy(upstream_port: int, delay_s: float) -> Iterator[int]:
    """Run a loopback TCP proxy that holds every chunk a client sends for ``delay_s``; yield its port.

    A keep-alive HTTP client sends each request as one chunk, so each request arrives ``delay_s`` late.
    """

    def pump(source: socket.socket, target: socket.socket, delay: float) -> None:
        try:
            while data := source.recv(65536):
                if delay:
                    time.sleep(delay)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with socket.create_connection(("127.0.0.1", upstream_port)) as upstream:
                back = threading.Thread(target=pump, args=(upstream, self.request, 0.0), daemon=True)
                back.start()
                pump(self.request, upstream, delay_s)
                back.join()

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler) as server:
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield int(server.server_address[1])
        finally:
            server.shutdown()


def peer_python() -> Path:
    """Return the peer venv's python, creating the venv with HealthChain from PyPI on first use."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {PEER_VENV} with {PEER_PACKAGE} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", PEER_PACKAGE, "uvicorn"], check=True)
    return python


# --- Load ------------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What one bounded load run measured."""

    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rate(self) -> float:
        """Successful requests per second."""
        return (self.requests - self.errors) / self.seconds

    def percentile(self, p: float) -> float:
        """Return a latency percentile in milliseconds."""
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def load(url: str, body: bytes, concurrency: int, total: int, max_seconds: float) -> LoadResult:
    """POST ``body`` to ``url`` ``total`` times from ``concurrency`` threads, stopping at ``max_seconds``."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    remaining = [total]
    deadline = time.monotonic() + max_seconds
    headers = {"Content-Type": "application/json"}

    def worker() -> None:
        nonlocal errors
        with httpx.Client(timeout=30) as client:
            while True:
                with lock:
                    if remaining[0] <= 0 or time.monotonic() > deadline:
                        return
                    remaining[0] -= 1
                started = time.perf_counter()
                try:
                    ok = client.post(url, content=body, headers=headers).status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    latencies.append(elapsed)
                    errors += 0 if ok else 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadResult(len(latencies), errors, time.perf_counter() - started, latencies)


def measure(name: str, url: str, body: bytes, options: argparse.Namespace) -> LoadResult:
    """Warm up, run the bounded load once and print its figures."""
    load(url, body, options.concurrency, options.warmup, 30)
    result = load(url, body, options.concurrency, options.requests, options.max_seconds)
    print(
        f"  {name:<34} {result.rate:8.1f} req/s   p50 {result.percentile(50):7.1f} ms   "
        f"p95 {result.percentile(95):7.1f} ms   errors {result.errors}/{result.requests}",
        flush=True,
    )
    return result


def sequential_ms(call: Callable[[], Any], count: int) -> list[float]:
    """Return the milliseconds of ``count`` calls made one after another."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return times


# --- The measurements ------------------------------------------------------------------------------------


def prefetch_fill(fhir_base: str, patient_id: str, rounds: int) -> tuple[float, float]:
    """Return median ms to fill patient-summary's prefetch via the proxy: concurrently, then one by one."""
    from cds_service.fhir_client import FhirReader
    from cds_service.prefetch import ParsedPrefetchCache
    from cds_service.prefetch import resolve_prefetch
    from cds_service.registry import load_registry
    from cds_service.wire import PatientViewContext

    definition = load_registry().get("patient-summary")
    assert definition is not None
    context = PatientViewContext(user_id="Practitioner/bench", patient_id=patient_id)
    # Limits and timeouts as create_app builds them.
    http = httpx.Client(timeout=httpx.Timeout(5.0, connect=2.0), limits=httpx.Limits(max_connections=64))

    def reader() -> FhirReader:
        return FhirReader(http, fhir_base, FHIR_TOKEN, allowlist=[], allow_http_loopback=True)

    medians = []
    with ThreadPoolExecutor(16) as concurrent, ThreadPoolExecutor(1) as one:
        for executor in (concurrent, one):

            def fill(executor: ThreadPoolExecutor = executor) -> dict[str, Any]:
                # No parse cache: each fill reads and validates the five keys again.
                return resolve_prefetch(
                    definition.prefetch, {}, context, reader, executor, ParsedPrefetchCache(0)
                ).resources

            resolved = fill()
            assert resolved["patient"] is not None and resolved["conditions"] is not None
            medians.append(statistics.median(sequential_ms(fill, rounds)))
    http.close()
    return medians[0], medians[1]


def bench_ours(
    options: argparse.Namespace, workdir: Path, call: dict[str, Any], bare: LoadResult
) -> LoadResult:
    """Measure parts 1 and 2: patient-summary under load, then prefetch filled from sekmet via the proxy."""
    body = json.dumps(call).encode()
    with (
        redis_server() as redis_url,
        database(workdir) as database_url,
        sekmet(workdir / "fhir") as (fhir_base, patient_id),
    ):
        port = free_port()
        env = dict(os.environ) | {
            "MEDGEMMA_CDS_AUTH_DISABLED": "true",
            "MEDGEMMA_CDS_HOOK_BUDGET_MS": "0",
            "MEDGEMMA_CDS_REDIS_URL": redis_url,
            "MEDGEMMA_CDS_DATABASE_URL": database_url,
            "MEDGEMMA_CDS_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "MEDGEMMA_CDS_FHIR_ALLOW_HTTP_LOOPBACK": "true",
        }
        argv = [str(BIN / "medgemma-cds"), "serve", "--port", str(port)]
        argv += ["--workers", str(options.workers), "--threads", str(options.threads)]
        url = f"http://127.0.0.1:{port}/cds-services/patient-summary"
        with running(argv, f"http://127.0.0.1:{port}/healthz", env=env):
            ours = measure("medgemma-cds patient-summary", url, body, options)
            print(
                f"  ratio to bare: throughput x{ours.rate / bare.rate:.2f}, "
                f"p50 x{ours.percentile(50) / bare.percentile(50):.2f}, "
                f"p95 x{ours.percentile(95) / bare.percentile(95):.2f}",
                flush=True,
            )

            print(f"\n2. prefetch from sekmet behind a +{ADDED_LATENCY_S * 1000:.0f} ms proxy", flush=True)
            upstream = int(fhir_base.split(":")[2].split("/")[0])
            with latency_proxy(upstream, ADDED_LATENCY_S) as proxy_port:
                proxy_base = f"http://127.0.0.1:{proxy_port}/fhir"
                concurrent_ms, one_by_one_ms = prefetch_fill(proxy_base, patient_id, options.fill_rounds)
                print(
                    f"  resolve_prefetch, 5 keys: concurrent {concurrent_ms:.1f} ms, one at a time "
                    f"{one_by_one_ms:.1f} ms (medians of {options.fill_rounds}): "
                    f"x{one_by_one_ms / concurrent_ms:.2f}",
                    flush=True,
                )
                no_prefetch = hook_without_prefetch(call, proxy_base, patient_id)
                with httpx.Client(timeout=30) as client:
                    fetched, sent = (
                        statistics.median(
                            sequential_ms(
                                lambda payload=payload: client.post(url, json=payload).raise_for_status(),
                                options.fill_rounds,
                            )
                        )
                        for payload in (no_prefetch, call)
                    )
                print(
                    f"  hook over HTTP, one at a time: no prefetch (5 reads via the proxy) {fetched:.1f} ms, "
                    f"full prefetch {sent:.1f} ms (medians)",
                    flush=True,
                )
    return ours


def bench_peer(options: argparse.Namespace, body: bytes) -> LoadResult:
    """Measure part 3: HealthChain serving the same card under the same load."""
    python = peer_python()
    port = free_port()
    argv = [str(python), "-m", "uvicorn", "--app-dir", str(ROOT / "bench"), "peer_healthchain:app"]
    argv += [
        "--port",
        str(port),
        "--workers",
        str(options.workers),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    with running(argv, f"http://127.0.0.1:{port}/cds/cds-discovery"):
        url = f"http://127.0.0.1:{port}/cds/cds-services/patient-summary"
        answer = httpx.post(url, content=body, headers={"Content-Type": "application/json"}).json()
        print(f"  peer card: {answer['cards'][0]['summary']}", flush=True)
        return measure("healthchain patient-summary", url, body, options)


def main() -> None:
    """Run every measurement and print the figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500, help="requests per target (after warm-up)")
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="server worker processes (every target)")
    parser.add_argument("--threads", type=int, default=8, help="gunicorn threads per worker")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time cap per load run")
    parser.add_argument("--fill-rounds", type=int, default=30)
    parser.add_argument("--no-peer", action="store_true", help="skip HealthChain")
    parser.add_argument("--serve-bare", type=int, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve_bare is not None:
        serve_bare(options.serve_bare, options.workers, options.threads)
        return
    if shutil.which("redis-server") is None:
        sys.exit("bench_hooks.py needs redis-server on PATH")

    print(
        f"{os.cpu_count()} CPUs; {options.workers} server workers x {options.threads} threads; "
        f"{options.concurrency} client threads; {options.requests} requests per target",
        flush=True,
    )
    discovery = {
        "services": [{"id": "patient-summary", "hook": "patient-view", "prefetch": declared_prefetch()}]
    }
    _, call = hook_bodies(discovery)[0]
    body = json.dumps(call).encode()

    print("\n1. patient-summary, full prefetch, over HTTP", flush=True)
    port = free_port()
    argv = [sys.executable, __file__, "--serve-bare", str(port)]
    argv += ["--workers", str(options.workers), "--threads", str(options.threads)]
    with running(argv, f"http://127.0.0.1:{port}/healthz"):
        bare = measure(
            "bare Flask JSON endpoint (gunicorn)", f"http://127.0.0.1:{port}/cds-services/x", body, options
        )
    with tempfile.TemporaryDirectory() as folder:
        ours = bench_ours(options, Path(folder), call, bare)

    if not options.no_peer:
        print("\n3. the peer: HealthChain (FastAPI on uvicorn), same card from the same prefetch", flush=True)
        peer = bench_peer(options, body)
        print(
            f"  medgemma-cds / healthchain: throughput x{ours.rate / peer.rate:.2f}, "
            f"p95 x{ours.percentile(95) / peer.percentile(95):.2f}",
            flush=True,
        )


def declared_prefetch() -> dict[str, str]:
    """Return patient-summary's prefetch templates as discovery shows them."""
    from cds_service.registry import load_registry

    definition = load_registry().get("patient-summary")
    assert definition is not None
    return {key: prefetch.query for key, prefetch in definition.prefetch.items()}


def hook_without_prefetch(call: dict[str, Any], fhir_base: str, patient_id: str) -> dict[str, Any]:
    """Return the call with no prefetch, naming the FHIR server and a token for it."""
    return {
        "hook": call["hook"],
        "hookInstance": str(uuid.uuid4()),
        "context": dict(call["context"], patientId=patient_id),
        "fhirServer": fhir_base,
        "fhirAuthorization": {
            "access_token": FHIR_TOKEN,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "medgemma-cds",
        },
    }


if __name__ == "__main__":
    main()
