"""The one-command local demo: start what is missing, fire both hooks for a synthetic patient, show cards.

``medgemma-cds demo`` needs no FHIR server: the prefetch of each call is answered from the sample transaction
Bundle shipped in ``cds_service/data/sample``, as an EHR that prefetches everything would send it. It starts
Redis (when none answers at the configured local address), the API (``medgemma-cds serve``, authentication
off, a SQLite database in a temporary folder) and a text model worker (the tiny random-weight checkpoint
unless ``MEDGEMMA_CDS_TEXT_MODEL``/``IMAGE_MODEL`` name real models), and stops it all on Ctrl-C or at exit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from typing import TextIO
from urllib.parse import parse_qsl
from urllib.parse import urlsplit

import httpx

from cds_service.settings import Settings

SAMPLE_DATA = Path(__file__).parent / "data" / "sample"
DEMO_BUNDLE = SAMPLE_DATA / "Kermit_Trantow_f1a650a5-737e-4fd7-828e-03c3348b9524.json"
DEMO_USER = "Practitioner/demo-clinician"
SANDBOX_URL = "https://sandbox.cds-hooks.org"
DEMO_SERVICES = {"patient-view": "patient-summary", "order-select": "order-review"}
# The demo patient has an active order for hydrochlorothiazide 25 mg; a new order for it is duplicate therapy.
DRAFT_ORDER_ID = "demo-draft-hydrochlorothiazide"
DRAFT_ORDER_CONCEPT = {
    "coding": [
        {
            "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
            "code": "310798",
            "display": "Hydrochlorothiazide 25 MG Oral Tablet",
        }
    ],
    "text": "Hydrochlorothiazide 25 MG Oral Tablet",
}
_TOKEN = re.compile(r"\{\{\s*([A-Za-z.]+)\s*\}\}")
_PATIENT_REFERENCE = {"Patient": "link", "AllergyIntolerance": "patient"}


class DemoError(Exception):
    """A step of the demo could not be done; the message says what to do about it."""


# --- The synthetic patient as prefetch -------------------------------------------------------------------


def sample_resources(bundle_path: Path = DEMO_BUNDLE) -> list[dict[str, Any]]:
    """Return the resources of a sample transaction Bundle with ``urn:uuid:`` references made ``Type/id``.

    A FHIR server assigns ids when it loads the Bundle; the demo keeps the ids the resources carry, which
    are the uuids of their ``fullUrl``.
    """
    bundle = json.loads(bundle_path.read_text())
    references: dict[str, str] = {}
    resources: list[dict[str, Any]] = []
    for entry in bundle["entry"]:
        resource = dict(entry["resource"])
        full_url = entry.get("fullUrl", "")
        resource.setdefault("id", full_url.removeprefix("urn:uuid:") or uuid.uuid4().hex)
        references[full_url] = f"{resource['resourceType']}/{resource['id']}"
        resources.append(resource)

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                key: references.get(value, value)
                if key == "reference" and isinstance(value, str)
                else rewrite(value)
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    return [rewrite(resource) for resource in resources]


def _patient_of(resource: dict[str, Any]) -> str | None:
    holder = resource.get("patient") or resource.get("subject") or {}
    return holder.get("reference") if isinstance(holder, dict) else None


def _status_of(resource: dict[str, Any], parameter: str) -> str | None:
    if parameter == "status":
        return resource.get("status")
    codings = (resource.get("clinicalStatus") or {}).get("coding") or [{}]
    return codings[0].get("code")


def _date_of(resource: dict[str, Any]) -> str:
    period = resource.get("effectivePeriod") or {}
    return str(resource.get("effectiveDateTime") or period.get("start") or resource.get("issued") or "")


def answer_query(query: str, resources: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Answer a rendered prefetch query from resources in memory, as a FHIR server would.

    Reads (``Type/id``) and searches by patient, narrowed by ``status``, ``clinical-status``, ``_sort=-date``
    and ``_count``; other search parameters are ignored (the sample holds one patient). None for a read of
    a resource that isn't there or a query shape this doesn't know.
    """
    path, _, parameters = query.partition("?")
    segments = path.strip("/").split("/")
    if not parameters and len(segments) == 2:
        return next(
            (r for r in resources if r["resourceType"] == segments[0] and r["id"] == segments[1]), None
        )
    if len(segments) != 1:
        return None
    matches = [r for r in resources if r["resourceType"] == segments[0]]
    count: int | None = None
    for name, value in parse_qsl(parameters):
        if name in ("patient", "subject"):
            wanted = value if "/" in value else f"Patient/{value}"
            matches = [r for r in matches if _patient_of(r) == wanted]
        elif name in ("status", "clinical-status"):
            matches = [r for r in matches if _status_of(r, name) in value.split(",")]
        elif name == "_sort" and value.lstrip("-") == "date":
            matches.sort(key=_date_of, reverse=value.startswith("-"))
        elif name == "_count":
            count = int(value)
    total = len(matches)
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in matches[:count]],
    }


