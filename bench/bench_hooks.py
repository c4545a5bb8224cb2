"""Prints patient-summary's throughput and latency under wrk, against bare Flask and HealthChain in one run.

Run: ``.venv/bin/python bench/bench_hooks.py [--duration 15] [--warmup 3] [--workers 2]``. Needs ``wrk``
(``apt-get install wrk``), ``redis-server`` and, for the PostgreSQL rows, a server at ``BENCH_PG_URL``
(default ``postgresql://postgres@127.0.0.1:5432/test``; a throw-away database is created and dropped).
HealthChain runs from its own venv, ``bench/.venv-peer`` (``healthchain==0.16.1`` from PyPI), created on the
first run.

The load generator is wrk (C, epoll; ``--wrk-threads 2``), not a Python client, which on two cores would be
the bottleneck. Its Lua script ``bench/wrk/new_chart.lua`` sends a chart the service has not seen on every
request (the demo patient's prefetch with a new patient id in context, Patient and every reference, a new
hookInstance and a new clinical value, so the prefetch JSON, its content hashes and the summary job's id all
differ). Two chart sizes: the 9 KB patient-view body (Patient, problems, medications, allergies) and the
38 KB full chart (plus 30 observations). Each scenario runs ``--warmup`` seconds, then ``--duration``
seconds measured, both sizes in turn, in this order:

a. bare Flask JSON endpoint (parses the body, answers a small card) under gunicorn with the same workers and
   worker class as ours (gevent by default);
b. medgemma-cds patient-summary (``medgemma-cds serve``, default options), SQLite store, authentication off,
   no model worker (each chart's summary job is created and queued in a freshly flushed Redis; the hook
   doesn't wait for it), the default hook budget;
c. the same on PostgreSQL;
d. HealthChain (FastAPI on uvicorn, same number of worker processes) answering the same card;
e. SQLite, full charts, ``--burst-connections`` (64) and no worker: p95 against the budget + 100 ms.

Then (unless ``--no-fill`` or ``--no-burst``) prefetch fill: patient-summary's five keys from a sekmet FHIR
server behind a loopback proxy adding 20 ms per request, concurrently vs one at a time; over HTTP without vs
with prefetch.

Every server listens on loopback and is stopped at the end. Server CPU is read from ``/proc`` for the server's
process tree, wrk's from ``getrusage``, and "other CPU" is what the machine was busy with besides both (Redis,
PostgreSQL, anything else running): on a shared machine, compare the rows' CPU per request as well as their
throughput. Figures and PASS/FAIL against the targets; no asserts, exit status 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shlex
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
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cds_service.demo import hook_bodies  # noqa: E402
from cds_service.settings import Settings  # noqa: E402

BIN = Path(sys.executable).parent
WRK_SCRIPTS = ROOT / "bench" / "wrk"
PEER_VENV = ROOT / "bench" / ".venv-peer"
PEER_PACKAGE = "healthchain==0.16.1"
PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
FHIR_TOKEN = "bench-fhir-token"
ADDED_LATENCY_S = 0.020
SERVICE_PATH = "/cds-services/patient-summary"
# The targets: new charts at 16 connections, and 64 connections of new charts with no worker.
MIN_TO_PEER = 2.0
MIN_TO_BARE = 0.35
MAX_P95_TO_BARE = 5.0
MAX_CPU_MS_SMALL = 2.0
BURST_SLACK_MS = 100.0
SMALL, FULL = "9 KB", "38 KB"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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
) -> Iterator[subprocess.Popen[bytes]]:
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
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def serve_bare(port: int, workers: int, worker_class: str, threads: int) -> None:
    """Serve a bare Flask JSON endpoint under gunicorn as ``medgemma-cds serve`` is configured.

    For gevent the process is started under ``python -m gevent.monkey``, so it is patched before anything
    imports socket or ssl, as ``medgemma-cds serve`` patches its master.
    """
    from flask import Flask
    from flask import jsonify
    from flask import request
    from gunicorn.app.base import BaseApplication

    app = Flask("bare")
    card = {"summary": "bare endpoint", "indicator": "info", "source": {"label": "rules"}}

    @app.post("/cds-services/<service_id>")
    def bare(service_id: str) -> Any:
        request.get_json()
        return jsonify({"cards": [card]})

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify({"status": "ok"})

    class Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"127.0.0.1:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("worker_class", worker_class)
            self.cfg.set("threads", threads)
            self.cfg.set("worker_connections", 1000)
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
def postgres_database() -> Iterator[str | None]:
    """Yield a throw-away PostgreSQL database URL, or None when no PostgreSQL answers at BENCH_PG_URL."""
    try:
        import psycopg

        name = f"medgemma_cds_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=2) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except Exception:  # noqa: BLE001 - no PostgreSQL here: those rows are skipped
        yield None
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


# --- Bodies ----------------------------------------------------------------------------------------------


def chart_template(call: dict[str, Any]) -> str:
    """Return the call's JSON with ``__PID__``, ``__HOOK__`` and ``__N__`` where new_chart.lua varies it.

    ``__PID__`` replaces every occurrence of the patient id (context, Patient.id, subject and patient
    references); ``__N__`` follows the integer part of the first Observation's valueQuantity, so each chart
    also differs in one clinical value, not only in ids.
    """
    call = copy.deepcopy(call)
    patient_id = call["context"]["patientId"]
    call["hookInstance"] = "__HOOK__"
    quantity = next(
        (
            e["resource"]["valueQuantity"]
            for e in call["prefetch"]["observations"]["entry"]
            if "valueQuantity" in e["resource"]
        ),
        None,
    )
    if quantity is None:
        # A chart without observations varies the first problem's text instead.
        code = call["prefetch"]["conditions"]["entry"][0]["resource"]["code"]
        code["text"] = f"{code.get('text', '')} (chart __N__)"
        return json.dumps(call).replace(patient_id, "__PID__")
    whole = int(quantity["value"])
    quantity["value"] = "__N__"
    return json.dumps(call).replace('"__N__"', f"{whole}.__N__").replace(patient_id, "__PID__")


def render_chart(template: str, number: int) -> bytes:
    """Return one chart from the template, as new_chart.lua would (run 0xffff, thread 0xfff: never used)."""
    return (
        template.replace("__PID__", f"00000000-ffff-4fff-8000-{number:012x}")
        .replace("__HOOK__", f"00000000-ffff-4fff-9000-{number:012x}")
        .replace("__N__", str(number))
        .encode()
    )


# --- Load ------------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    """What one wrk run measured (its done() JSON line), plus the CPU the server and wrk spent."""

    requests: int
    seconds: float
    socket_errors: int
    non_2xx: int
    timeouts: int
    no_card: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    wrk_cpu_s: float
    server_cpu_s: float | None
    machine_cpu_s: float | None

    @property
    def rate(self) -> float:
        """Answers without an HTTP error per second."""
        return (self.requests - self.non_2xx) / self.seconds

    @property
    def other_cpu_share(self) -> float | None:
        """Cores busy besides the server and wrk (Redis, PostgreSQL, anything else on the machine)."""
        if self.machine_cpu_s is None or self.server_cpu_s is None:
            return None
        return max(0.0, self.machine_cpu_s - self.server_cpu_s - self.wrk_cpu_s) / self.seconds

    @property
    def server_cpu_ms(self) -> float | None:
        """Server CPU milliseconds (all its processes) per request."""
        if self.server_cpu_s is None or not self.requests:
            return None
        return self.server_cpu_s * 1000 / self.requests


class Wrk:
    """Runs wrk; every run gets its own number, so new_chart.lua never repeats a patient within a bench."""

    def __init__(self, threads: int, timeout_s: float) -> None:
        self.threads = threads
        self.timeout_s = timeout_s
        self.runs = 0

    def run(
        self, url: str, script: str, script_args: list[str], connections: int, seconds: float, pid: int | None
    ) -> WrkResult:
        """Load ``url`` for ``seconds`` from ``connections`` keep-alive connections; return the figures."""
        self.runs += 1
        args = script_args + [str(self.runs)] if script == "new_chart.lua" else script_args
        argv = ["wrk", "-t", str(min(self.threads, connections)), "-c", str(connections)]
        argv += ["-d", f"{seconds:g}s", "--timeout", f"{self.timeout_s:g}s", "-s", str(WRK_SCRIPTS / script)]
        argv += [url, "--", *args]
        server_before = tree_cpu_seconds(pid) if pid else None
        machine_before = machine_busy_seconds()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        machine_after = machine_busy_seconds()
        server_after = tree_cpu_seconds(pid) if pid else None
        line = next((x for x in completed.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
        if completed.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({shlex.join(argv)}): {completed.stdout}{completed.stderr}")
        figures = json.loads(line.removeprefix("WRK_JSON "))
        return WrkResult(
            requests=figures["requests"],
            seconds=figures["duration_us"] / 1e6,
            socket_errors=figures["connect"] + figures["read"] + figures["write"],
            non_2xx=figures["status"],
            timeouts=figures["timeout"],
            no_card=figures["no_card"],
            p50_ms=figures["p50_us"] / 1000,
            p95_ms=figures["p95_us"] / 1000,
            p99_ms=figures["p99_us"] / 1000,
            max_ms=figures["max_us"] / 1000,
            wrk_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            server_cpu_s=None
            if server_before is None or server_after is None
            else server_after - server_before,
            machine_cpu_s=None
            if machine_before is None or machine_after is None
            else machine_after - machine_before,
        )


def machine_busy_seconds() -> float | None:
    """Return the CPU seconds all cores have spent busy since boot (Linux ``/proc/stat``), or None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal: all but idle and iowait is busy.
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


