"""The ``medgemma-cds`` command line: one subcommand per thing an operator or developer runs."""

from __future__ import annotations

import argparse
import difflib
import gc
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from collections.abc import Sequence
from datetime import date
from datetime import time as dt_time
from pathlib import Path
from typing import Any

from cds_service.settings import ENV_PREFIX
from cds_service.settings import Settings
from cds_service.settings import SettingsProblem
from cds_service.settings import check_production_safety
from cds_service.settings import load_settings

SAMPLE_DATA = Path(__file__).parent / "data" / "sample"


def tune_gc() -> None:
    """Tune the garbage collector for serving: freeze what the app loaded, collect young objects less often.

    A hook allocates tens of thousands of short-lived objects (JSON, read models, cards), nearly all freed by
    reference counting; at CPython's default threshold the cyclic collector ran several times per call and
    cost about a fifth of it (bench/profile_hook.py). What a collection scans is what survived since the last
    one (parsed prefetch in the process's cache), so its pause grows with the threshold while its total cost
    does not: at 5,000 a collection comes every few hundred calls and takes under about 10 ms of CPU, where
    50,000 meant one of 60 ms. Frozen objects (modules, the registry, the drug vocabulary) are never scanned.
    """
    gc.freeze()
    gc.set_threshold(5_000, 10, 10)


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
    # create_app checks this too, but in gunicorn's workers, where a refusal is a traceback, not one line.
    check_production_safety(settings)
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
            if args.worker_class == "gevent":
                # One request per connection ("Connection: close"): a gevent worker only accepts while its
                # hub is free, so each request goes to a process that is not busy with another one. Kept
                # alive, a connection stays with the process that first accepted it however busy that one
                # is, and the unlucky connections' requests queue behind a whole process's share of the load
                # (the tail measured in docs/benchmarks.md). gunicorn already accepts one at a time per wake.
                self.cfg.set("keepalive", 0)
            self.cfg.set("post_worker_init", start_serving)
            # However the worker ends (SIGTERM, SIGINT, SIGQUIT), the audit rows it holds are written first.
            self.cfg.set("worker_exit", lambda arbiter, worker: close_audit(getattr(worker, "wsgi", None)))
            self.cfg.set("timeout", 60)
            self.cfg.set("accesslog", None)
            # gunicorn's control socket sits at one path per user ($HOME/.gunicorn/gunicorn.ctl): a second
            # instance on the machine would take it over from the first. Nothing here uses gunicornc.
            self.cfg.set("control_socket_disable", True)

        def load(self) -> Any:
            return create_app(settings)

    try:
        Gunicorn().run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def start_serving(worker: Any) -> None:
    """In each gunicorn worker once its app is loaded: tune the collector, start the write-back outbox."""
    tune_gc()
    services = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("cds")
    if services is not None:
        services.outbox.start()


def close_audit(app: Any) -> None:
    """Write a served app's pending hook audit rows (gunicorn's ``worker_exit``; no app: nothing served)."""
    services = getattr(app, "extensions", {}).get("cds")
    if services is not None:
        services.audit.close()


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
        if args.pacs:
            from cds_service.sample_pacs import dicomweb_root_of
            from cds_service.sample_pacs import load_sample_study

            root = args.pacs_dicomweb or dicomweb_root_of(args.pacs)
            print(load_sample_study(http, base, args.pacs, root))
    return 0


def build_tiny_model(args: argparse.Namespace) -> int:
    """Write the tiny random-weight Gemma3 checkpoint used by tests and the CPU demo."""
    from worker.tiny_model import build_tiny_model as build

    if args.vocab == "one-short" and not args.text_only:
        print("medgemma-cds build-tiny-model: --vocab one-short needs --text-only", file=sys.stderr)
        return 2
    path = build(Path(args.directory), seed=args.seed, text_only=args.text_only, vocab=args.vocab)
    print(f"tiny Gemma3 checkpoint written to {path}")
    return 0


def worker(args: argparse.Namespace) -> int:
    """Start a Celery worker consuming the text or image model queue."""
    from worker.celery_app import run_worker
    from worker.runtime import PlacementError

    settings = load_settings()
    # A worker with another secret than the API's can read none of its jobs: refused here in one line.
    check_production_safety(settings)
    try:
        return run_worker(settings, queue=args.queue, concurrency=args.concurrency, pool=args.pool)
    except PlacementError as problem:
        print(f"medgemma-cds worker: {problem}", file=sys.stderr)
        return 2