def sample_prefetch(
    templates: dict[str, str], patient_id: str, resources: list[dict[str, Any]]
) -> dict[str, Any]:
    """Return the prefetch an EHR would send for these templates (§Prefetch template), from the sample.

    A key whose template needs a token this call doesn't have (e.g. ``context.encounterId``) is left out.
    """
    values = {
        "context.patientId": patient_id,
        "context.userId": DEMO_USER,
        "userPractitionerId": "demo-clinician",
    }
    prefetch: dict[str, Any] = {}
    for key, template in templates.items():
        if any(token not in values for token in _TOKEN.findall(template)):
            continue
        prefetch[key] = answer_query(_TOKEN.sub(lambda m: values[m.group(1)], template), resources)
    return prefetch


def draft_order(patient_id: str) -> dict[str, Any]:
    """Return the draft MedicationRequest the demo selects (§order-select ``draftOrders``)."""
    return {
        "resourceType": "MedicationRequest",
        "id": DRAFT_ORDER_ID,
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": DRAFT_ORDER_CONCEPT,
        "subject": {"reference": f"Patient/{patient_id}"},
        "dosageInstruction": [{"text": "1 tablet by mouth once daily"}],
    }


def hook_bodies(
    discovery: dict[str, Any], bundle_path: Path = DEMO_BUNDLE
) -> list[tuple[str, dict[str, Any]]]:
    """Return (service id, request body) of the demo's two calls: patient-view, then order-select.

    Each service's prefetch comes from its discovery entry: the demo sends what the running service declares.
    """
    resources = sample_resources(bundle_path)
    patient_id = next(r["id"] for r in resources if r["resourceType"] == "Patient")
    calls: list[tuple[str, dict[str, Any]]] = []
    for hook, service_id in DEMO_SERVICES.items():
        for service in discovery["services"]:
            if service["id"] != service_id or service["hook"] != hook:
                continue
            context: dict[str, Any] = {"userId": DEMO_USER, "patientId": patient_id}
            if hook == "order-select":
                context["selections"] = [f"MedicationRequest/{DRAFT_ORDER_ID}"]
                context["draftOrders"] = {
                    "resourceType": "Bundle",
                    "type": "collection",
                    "entry": [{"resource": draft_order(patient_id)}],
                }
            body = {
                "hook": hook,
                "hookInstance": str(uuid.uuid4()),
                "context": context,
                "prefetch": sample_prefetch(service.get("prefetch", {}), patient_id, resources),
            }
            calls.append((service["id"], body))
    return calls


# --- Cards in the terminal -------------------------------------------------------------------------------