def tree_cpu_seconds(root: int) -> float | None:
    """Return the user + system CPU seconds of a process and its live descendants (Linux ``/proc``)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Fields after the parenthesised command: state ppid ... utime(12th) stime(13th).
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    if root not in times:
        return None
    tree, grew = {root}, True
    while grew:
        grown = tree | {pid for pid, parent in parents.items() if parent in tree}
        grew, tree = grown != tree, grown
    return sum(times[pid] for pid in tree)


# --- Scenarios -------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One scenario's line in the table."""

    label: str
    size: str
    connections: int
    result: WrkResult | None
    jobs: int | None = None
    note: str = ""


class Bench:
    """The run's shared parts: options, wrk, a chart template per size and the rows measured so far."""

    def __init__(self, options: argparse.Namespace, workdir: Path, call: dict[str, Any]) -> None:
        self.options = options
        self.workdir = workdir
        self.call = call
        self.wrk = Wrk(options.wrk_threads, options.timeout)
        self.templates: dict[str, Path] = {}
        for size, chart in charts(call).items():
            self.templates[size] = workdir / f"chart-template-{size.replace(' ', '')}.json"
            self.templates[size].write_text(chart_template(chart))
        self.rows: dict[str, Row] = {}

    def measure(
        self,
        key: str,
        label: str,
        url: str,
        size: str,
        connections: int,
        server: subprocess.Popen[bytes],
        redis_url: str | None = None,
    ) -> Row:
        """Check one call's cards, flush Redis, warm up, run the measured load of new charts of ``size``,
        count the jobs; print it."""
        template = self.templates[size]
        body = render_chart(template.read_text(), 1)
        answer = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
        answer.raise_for_status()
        summaries = [card["summary"] for card in answer.json()["cards"]]
        client = redis.Redis.from_url(redis_url) if redis_url else None
        if client is not None:
            client.flushall()
        args = [str(template)]
        warm = (
            self.wrk.run(url, "new_chart.lua", args, connections, self.options.warmup, None)
            if self.options.warmup
            else None
        )
        result = self.wrk.run(url, "new_chart.lua", args, connections, self.options.duration, server.pid)
        jobs = None
        if client is not None:
            jobs = sum(1 for _ in client.scan_iter(match="mgcds:job:*", count=1000))
            client.close()
        row = Row(label, size, connections, result, jobs)
        self.rows[key] = row
        print(
            f"{key}. {label}, {size} charts ({len(body) / 1024:.1f} KiB), {connections} connections",
            flush=True,
        )
        print(f"   cards of one call: {summaries}", flush=True)
        print(f"   {describe(result)}", flush=True)
        if jobs is not None:
            answered = result.requests + (warm.requests if warm else 0)
            print(
                f"   summary jobs in Redis: {jobs}, for {answered} answers (warm-up and measured) and up to "
                f"{2 * connections} calls cut off when a wrk run ended",
                flush=True,
            )
        return row

    def skip(self, key: str, label: str, size: str, connections: int, why: str) -> None:
        """Record a scenario that could not run."""
        self.rows[key] = Row(label, size, connections, None, note=why)
        print(f"{key}. {label}, {size} charts: skipped ({why})", flush=True)