def check(args: argparse.Namespace) -> int:
    """Print the configuration (secrets hidden) and whether Redis, the database and FHIR server answer."""
    from cds_service.readiness import readiness_report

    settings = load_settings()
    if args.worker:
        from cds_service.readiness import local_worker_alive
        from worker.celery_app import local_placements

        alive = local_worker_alive(settings)
        print("a model worker on this host answers" if alive else "no model worker on this host answers")
        for line in local_placements(settings) if alive else []:
            print(line)
        return 0 if alive else 1
    if args.scheduler:
        from cds_service.readiness import scheduler_alive

        alive = scheduler_alive(settings)
        print(
            "the precompute scheduler is waiting for its next sweep" if alive else "no precompute scheduler"
        )
        return 0 if alive else 1
    report = readiness_report(settings, fhir_base=args.fhir_base)
    print(json.dumps(report, indent=2, default=str))
    return 0 if report["ready"] else 1


def parse_rate(text: str) -> float:
    """Return a rate given as ``N/s`` or ``N`` (per second); argparse reports a ValueError as bad usage."""
    value = float(text.strip().removesuffix("/s"))
    if value <= 0:
        raise ValueError("the rate must be above 0")
    return value


def parse_clock(text: str) -> dt_time:
    """Return a local time of day given as ``HH:MM``."""
    return dt_time.fromisoformat(text)


def precompute(args: argparse.Namespace) -> int:
    """Sweep a day's booked and arrived Appointments and queue each patient's AI pre-visit summary, at
    low priority and at most ``--rate`` patients a second; with ``--daily-at``, every day at that time."""
    from cds_service.precompute import SweepReport
    from cds_service.precompute import run_daily
    from cds_service.precompute import run_sweep

    settings = load_settings()
    check_production_safety(settings)  # its jobs are encrypted for the workers with the shared secret

    def progress(report: SweepReport, done: int) -> None:
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(report.outcomes.items()))
        print(f"{report.day.isoformat()}: {done}/{report.patients} patients ({counts})", flush=True)

    def summary(report: SweepReport) -> None:
        print(report.line(), flush=True)

    if args.daily_at is not None:
        print(
            f"sweeping each day's appointments at {args.daily_at.strftime('%H:%M')} (local time)", flush=True
        )
        run_daily(
            settings, args.fhir_base, args.daily_at, token=args.token, rate=args.rate, progress=progress,
            on_report=summary,
        )  # fmt: skip
        return 0
    from cds_service.fhir_client import FhirReadError

    try:
        report = run_sweep(
            settings, args.fhir_base, args.date or date.today(), token=args.token, rate=args.rate,
            progress=progress,
        )  # fmt: skip
    except FhirReadError as error:
        print(f"medgemma-cds: the appointments could not be read: {error.detail}", file=sys.stderr)
        return 1
    summary(report)
    return 0


def subscribe(args: argparse.Namespace) -> int:
    """Create the FHIR R4 Subscriptions (rest-hook, one per imaging resource type) that notify us."""
    import httpx

    from cds_service.precompute import subscribe as create_subscriptions

    settings = load_settings()
    secret = settings.fhir_subscription_secret.get_secret_value() if settings.fhir_subscription_secret else ""
    if not secret:
        print(
            "medgemma-cds: set MEDGEMMA_CDS_FHIR_SUBSCRIPTION_SECRET first (the notifications carry it)",
            file=sys.stderr,
        )
        return 2
    endpoint = args.endpoint or f"{settings.public_url.rstrip('/')}/fhir-notifications/imaging"
    try:
        with httpx.Client(timeout=30) as http:
            done = create_subscriptions(args.fhir_base, args.token, endpoint, secret, http)
    except httpx.HTTPError as error:
        print(
            f"medgemma-cds: the FHIR server refused a Subscription ({type(error).__name__})", file=sys.stderr
        )
        return 1
    for criteria, reference, what in done:
        print(f"{reference} {what}: {criteria} -> {endpoint}")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Start what is missing and show the whole loop for a synthetic patient."""
    from cds_service.demo import run_demo

    return run_demo(port=args.port, once=args.once, wait_s=args.wait, cache_dir=args.cache_dir)


def token(args: argparse.Namespace) -> int:
    """Print a JWT for one service's URL, signed by the local development issuer."""
    from cds_service.dev_issuer import mint_token

    settings = load_settings()
    print(
        mint_token(f"{settings.public_url.rstrip('/')}/cds-services/{args.service}", lifetime_s=args.lifetime)
    )
    return 0