class Printer:
    """Writes the demo's output: colour and a self-rewriting progress line on a terminal, plain otherwise."""

    COLOURS = {"critical": "31", "warning": "33", "info": "36", "dim": "2", "bold": "1", "ok": "32"}

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._progress = ""
        self._progress_key = ""

    def style(self, text: str, colour: str) -> str:
        """Return ``text`` in a colour when writing to a terminal."""
        return f"\033[{self.COLOURS[colour]}m{text}\033[0m" if self.tty else text

    def line(self, text: str = "") -> None:
        """Print a line (ending any progress line first)."""
        self.end_progress()
        print(text, file=self.out, flush=True)

    def progress(self, text: str, key: str) -> None:
        """Show a progress line: rewritten in place on a terminal, otherwise printed when ``key`` changes."""
        if self.tty:
            print("\r\033[K" + text, end="", file=self.out, flush=True)
            self._progress = text
        elif key != self._progress_key:
            print(text, file=self.out, flush=True)
            self._progress_key = key

    def end_progress(self) -> None:
        """Finish a progress line on a terminal."""
        if self.tty and self._progress:
            print(file=self.out, flush=True)
        self._progress = ""
        self._progress_key = ""

    def markdown(self, text: str, indent: str) -> None:
        """Print card markdown readably: bold kept as bold on a terminal, paragraphs wrapped and indented."""
        bold = (lambda m: self.style(m.group(1), "bold")) if self.tty else (lambda m: m.group(1))
        for paragraph in text.split("\n\n"):
            for raw in paragraph.splitlines():
                rendered = re.sub(r"\*\*(.+?)\*\*", bold, raw)
                bullet = rendered.startswith("- ")
                wrapped = textwrap.wrap(
                    rendered,
                    width=100,
                    initial_indent=indent,
                    subsequent_indent=indent + ("  " if bullet else ""),
                ) or [indent]
                for line in wrapped:
                    self.line(line)

    def card(self, card: dict[str, Any]) -> None:
        """Print one CDS card: indicator, summary, source, detail, suggestions, links."""
        indicator = card.get("indicator", "info")
        badge = self.style(f"[{indicator.upper()}]", indicator if indicator in self.COLOURS else "info")
        self.line(f"  {badge} {self.style(card['summary'], 'bold')}")
        self.line(self.style(f"      source: {card.get('source', {}).get('label', '?')}", "dim"))
        if card.get("detail"):
            self.markdown(card["detail"], "      ")
        for suggestion in card.get("suggestions", []):
            recommended = " (recommended)" if suggestion.get("isRecommended") else ""
            self.line(f"      suggestion: {suggestion['label']}{recommended}")
            for action in suggestion.get("actions", []):
                target = action.get("resourceId") or ""
                self.line(
                    self.style(f"        {action['type']}: {action['description']} {target}".rstrip(), "dim")
                )
        for reason in card.get("overrideReasons", []):
            self.line(self.style(f"      override reason offered: {reason['display']}", "dim"))
        for link in card.get("links", []):
            self.line(f"      link: {link['label']} -> {link['url']}")
        self.line()


#: Topic codes of the cards that say an AI analysis is still to come (``fhir_mappings.ai_cards.ai_state``).
WAITING_STATES = {"ai-queued", "ai-running", "ai-unavailable"}


def pending_job_url(cards: list[dict[str, Any]]) -> str | None:
    """Return the job status URL of a card saying its AI analysis is still to come, if there is one."""
    for card in cards:
        if card.get("source", {}).get("topic", {}).get("code") in WAITING_STATES:
            for link in card.get("links", []):
                if "/jobs/" in link.get("url", ""):
                    return str(link["url"])
    return None


# --- Processes -------------------------------------------------------------------------------------------


@dataclass
class Child:
    """A process the demo started, in a session of its own so its whole group can be stopped."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    grace_s: float

    def log_tail(self, lines: int = 20) -> str:
        """Return the last lines of the process's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Processes:
    """What the demo started, stopped in reverse order of starting."""

    def __init__(self, printer: Printer, workdir: Path) -> None:
        self.printer = printer
        self.workdir = workdir
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], grace_s: float = 10.0) -> Child:
        """Start ``argv`` with its output in a log file in the work folder."""
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        child = Child(name, process, log_path, grace_s)
        self.children.append(child)
        self.printer.line(f"  started {name} (pid {process.pid})")
        return child

    def stop_all(self) -> None:
        """Stop every started process: its stop signal, then, past its grace time, SIGKILL to its group."""
        for child in reversed(self.children):
            process = child.process
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=child.grace_s)
                except subprocess.TimeoutExpired:
                    self.printer.line(f"  {child.name} did not stop in {child.grace_s:.0f} s; killing it")
            # Leftovers of the group (a Celery pool child, a gunicorn worker) go with it.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
            self.printer.line(f"  stopped {child.name} (pid {process.pid})")
        self.children.clear()

    def check_alive(self) -> None:
        """Raise ``DemoError`` with its log tail when a started process has exited."""
        for child in self.children:
            if child.process.poll() is not None:
                code = child.process.returncode
                raise DemoError(f"{child.name} exited with code {code}; its log ends:\n{child.log_tail()}")