def charts(call: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the two chart sizes measured: the demo patient's 9 KB patient-view body (Patient, problems,
    medications and allergies; no observations) and its full chart (plus 30 observations)."""
    small = copy.deepcopy(call)
    small["prefetch"]["observations"] = {"resourceType": "Bundle", "type": "searchset", "entry": []}
    return {SMALL: small, FULL: call}


def describe(result: WrkResult) -> str:
    """Return one line of a result's figures."""
    cpu = f"{result.server_cpu_ms:.1f} ms" if result.server_cpu_ms is not None else "n/a"
    other = f"{100 * result.other_cpu_share:.0f}%" if result.other_cpu_share is not None else "n/a"
    return (
        f"{result.rate:7.1f} req/s  p50 {result.p50_ms:6.1f}  p95 {result.p95_ms:6.1f}  "
        f"p99 {result.p99_ms:6.1f}  max {result.max_ms:6.1f} ms  non-2xx {result.non_2xx}  "
        f"timeouts {result.timeouts}  socket errors {result.socket_errors}  no card {result.no_card}  "
        f"server CPU {cpu}/request  wrk CPU {100 * result.wrk_cpu_s / result.seconds:.0f}% of a core  "
        f"other CPU {other} of a core"
    )


def ours_env(options: argparse.Namespace, port: int, redis_url: str, database_url: str) -> dict[str, str]:
    """Return the service's environment: inherited MEDGEMMA_CDS_* dropped, so every default is the default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_CDS_")}
    return env | {
        "MEDGEMMA_CDS_AUTH_DISABLED": "true",
        "MEDGEMMA_CDS_REDIS_URL": redis_url,
        "MEDGEMMA_CDS_DATABASE_URL": database_url,
        "MEDGEMMA_CDS_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "MEDGEMMA_CDS_FHIR_ALLOW_HTTP_LOOPBACK": "true",
    }


@contextmanager
def serving_ours(
    options: argparse.Namespace, redis_url: str, database_url: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``medgemma-cds serve`` on a free port with the given store; yield the hook URL and the process."""
    port = free_port()
    argv = [str(BIN / "medgemma-cds"), "serve", "--port", str(port), "--workers", str(options.workers)]
    argv += ["--worker-class", options.worker_class, "--threads", str(options.threads)]
    env = ours_env(options, port, redis_url, database_url)
    with running(argv, f"http://127.0.0.1:{port}/healthz", env=env) as process:
        yield f"http://127.0.0.1:{port}{SERVICE_PATH}", process