def call(args: argparse.Namespace) -> int:
    """Fire a hook with a bundled example request, signed by the development issuer, and print the cards."""
    import httpx

    from cds_service.demo import Printer
    from cds_service.examples import CallProblem
    from cds_service.examples import call_service
    from cds_service.examples import example_names

    if args.list or args.service is None:
        for name in example_names():
            print(name)
        return 0
    settings = load_settings()
    try:
        with httpx.Client(timeout=60) as http:
            cards = call_service(
                http, args.url or settings.public_url, settings.public_url, args.service, args.example
            )
    except CallProblem as problem:
        print(f"medgemma-cds: {problem}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"cards": cards}, indent=2))
        return 0
    printer = Printer(sys.stdout)
    if not cards:
        printer.line("(no cards: checked, nothing to say)")
    for card in cards:
        printer.card(card)
    return 0


def init_secret(args: argparse.Namespace) -> int:
    """Write a random secret key to a file once (mode 0600), for services that read SECRET_KEY_FILE."""
    import secrets

    path: Path = args.path
    if path.is_file() and path.read_text(encoding="utf-8").strip():
        print(f"secret key kept: {path} exists")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.write(secrets.token_urlsafe(48) + "\n")
    print(f"secret key written to {path}")
    return 0


def version() -> str:
    """Return the installed version of medgemma-cds."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("medgemma-cds")
    except PackageNotFoundError:
        return "unknown (not installed)"


def default_port() -> int:
    """Return the port ``serve`` binds by default: ``$PORT`` when set (as gunicorn and PaaS hosts read it),
    else 8080."""
    return int(os.environ.get("PORT") or 8080)


DESCRIPTION = """\
CDS Hooks 2.0 clinical decision support backed by MedGemma.

Settings come from MEDGEMMA_CDS_* environment variables (docs/configuration.md); a malformed one stops every
command with one line naming it. Run `medgemma-cds COMMAND --help` for a command's options.
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, unless it has none to show (unset, a flag off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="medgemma-cds", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"medgemma-cds {version()}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    def command(name: str, purpose: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=purpose, description=purpose[0].upper() + purpose[1:] + ".",
            formatter_class=HelpFormatter,
        )  # fmt: skip

    p = command("serve", "run the CDS Hooks API under gunicorn (migrates the database first)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=default_port(), help="port to listen on ($PORT when set)")
    # Two processes per core: the hook path is CPU-bound Python, and a gevent worker doesn't preempt a busy
    # greenlet, so more processes (the OS does preempt) keep the tail short (bench/bench_hooks.py).
    p.add_argument(
        "--workers", type=int, default=max(2, 2 * (os.cpu_count() or 1)), help="gunicorn worker processes"
    )
    p.add_argument(
        "--worker-class", choices=["gevent", "gthread"], default="gevent", help="gunicorn worker type"
    )
    p.add_argument("--connections", type=int, default=100, help="concurrent requests per gevent worker")
    p.add_argument("--threads", type=int, default=8, help="threads per gthread worker")
    p.set_defaults(func=serve)

    p = command("worker", "run a Celery model worker on the text or the image queue")
    p.add_argument("--queue", choices=["text", "image"], required=True, help="which model queue to consume")
    p.add_argument("--concurrency", type=int, default=1, help="tasks run at once (batched on a GPU)")
    p.add_argument(
        "--pool", choices=["prefork", "threads", "solo"], default="prefork",
        help="Celery pool: threads batches concurrent tasks into one generate call (GPU)",
    )  # fmt: skip
    p.set_defaults(func=worker)

    p = command(
        "demo", "show the whole loop on this machine: hooks, AI cards, a draft signed, the report read back"
    )
    p.add_argument("--port", type=int, default=8080, help="port of the API the demo starts (or finds)")
    p.add_argument("--once", action="store_true", help="stop everything after the loop instead of at Ctrl-C")
    p.add_argument("--wait", type=float, default=180.0, help="seconds to wait for each AI card")
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="tiny model folder (default: ~/.cache/medgemma-cds)"
    )
    p.set_defaults(func=demo)

    p = command(
        "token", "print a short-lived JWT from the local development issuer (trusted in development mode)"
    )
    p.add_argument(
        "--service", required=True, help="service id: the token's aud is {PUBLIC_URL}/cds-services/ID"
    )
    p.add_argument("--lifetime", type=int, default=300, help="seconds the token is valid")
    p.set_defaults(func=token)

    p = command("call", "fire a hook with a bundled example request (development issuer) and print the cards")
    p.add_argument("service", nargs="?", default=None, help="service id, e.g. order-review")
    p.add_argument("--example", default=None, help="example request name (default: the first for the hook)")
    p.add_argument("--url", default=None, help="base URL of the service (default: MEDGEMMA_CDS_PUBLIC_URL)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument("--list", action="store_true", help="list the example requests and exit")
    p.set_defaults(func=call)

    p = command(
        "build-tiny-model",
        "write the tiny random-weight Gemma3 checkpoint used by the tests and the CPU demo",
    )
    p.add_argument("directory", help="folder to write the checkpoint into (created)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--text-only", action="store_true", help="a text-only Gemma3ForCausalLM, like medgemma-27b-text-it"
    )
    p.add_argument(
        "--vocab",
        choices=["padded", "one-short"],
        default="padded",
        help="model vocabulary vs tokenizer: padded past it (medgemma-4b-it) or one entry short (text only)",
    )
    p.set_defaults(func=build_tiny_model)

    p = command("load-sample-data", "load the bundled synthetic patients into a FHIR server (once)")
    p.add_argument("--fhir-base", required=True, help="FHIR R4 base URL, e.g. http://localhost:8081/fhir")
    p.add_argument("--token", default=None, help="bearer token for the FHIR server, if it needs one")
    p.add_argument(
        "--pacs",
        default=None,
        help="Orthanc REST base (http://[user:password@]host:8042) to store the sample radiograph in, named "
        "in FHIR by an ImagingStudy and a DICOMweb Endpoint",
    )
    p.add_argument(
        "--pacs-dicomweb",
        default=None,
        help="the PACS's DICOMweb root as workers reach it (default: PACS/dicom-web)",
    )
    p.set_defaults(func=load_sample_data)

    p = command("precompute", "queue the AI pre-visit summaries of a day's appointments (low priority)")
    p.add_argument("--fhir-base", required=True, help="FHIR server holding the Appointments and the records")
    p.add_argument("--date", type=date.fromisoformat, default=None, help="YYYY-MM-DD (default: today)")
    p.add_argument("--token", default=None, help="bearer token for the FHIR server, if it needs one")
    p.add_argument("--rate", type=parse_rate, default=5.0, help="patients per second, N/s")
    p.add_argument(
        "--daily-at", type=parse_clock, default=None, help="HH:MM: keep running, sweep each day at that time"
    )
    p.set_defaults(func=precompute)

    p = command("subscribe", "create the FHIR Subscriptions that notify new imaging")
    p.add_argument("--fhir-base", required=True, help="FHIR R4 base URL of the server to subscribe to")
    p.add_argument("--token", default=None, help="bearer token for the FHIR server, if it needs one")
    p.add_argument(
        "--endpoint",
        default=None,
        help="notification URL the FHIR server can reach (default: {PUBLIC_URL}/fhir-notifications/imaging)",
    )
    p.set_defaults(func=subscribe)

    p = command(
        "check", "print the configuration and the readiness of Redis, the database, a FHIR server, workers"
    )
    p.add_argument("--fhir-base", default=None, help="also check this FHIR server answers (its /metadata)")
    p.add_argument(
        "--worker", action="store_true", help="only check that a model worker on this host answers a ping"
    )
    p.add_argument(
        "--scheduler", action="store_true", help="only check that a precompute --daily-at scheduler runs"
    )
    p.set_defaults(func=check)

    p = command("init-secret", "write a random secret key to a file once (docker compose's init service)")
    p.add_argument("path", type=Path, help="file to write; kept as it is when it already holds a key")
    p.set_defaults(func=init_secret)

    p = command("db-upgrade", "apply the database migrations")
    p.set_defaults(func=db_upgrade)
    return parser


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """Return one line per ``MEDGEMMA_CDS_*`` variable that names no setting, with the closest known name."""
    suffixes = [name.upper() for name in Settings.model_fields]
    known = [f"{ENV_PREFIX}{suffix}" for suffix in suffixes]
    lines = []
    for variable in sorted(environ):
        name = variable.upper()
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        # Compared without the shared prefix, which would make every name look close.
        closest = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, n=1, cutoff=0.6)
        hint = (
            f"; did you mean {ENV_PREFIX}{closest[0]}?"
            if closest
            else " (docs/configuration.md lists the settings)"
        )
        lines.append(f"medgemma-cds: {variable} is not a setting and is ignored{hint}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    for line in unknown_settings(os.environ):
        print(line, file=sys.stderr)
    try:
        return int(args.func(args))
    except SettingsProblem as problem:
        print(f"medgemma-cds: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
