"""The ``medgemma-cds`` command: serve, worker, demo, build-tiny-model, load-sample-data, check."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cds_service.settings import SettingsProblem
from cds_service.settings import load_settings

SAMPLE_DATA = Path(__file__).parent / "data" / "sample"


def serve(args: argparse.Namespace) -> int:
    """Run the API under gunicorn (never Flask's development server).

    The default gevent workers serve each request in a greenlet: a hook waiting on its model job, or on a
    FHIR read, holds no thread, so rule cards never queue behind waits. gthread is kept as a fallback.
    """
    if args.worker_class == "gevent":
        # Patched before anything imports socket or ssl, in the master too (gunicorn's own advice), so the
        # workers it forks inherit cooperative modules.
        from gevent import monkey

        monkey.patch_all()
    settings = load_settings()
    # Gunicorn workers are processes: prometheus-client sums their counters through files in this folder
    # (its multiprocess mode), which it must be told before it is first imported.
    metrics_dir = tempfile.mkdtemp(prefix="medgemma-cds-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from gunicorn.app.base import BaseApplication

    from cds_service.app import create_app
    from cds_service.store import Store

    # Migrate once in the master, before workers fork, so workers never race on the schema.
    Store(settings.database_url).migrate()

    class Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            self.cfg.set("worker_class", args.worker_class)
            self.cfg.set("threads", args.threads)
            self.cfg.set("worker_connections", args.connections)
            self.cfg.set("timeout", 60)
            self.cfg.set("accesslog", None)

        def load(self) -> Any:
            return create_app(settings)

    try:
        Gunicorn().run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def db_upgrade(args: argparse.Namespace) -> int:
    """Apply the store's Alembic migrations."""
    from cds_service.store import Store

    Store(load_settings().database_url).migrate()
    print("database schema is up to date")
    return 0


def sample_patient_identifier(bundle: dict[str, Any]) -> str | None:
    """Return ``system|value`` of the first identifier of the Patient in a sample transaction Bundle."""
    for entry in bundle.get("entry", []):
        resource = entry.get("resource", {})
        if resource.get("resourceType") == "Patient" and resource.get("identifier"):
            first = resource["identifier"][0]
            return f"{first.get('system', '')}|{first['value']}"
    return None


def load_sample_data(args: argparse.Namespace) -> int:
    """Load the bundled synthetic patients (transaction Bundles) into a FHIR server, once.

    A Bundle whose Patient the server already holds (searched by identifier) is skipped, so a ``seed`` job
    that runs at every ``docker compose up`` loads each patient only the first time.
    """
    import httpx

    base = args.fhir_base.rstrip("/")
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    with httpx.Client(headers=headers, timeout=60) as http:
        for bundle_path in sorted(SAMPLE_DATA.glob("*.json")):
            bundle = json.loads(bundle_path.read_bytes())
            identifier = sample_patient_identifier(bundle)
            if identifier:
                found = http.get(f"{base}/Patient", params={"identifier": identifier})
                if found.status_code == 200 and found.json().get("entry"):
                    existing = found.json()["entry"][0]["resource"]["id"]
                    print(f"{bundle_path.name}: already loaded, Patient/{existing}")
                    continue
            response = http.post(base, content=bundle_path.read_bytes())
            if response.status_code >= 300:
                print(f"{bundle_path.name}: FHIR server answered {response.status_code}", file=sys.stderr)
                return 1
            locations = [e.get("response", {}).get("location", "") for e in response.json().get("entry", [])]
            patient = next((loc.split("/_history")[0] for loc in locations if "/Patient/" in loc), "")
            patient_ref = "/".join(patient.split("/")[-2:])
            print(f"{bundle_path.name}: {len(locations)} resources loaded, {patient_ref}")
    return 0


def build_tiny_model(args: argparse.Namespace) -> int:
    """Write the tiny random-weight Gemma3 checkpoint used by tests and the CPU demo."""
    from worker.tiny_model import build_tiny_model as build

    path = build(Path(args.directory), seed=args.seed)
    print(f"tiny Gemma3 checkpoint written to {path}")
    return 0


def worker(args: argparse.Namespace) -> int:
    """Start a Celery worker consuming the text or image model queue."""
    from worker.celery_app import run_worker

    return run_worker(load_settings(), queue=args.queue, concurrency=args.concurrency, pool=args.pool)


def check(args: argparse.Namespace) -> int:
    """Print the configuration (secrets hidden) and whether Redis, the database and FHIR server answer."""
    from cds_service.readiness import readiness_report

    settings = load_settings()
    if args.worker:
        from cds_service.readiness import local_worker_alive

        alive = local_worker_alive(settings)
        print("a model worker on this host answers" if alive else "no model worker on this host answers")
        return 0 if alive else 1
    report = readiness_report(settings, fhir_base=args.fhir_base)
    print(json.dumps(report, indent=2, default=str))
    return 0 if report["ready"] else 1


def demo(args: argparse.Namespace) -> int:
    """Start what is missing, fire both hooks for the demo patient and print the cards."""
    from cds_service.demo import run_demo

    return run_demo(
        port=args.port, keep_running=args.keep_running, wait_s=args.wait, cache_dir=args.cache_dir
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="medgemma-cds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the CDS Hooks API under gunicorn")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--worker-class", choices=["gevent", "gthread"], default="gevent")
    p.add_argument("--connections", type=int, default=1000, help="concurrent requests per gevent worker")
    p.add_argument("--threads", type=int, default=8, help="threads per gthread worker")
    p.set_defaults(func=serve)

    p = sub.add_parser("worker", help="run a Celery model worker")
    p.add_argument("--queue", choices=["text", "image"], required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--pool", choices=["prefork", "threads", "solo"], default="prefork")
    p.set_defaults(func=worker)

    p = sub.add_parser("demo", help="one-command local demo")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--keep-running", action="store_true", help="keep everything running until Ctrl-C")
    p.add_argument("--wait", type=float, default=180.0, help="seconds to wait for the AI card (default 180)")
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="tiny model folder (default ~/.cache/medgemma-cds)"
    )
    p.set_defaults(func=demo)

    p = sub.add_parser("build-tiny-model", help="write a tiny random Gemma3 image-text checkpoint")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=build_tiny_model)

    p = sub.add_parser("load-sample-data", help="load the bundled synthetic patients into a FHIR server")
    p.add_argument("--fhir-base", required=True)
    p.add_argument("--token", default=None, help="bearer token for the FHIR server, if it needs one")
    p.set_defaults(func=load_sample_data)

    p = sub.add_parser("check", help="print configuration and readiness of Redis, database, FHIR server")
    p.add_argument("--fhir-base", default=None)
    p.add_argument(
        "--worker", action="store_true", help="only check that a model worker on this host answers a ping"
    )
    p.set_defaults(func=check)

    p = sub.add_parser("db-upgrade", help="apply database migrations")
    p.set_defaults(func=db_upgrade)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsProblem as problem:
        print(f"medgemma-cds: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