def bench_bare(bench: Bench) -> None:
    """Scenario a: the bare Flask endpoint, both chart sizes."""
    options = bench.options
    port = free_port()
    argv = [sys.executable] + (["-m", "gevent.monkey"] if options.worker_class == "gevent" else [])
    argv += [__file__, "--serve-bare", str(port), "--workers", str(options.workers)]
    argv += ["--worker-class", options.worker_class, "--threads", str(options.threads)]
    with running(argv, f"http://127.0.0.1:{port}/healthz") as process:
        for size, key in zip(bench.templates, ("a1", "a2"), strict=True):
            url = f"http://127.0.0.1:{port}{SERVICE_PATH}"
            label = f"bare Flask JSON endpoint (gunicorn {options.worker_class})"
            bench.measure(key, label, url, size, options.connections, process)


def bench_store(bench: Bench, redis_url: str, database_url: str | None, store: str, key: str) -> None:
    """Scenario b (SQLite) or c (PostgreSQL): new charts of both sizes."""
    options = bench.options
    label = f"medgemma-cds, {store}"
    if database_url is None:
        for size, number in zip(bench.templates, "12", strict=True):
            bench.skip(key + number, label, size, options.connections, "no PostgreSQL")
        return
    with serving_ours(options, redis_url, database_url) as (url, process):
        for size, number in zip(bench.templates, "12", strict=True):
            bench.measure(key + number, label, url, size, options.connections, process, redis_url)