def answers_tcp(host: str, port: int) -> bool:
    """Return whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(
    ready: Callable[[], bool], timeout_s: float, processes: Processes, what: str, interval_s: float = 0.2
) -> None:
    """Wait until ``ready()``; raise ``DemoError`` on timeout or when a started process dies meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        processes.check_alive()
        if time.monotonic() > deadline:
            raise DemoError(f"{what} did not come up within {timeout_s:.0f} s")
        time.sleep(interval_s)


def medgemma_cds_command() -> list[str]:
    """Return the argv prefix that runs this installation's ``medgemma-cds``."""
    script = Path(sys.executable).parent / "medgemma-cds"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cds_service.cli"]


def ensure_redis(redis_url: str, processes: Processes) -> bool:
    """Make sure Redis answers at ``redis_url``, starting ``redis-server`` there if not; True if started."""
    parts = urlsplit(redis_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if answers_tcp(host, port):
        processes.printer.line(f"  Redis: {host}:{port} answers, using it")
        return False
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise DemoError(
            f"Redis at {host}:{port} doesn't answer (MEDGEMMA_CDS_REDIS_URL); start it or unset it"
        )
    server = shutil.which("redis-server")
    if server is None:
        raise DemoError(
            "no Redis answers and redis-server is not installed (e.g. apt-get install redis-server)"
        )
    processes.start(
        "redis-server",
        [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        dict(os.environ),
        grace_s=5,
    )
    wait_until(lambda: answers_tcp(host, port), 10, processes, "redis-server")
    return True


def model_settings(settings: Settings, cache_dir: Path, processes: Processes) -> dict[str, str]:
    """Return the model environment: the configured models, or the tiny checkpoint built in ``cache_dir``."""
    if {"text_model", "image_model"} & settings.model_fields_set:
        processes.printer.line(
            f"  models: text {settings.text_model}, image {settings.image_model} (configured)"
        )
        return {}
    tiny = cache_dir / "tiny-gemma3"
    if not (tiny / "config.json").exists():
        processes.printer.line(f"  building the tiny random-weight Gemma3 checkpoint in {tiny} (once)")
        tiny.parent.mkdir(parents=True, exist_ok=True)
        built = subprocess.run(
            [*medgemma_cds_command(), "build-tiny-model", str(tiny)],
            capture_output=True,
            text=True,
            check=False,
        )
        if built.returncode != 0:
            raise DemoError(f"building the tiny model failed:\n{built.stderr[-2000:]}")
    processes.printer.line(
        "  models: tiny random-weight Gemma3 (its text is noise; set MEDGEMMA_CDS_TEXT_MODEL for MedGemma)"
    )
    env = {"MEDGEMMA_CDS_TEXT_MODEL": str(tiny), "MEDGEMMA_CDS_IMAGE_MODEL": str(tiny)}
    if "device" not in settings.model_fields_set:
        env["MEDGEMMA_CDS_DEVICE"] = "cpu"
    return env


def api_answers(url: str) -> bool:
    """Return whether the CDS service at ``url`` answers its discovery endpoint."""
    try:
        return httpx.get(f"{url}/cds-services", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def workers_on(settings: Settings, queue: str) -> list[str]:
    """Return the Celery workers consuming a model queue (empty when none answers within a second)."""
    from cds_service.jobs import QUEUES
    from worker.celery_app import make_celery

    celery = make_celery(settings)
    try:
        active = celery.control.inspect(timeout=1).active_queues() or {}
    except Exception:  # noqa: BLE001 - no answer means no worker to reuse
        return []
    finally:
        celery.close()
    return sorted(name for name, queues in active.items() if any(q["name"] == QUEUES[queue] for q in queues))


# --- The demo --------------------------------------------------------------------------------------------


def fire(http: httpx.Client, url: str, service_id: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST a hook call (a fresh ``hookInstance`` each time); return its cards, ``DemoError`` unless 200."""
    body = {**body, "hookInstance": str(uuid.uuid4())}
    response = http.post(f"{url}/cds-services/{service_id}", json=body)
    if response.status_code != 200:
        raise DemoError(f"{service_id} answered {response.status_code}: {response.text[:500]}")
    return list(response.json()["cards"])


def await_ai_card(
    http: httpx.Client,
    url: str,
    service_id: str,
    body: dict[str, Any],
    job_url: str,
    wait_s: float,
    printer: Printer,
) -> tuple[list[dict[str, Any]], str]:
    """Re-fire a hook once its job is over; return the AI cards it then answers and an outcome line.

    Meanwhile the job's state is read from its status URL and shown. After ``wait_s`` seconds the hook is
    fired once more whatever the state (the job keeps running in the worker).
    """
    started = time.monotonic()
    spinner = "|/-\\"
    tick = 0
    while True:
        elapsed = time.monotonic() - started
        try:
            state = http.get(job_url).json().get("state", "?")
        except (httpx.HTTPError, ValueError):
            state = "?"
        hint = " (waiting for a worker to load the model)" if state == "queued" else ""
        printer.progress(f"  {spinner[tick % 4]} {service_id}: AI job {state}{hint}, {elapsed:.0f} s", state)
        tick += 1
        if state in ("done", "failed") or elapsed > wait_s:
            cards = fire(http, url, service_id, body)
            break
        time.sleep(1.0)
    printer.end_progress()
    ai_cards = [c for c in cards if c.get("source", {}).get("label", "").startswith("MedGemma AI")]
    if ai_cards:
        return ai_cards, f"AI card arrived after {time.monotonic() - started:.0f} s:"
    if pending_job_url(cards) is None:
        try:
            record = http.get(job_url).json()
        except (httpx.HTTPError, ValueError):
            record = {"state": "gone"}
        if record.get("state") == "done":
            return [], "AI analysis finished with nothing to add (no AI card for this call)."
        error = record.get("error", f"job {record.get('state')}")
        return [], f"AI analysis failed ({error}); the rule cards above stand on their own."
    return [], (
        f"AI analysis still running after {wait_s:.0f} s. Follow it at {job_url} and fire the hook again "
        "(or run the demo with a longer --wait)."
    )


def run_demo(
    port: int,
    *,
    once: bool = False,
    wait_s: float = 180.0,
    cache_dir: Path | None = None,
    out: TextIO | None = None,
) -> int:
    """Run the local demo on ``port``; return 0 once both hooks answered (also when stopped with Ctrl-C).

    Everything the demo started is stopped before it returns, whichever way it ends.
    """
    printer = Printer(out or sys.stdout)
    keep_running = not once
    settings = Settings()
    cache_dir = cache_dir or Path.home() / ".cache" / "medgemma-cds"
    workdir = Path(tempfile.mkdtemp(prefix="medgemma-cds-demo-"))
    processes = Processes(printer, workdir)
    try:
        with _stop_on_sigterm():
            return _run(settings, port, keep_running, wait_s, cache_dir, workdir, processes, printer)
    except KeyboardInterrupt:
        printer.line()
        printer.line("interrupted: stopping what the demo started")
        return 0 if keep_running else 130
    except DemoError as error:
        printer.line(printer.style(f"demo failed: {error}", "critical"))
        return 1
    finally:
        processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the duration, so a terminated demo still cleans up."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(
    settings: Settings,
    port: int,
    keep_running: bool,
    wait_s: float,
    cache_dir: Path,
    workdir: Path,
    processes: Processes,
    printer: Printer,
) -> int:
    url = f"http://127.0.0.1:{port}"
    printer.line(printer.style("MedGemma CDS demo", "bold"))
    redis_url = settings.redis_url
    own_redis = ensure_redis(redis_url, processes)
    env = dict(os.environ) | model_settings(settings, cache_dir, processes)
    env |= {
        "MEDGEMMA_CDS_REDIS_URL": redis_url,
        "MEDGEMMA_CDS_DATABASE_URL": f"sqlite:///{workdir / 'demo.db'}",
        "MEDGEMMA_CDS_PUBLIC_URL": url,
        "MEDGEMMA_CDS_AUTH_DISABLED": "true",
        # Shared by the API and the worker: job requests in Redis are encrypted with a key derived from it.
        "MEDGEMMA_CDS_SECRET_KEY": settings.secret_key.get_secret_value(),
    }
    command = medgemma_cds_command()
    # A Redis the demo just started has no workers to ask about.
    existing = [] if own_redis else workers_on(settings, "text")
    if existing and {"text_model", "image_model"} & settings.model_fields_set:
        printer.line(f"  model worker: using {', '.join(existing)}")
    else:
        if existing:
            printer.line(f"  note: other workers consume the text queue too ({', '.join(existing)})")
        processes.start(
            "worker", [*command, "worker", "--queue", "text", "--concurrency", "1"], env, grace_s=5
        )
    if answers_tcp("127.0.0.1", port):
        if not api_answers(url):
            raise DemoError(f"port {port} is taken by something else; choose another with --port")
        printer.line(
            f"  API: a CDS service already answers on {url}, using it (it must run with AUTH_DISABLED)"
        )
    else:
        processes.start(
            "api", [*command, "serve", "--port", str(port), "--workers", "1", "--threads", "4"], env
        )
        wait_until(lambda: api_answers(url), 60, processes, "the API")

    with httpx.Client(timeout=30) as http:
        discovery = http.get(f"{url}/cds-services").json()
        calls = hook_bodies(discovery)
        if len(calls) != len(DEMO_SERVICES):
            raise DemoError(f"the service at {url} doesn't offer {', '.join(DEMO_SERVICES.values())}")
        patient = next(r for r in sample_resources() if r["resourceType"] == "Patient")
        name = patient["name"][0]
        printer.line()
        printer.line(
            f"Demo patient: {' '.join(name.get('prefix', []) + name.get('given', []))} {name['family']} "
            f"(Patient/{patient['id']}), synthetic (Synthea); draft order: {DRAFT_ORDER_CONCEPT['text']}"
        )
        pending: list[tuple[str, dict[str, Any], str]] = []
        for service_id, body in calls:
            printer.line()
            printer.line(printer.style(f"== {body['hook']} -> {service_id} ".ljust(70, "="), "bold"))
            cards = fire(http, url, service_id, body)
            if not cards:
                printer.line("  (no cards)")
            for card in cards:
                printer.card(card)
            job_url = pending_job_url(cards)
            if job_url:
                pending.append((service_id, body, job_url))
        for service_id, body, job_url in pending:
            printer.line()
            printer.line(printer.style(f"== {service_id}: waiting for the AI card ".ljust(70, "="), "bold"))
            ai_cards, outcome = await_ai_card(http, url, service_id, body, job_url, wait_s, printer)
            printer.line("  " + outcome)
            for card in ai_cards:
                printer.card(card)

    printer.line()
    printer.line(printer.style("URLs", "bold"))
    printer.line(f"  discovery:  {url}/cds-services")
    for service_id, _, job_url in pending:
        printer.line(f"  job status: {job_url}  ({service_id})")
    printer.line(f"  metrics:    {url}/metrics")
    printer.line(
        f"  CDS Hooks sandbox: open {SANDBOX_URL}, choose 'CDS Services' > 'Add CDS Service' and enter "
        f"{url}/cds-services (the sandbox calls from your browser, so a local URL works while the demo runs "
        "until you stop it; authentication is off in the demo)"
    )
    if keep_running:
        printer.line()
        printer.line("Running. Press Ctrl-C to stop everything the demo started.")
        while True:
            processes.check_alive()
            time.sleep(1)
    return 0