def bench_peer(bench: Bench) -> None:
    """Scenario d: HealthChain serving the same card, new charts of both sizes."""
    options = bench.options
    python = peer_python()
    port = free_port()
    argv = [str(python), "-m", "uvicorn", "--app-dir", str(ROOT / "bench"), "peer_healthchain:app"]
    argv += ["--port", str(port), "--workers", str(options.workers), "--log-level", "warning"]
    argv += ["--no-access-log"]
    with running(argv, f"http://127.0.0.1:{port}/cds/cds-discovery") as process:
        for size, key in zip(bench.templates, ("d1", "d2"), strict=True):
            url = f"http://127.0.0.1:{port}/cds{SERVICE_PATH}"
            bench.measure(
                key, "HealthChain 0.16.1 (uvicorn), same card", url, size, options.connections, process
            )


def bench_burst(bench: Bench, redis_url: str) -> None:
    """Scenario e (SQLite, many connections of full charts, no worker), then prefetch fill on that server."""
    options = bench.options
    database_url = f"sqlite:///{bench.workdir / 'burst.db'}"
    with serving_ours(options, redis_url, database_url) as (url, process):
        label = "medgemma-cds, SQLite, no worker"
        bench.measure("e", label, url, FULL, options.burst_connections, process, redis_url)
        if not options.no_fill:
            bench_fill(bench, url)


# --- Prefetch fill ---------------------------------------------------------------------------------------


def sequential_ms(call: Callable[[], Any], count: int) -> list[float]:
    """Return the milliseconds of ``count`` calls made one after another."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return times


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


def bench_fill(bench: Bench, url: str) -> None:
    """Prefetch from sekmet behind the latency proxy, then the hook over HTTP without vs with prefetch."""
    rounds = bench.options.fill_rounds
    print(f"\nprefetch fill from sekmet behind a +{ADDED_LATENCY_S * 1000:.0f} ms proxy", flush=True)
    with sekmet(bench.workdir / "fhir") as (fhir_base, patient_id):
        upstream = int(fhir_base.split(":")[2].split("/")[0])
        with latency_proxy(upstream, ADDED_LATENCY_S) as proxy_port:
            proxy_base = f"http://127.0.0.1:{proxy_port}/fhir"
            concurrent_ms, one_by_one_ms = prefetch_fill(proxy_base, patient_id, rounds)
            print(
                f"  resolve_prefetch, 5 keys: concurrent {concurrent_ms:.1f} ms, one at a time "
                f"{one_by_one_ms:.1f} ms (medians of {rounds}): x{one_by_one_ms / concurrent_ms:.2f}",
                flush=True,
            )
            no_prefetch = hook_without_prefetch(bench.call, proxy_base, patient_id)
            with httpx.Client(timeout=30) as client:
                fetched, sent = (
                    statistics.median(
                        sequential_ms(
                            lambda payload=payload: client.post(url, json=payload).raise_for_status(), rounds
                        )
                    )
                    for payload in (no_prefetch, bench.call)
                )
            print(
                f"  hook over HTTP, one at a time: no prefetch (5 reads via the proxy) {fetched:.1f} ms, "
                f"full prefetch (same chart) {sent:.1f} ms (medians)",
                flush=True,
            )


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


# --- Report ----------------------------------------------------------------------------------------------


def print_report(bench: Bench, budget_ms: int) -> None:
    """Print the table (markdown), the ratios and PASS/FAIL against the targets."""
    rows = bench.rows
    print(
        "\n| scenario | chart | connections | throughput | p50 | p95 | p99 | errors | server CPU/request "
        "| other CPU | summary jobs |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, row in rows.items():
        result = row.result
        if result is None:
            print(
                f"| {key}. {row.label} | {row.size} | {row.connections} | skipped: {row.note} | | | | | | | |"
            )
            continue
        errors = result.non_2xx + result.timeouts + result.socket_errors + result.no_card
        cpu = f"{result.server_cpu_ms:.2f} ms" if result.server_cpu_ms is not None else "n/a"
        jobs = "" if row.jobs is None else str(row.jobs)
        other = f"{result.other_cpu_share:.2f} cores" if result.other_cpu_share is not None else "n/a"
        print(
            f"| {key}. {row.label} | {row.size} | {row.connections} | {result.rate:.0f} req/s | "
            f"{result.p50_ms:.1f} ms | {result.p95_ms:.1f} ms | {result.p99_ms:.1f} ms | {errors} | {cpu} | "
            f"{other} | {jobs} |"
        )

    def result_of(key: str) -> WrkResult | None:
        row = rows.get(key)
        return row.result if row else None

    print("\nratios (throughput; p95; requests per server CPU second)")
    checks: list[tuple[str, bool | None]] = []
    for number in "12":
        bare, peer = result_of("a" + number), result_of("d" + number)
        for key in ("b" + number, "c" + number):
            ours = result_of(key)
            label = f"{key}. {rows[key].label}, {rows[key].size} charts" if key in rows else key
            if ours is None:
                checks.append((f"{label}: not measured", None))
                continue
            parts = []
            for name, other in (("bare", bare), ("HealthChain", peer)):
                if other is None:
                    continue
                part = f"/{name} x{ours.rate / other.rate:.2f}; p95 x{ours.p95_ms / other.p95_ms:.2f}"
                if ours.server_cpu_ms and other.server_cpu_ms:
                    # Requests per server CPU second: the throughput ratio with the cores to each alone.
                    part += f"; per CPU second x{other.server_cpu_ms / ours.server_cpu_ms:.2f}"
                parts.append(part)
            print(f"  {label}: " + "   ".join(parts))
            clean = ours.non_2xx + ours.timeouts + ours.socket_errors + ours.no_card == 0
            checks.append((f"{label}: every answer 200 with a card", clean))
            if peer is not None:
                ratio = ours.rate / peer.rate
                checks.append(
                    (
                        f"{label}: throughput x{ratio:.2f} of HealthChain >= x{MIN_TO_PEER}",
                        ratio >= MIN_TO_PEER,
                    )
                )
                checks.append(
                    (
                        f"{label}: p95 {ours.p95_ms:.1f} ms < HealthChain's {peer.p95_ms:.1f} ms",
                        ours.p95_ms < peer.p95_ms,
                    )
                )
            if bare is not None:
                ratio = ours.rate / bare.rate
                checks.append(
                    (
                        f"{label}: throughput x{ratio:.2f} of bare Flask >= x{MIN_TO_BARE}",
                        ratio >= MIN_TO_BARE,
                    )
                )
                limit = MAX_P95_TO_BARE * bare.p95_ms
                checks.append(
                    (
                        f"{label}: p95 {ours.p95_ms:.1f} ms <= {MAX_P95_TO_BARE:g} x bare's ({limit:.1f} ms)",
                        ours.p95_ms <= limit,
                    )
                )
            if rows[key].size == SMALL and ours.server_cpu_ms is not None:
                checks.append(
                    (
                        f"{label}: server CPU {ours.server_cpu_ms:.2f} ms/request <= {MAX_CPU_MS_SMALL:g} ms",
                        ours.server_cpu_ms <= MAX_CPU_MS_SMALL,
                    )
                )
    burst = result_of("e")
    if burst is not None:
        limit = budget_ms + BURST_SLACK_MS
        checks.append(
            (
                f"e. p95 {burst.p95_ms:.1f} ms <= budget {budget_ms} + {BURST_SLACK_MS:.0f} ms",
                burst.p95_ms <= limit,
            )
        )
        checks.append(
            (
                f"e. timeouts {burst.timeouts}, non-2xx {burst.non_2xx}, socket errors "
                f"{burst.socket_errors}, answers without a card {burst.no_card}",
                burst.timeouts + burst.non_2xx + burst.socket_errors + burst.no_card == 0,
            )
        )
    print("\ntargets")
    for text, passed in checks:
        verdict = "SKIP" if passed is None else "PASS" if passed else "FAIL"
        print(f"  {verdict}  {text}")


def main() -> None:
    """Run every scenario in order, then print the table, the ratios and the verdicts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per scenario")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--burst-connections", type=int, default=64, help="scenario g")
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=10.0, help="wrk's per-request timeout, seconds")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(2, 2 * (os.cpu_count() or 1)),
        help="server worker processes, every target (default: two per core, as medgemma-cds serve)",
    )
    parser.add_argument("--worker-class", choices=["gevent", "gthread"], default="gevent")
    parser.add_argument("--threads", type=int, default=8, help="threads per gthread worker")
    parser.add_argument("--fill-rounds", type=int, default=10)
    parser.add_argument("--no-fill", action="store_true", help="skip the prefetch fill measurement")
    parser.add_argument("--no-peer", action="store_true", help="skip HealthChain")
    parser.add_argument("--no-burst", action="store_true", help="skip scenario e and the prefetch fill")
    parser.add_argument("--serve-bare", type=int, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve_bare is not None:
        serve_bare(options.serve_bare, options.workers, options.worker_class, options.threads)
        return
    for program in ("wrk", "redis-server"):
        if shutil.which(program) is None:
            sys.exit(f"bench_hooks.py needs {program} on PATH (apt-get install {program.split('-')[0]})")

    budget_ms = int(Settings.model_fields["hook_budget_ms"].default)
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.split(
        "\n"
    )[0]
    print(f"$ {shlex.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    print(
        f"{os.cpu_count()} CPUs; servers: {options.workers} workers ({options.worker_class}); load: "
        f"{wrk_version.split(' [')[0]}, {options.wrk_threads} threads; {options.warmup:g} s warm-up + "
        f"{options.duration:g} s per scenario; hook budget {budget_ms} ms (default), no model worker\n",
        flush=True,
    )
    discovery = {
        "services": [{"id": "patient-summary", "hook": "patient-view", "prefetch": declared_prefetch()}]
    }
    _, call = hook_bodies(discovery)[0]
    with tempfile.TemporaryDirectory(prefix="bench-hooks-") as folder, redis_server() as redis_url:
        workdir = Path(folder)
        bench = Bench(options, workdir, call)
        bench_bare(bench)
        bench_store(bench, redis_url, f"sqlite:///{workdir / 'cds.db'}", "SQLite", "b")
        with postgres_database() as database_url:
            bench_store(bench, redis_url, database_url, "PostgreSQL", "c")
        if options.no_peer:
            for size, key in zip(bench.templates, ("d1", "d2"), strict=True):
                bench.skip(key, "HealthChain", size, options.connections, "--no-peer")
        else:
            bench_peer(bench)
        if not options.no_burst:
            bench_burst(bench, redis_url)
        print_report(bench, budget_ms)


def declared_prefetch() -> dict[str, str]:
    """Return patient-summary's prefetch templates as discovery shows them."""
    from cds_service.registry import load_registry

    definition = load_registry().get("patient-summary")
    assert definition is not None
    return {key: prefetch.query for key, prefetch in definition.prefetch.items()}


if __name__ == "__main__":
    main()
