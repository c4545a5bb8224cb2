"""The one-command local demo: the whole loop for synthetic patients, from hook to signed report.

``medgemma-cds demo`` starts what is missing: Redis (when none answers at the configured local address), a
FHIR server (sekmet-fhir, with the sample patients and a chest X-ray), the API (``medgemma-cds serve`` in
development mode, SQLite in a temporary folder) and a text and an image worker (the tiny random-weight
checkpoint unless ``MEDGEMMA_CDS_TEXT_MODEL``/``IMAGE_MODEL`` name real models). It fires patient-view,
order-select (a draft order that duplicates an active drug) and patient-view for the patient with the chest
X-ray, shows the cards and the AI cards as they arrive, has the imaging draft signed through the development
review link, and reads the final report and its Provenance back from the FHIR server. It stays up until
Ctrl-C (``--once`` signs the draft itself and stops), and stops all it started whichever way it ends.

The sample as prefetch (``hook_bodies``) serves the benchmarks and tests that call without a FHIR server.
"""

from __future__ import annotations

import base64
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

from cds_service.dev_issuer import mint_token
from cds_service.settings import Settings

SAMPLE_DATA = Path(__file__).parent / "data" / "sample"
DEMO_BUNDLE = SAMPLE_DATA / "Kermit_Trantow_f1a650a5-737e-4fd7-828e-03c3348b9524.json"
DEMO_USER = "Practitioner/demo-clinician"
DEMO_SIGNER = "Dr Demo Clinician"
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


# --- The demo's FHIR server ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FhirServer:
    """The demo's FHIR R4 server (sekmet-fhir): the synthetic patients, a chest X-ray, and where signed
    reports are written back to and read from."""

    base: str
    token: str
    patients: dict[str, str]

    def headers(self) -> dict[str, str]:
        """Return the headers of a request to the server."""
        return {"Authorization": f"Bearer {self.token}", "Accept": "application/fhir+json"}

    def access(self, patient_id: str) -> dict[str, Any]:
        """Return the ``fhirServer`` and ``fhirAuthorization`` an EHR sends (§FHIR Resource Access)."""
        authorization = {
            "access_token": self.token,
            "token_type": "Bearer",
            "expires_in": 3600,
            "scope": "patient/*.read",
            "subject": "medgemma-cds-demo",
            "patient": patient_id,
        }
        return {"fhirServer": self.base, "fhirAuthorization": authorization}


def free_port() -> int:
    """Return a TCP port free on the loopback interface now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_fhir_server(processes: Processes, workdir: Path, http: httpx.Client) -> FhirServer:
    """Start sekmet-fhir on a free port; load the sample patients and Louis Erdman's chest X-ray."""
    sekmet = Path(sys.executable).parent / "sekmet"
    if not sekmet.exists():
        raise DemoError("the demo's FHIR server is sekmet-fhir: pip install -e '.[demo]'")
    port, token = free_port(), uuid.uuid4().hex
    base = f"http://127.0.0.1:{port}/fhir"
    config = {
        "base_url": base,
        "host": "127.0.0.1",
        "port": port,
        "data_dir": str(workdir / "fhir"),
        "simulator": {"enabled": False},
        "log_inbound": False,
        "validation": {"inbound": "off"},
        "server_auth": {"types": ["bearer"], "tokens": [token]},
    }
    (workdir / "fhir").mkdir()
    (workdir / "fhir.yaml").write_text(json.dumps(config))
    processes.start("fhir-server", [str(sekmet), "serve", "-c", str(workdir / "fhir.yaml")], dict(os.environ))

    def answers() -> bool:
        try:
            return (
                http.get(f"{base}/metadata", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            )
        except httpx.HTTPError:
            return False

    wait_until(answers, 90, processes, "the FHIR server")
    loaded = subprocess.run(
        [*medgemma_cds_command(), "load-sample-data", "--fhir-base", base, "--token", token],
        capture_output=True,
        text=True,
        check=False,
    )
    if loaded.returncode != 0:
        raise DemoError(f"loading the sample patients failed:\n{loaded.stderr[-2000:]}")
    server = FhirServer(base, token, {})
    patients = {}
    for family in ("Trantow", "Erdman"):
        found = http.get(f"{base}/Patient", params={"family": family}, headers=server.headers()).json()
        patients[family] = found["entry"][0]["resource"]["id"]
    server = FhirServer(base, token, patients)
    attach_chest_xray(http, server, patients["Erdman"])
    processes.printer.line(
        f"  FHIR server: {base} (sekmet-fhir), the synthetic patients and a chest X-ray loaded"
    )
    return server


def attach_chest_xray(http: httpx.Client, fhir: FhirServer, patient_id: str) -> None:
    """Give the patient's ImagingStudy its image: a Binary PNG and a Media pointing at it (as a PACS bridge
    would), so imaging-report-draft has an image to read."""
    studies = http.get(
        f"{fhir.base}/ImagingStudy", params={"patient": patient_id}, headers=fhir.headers()
    ).json()
    study = studies["entry"][0]["resource"]["id"]
    png = (SAMPLE_DATA / "cxr-00000001_000.png").read_bytes()

    def post(resource: dict[str, Any]) -> dict[str, Any]:
        response = http.post(f"{fhir.base}/{resource['resourceType']}", json=resource, headers=fhir.headers())
        response.raise_for_status()
        return dict(response.json())

    binary = post(
        {"resourceType": "Binary", "contentType": "image/png", "data": base64.b64encode(png).decode()}
    )
    post(
        {
            "resourceType": "Media",
            "status": "completed",
            "subject": {"reference": f"Patient/{patient_id}"},
            "partOf": [{"reference": f"ImagingStudy/{study}"}],
            "createdDateTime": "2018-04-13T16:30:00+00:00",
            "content": {"contentType": "image/png", "url": f"Binary/{binary['id']}"},
        }
    )


def demo_calls(fhir: FhirServer) -> list[tuple[str, dict[str, Any]]]:
    """Return (service id, request body) of the demo's calls: Kermit Trantow's chart (summary) and a draft
    order that duplicates his hydrochlorothiazide, then Louis Erdman's chart (his chest X-ray, unreported).

    No prefetch: the service reads what it needs from the FHIR server with the token, as it does for an EHR
    that prefetches nothing.
    """
    kermit, louis = fhir.patients["Trantow"], fhir.patients["Erdman"]
    order_context = {
        "selections": [f"MedicationRequest/{DRAFT_ORDER_ID}"],
        "draftOrders": {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": draft_order(kermit)}],
        },
    }
    calls = [
        ("patient-summary", "patient-view", kermit, {}),
        ("order-review", "order-select", kermit, order_context),
        ("imaging-report-draft", "patient-view", louis, {}),
    ]
    return [
        (
            service_id,
            {
                "hook": hook,
                "hookInstance": str(uuid.uuid4()),
                **fhir.access(patient_id),
                "context": {"userId": DEMO_USER, "patientId": patient_id, **extra},
            },
        )
        for service_id, hook, patient_id, extra in calls
    ]


# --- The demo --------------------------------------------------------------------------------------------


def signed_headers(public_url: str, path: str) -> dict[str, str]:
    """Return the Authorization header of a call to ``path``, signed by the development issuer."""
    return {"Authorization": f"Bearer {mint_token(public_url + path)}"}


def fire(http: httpx.Client, url: str, service_id: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST a hook call (a fresh ``hookInstance`` each time); return its cards, ``DemoError`` unless 200."""
    body = {**body, "hookInstance": str(uuid.uuid4())}
    path = f"/cds-services/{service_id}"
    response = http.post(url + path, json=body, headers=signed_headers(url, path))
    if response.status_code != 200:
        raise DemoError(f"{service_id} answered {response.status_code}: {response.text[:500]}")
    return list(response.json()["cards"])


def is_ai_result(card: dict[str, Any]) -> bool:
    """Return whether a card is the model's own (its source names the model)."""
    return str(card.get("source", {}).get("label", "")).startswith("MedGemma AI")


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
        printer.progress(f"  {spinner[tick % 4]} {service_id}: AI analysis {state}, {elapsed:.0f} s", state)
        tick += 1
        if state in ("done", "failed") or elapsed > wait_s:
            cards = fire(http, url, service_id, body)
            break
        time.sleep(1.0)
    printer.end_progress()
    ai_cards = [c for c in cards if is_ai_result(c)]
    if ai_cards:
        return ai_cards, f"AI card arrived after {time.monotonic() - started:.0f} s:"
    states = [c for c in cards if str(c.get("source", {}).get("topic", {}).get("code", "")).startswith("ai-")]
    if states and pending_job_url(cards) is None:
        return states, "The AI analysis did not give a card:"
    if pending_job_url(cards) is None:
        return [], "AI analysis finished with nothing to add (no AI card for this call)."
    return [], (
        f"AI analysis still running after {wait_s:.0f} s. Follow it at {job_url} and fire the hook again "
        "(or run the demo with a longer --wait)."
    )


def development_link(cards: list[dict[str, Any]]) -> str | None:
    """Return the development review link of an imaging draft card, if one is among ``cards``."""
    for card in cards:
        for link in card.get("links", []):
            if link.get("label") == "Review the draft (development link)":
                return str(link["url"])
    return None


def draft_of(http: httpx.Client, url: str, draft_id: str) -> dict[str, Any]:
    """Return the draft as the service's JSON API shows it."""
    path = f"/drafts/{draft_id}"
    response = http.get(url + path, headers=signed_headers(url, path))
    response.raise_for_status()
    return dict(response.json())


def sign_through_link(http: httpx.Client, link: str, draft: dict[str, Any]) -> None:
    """Sign the draft as a clinician does on the development review page: its form, the AI text unchanged."""
    page = http.get(link)
    if page.status_code != 200:
        raise DemoError(f"the review page answered {page.status_code}")
    access = link.split("access=", 1)[1]
    form = {
        "access": access,
        "text": draft["aiText"],
        "practitioner": DEMO_USER,
        "practitionerName": DEMO_SIGNER,
    }
    signed = http.post(link.split("/review?", 1)[0] + "/sign", data=form)
    if signed.status_code != 200:
        raise DemoError(f"signing answered {signed.status_code}: {signed.text[:300]}")


def read_back(http: httpx.Client, fhir: FhirServer, reference: str, printer: Printer) -> None:
    """Print the final DiagnosticReport and its Provenances as the FHIR server holds them."""
    report = http.get(f"{fhir.base}/{reference}", headers=fhir.headers()).json()
    provenances = http.get(
        f"{fhir.base}/Provenance", params={"target": reference}, headers=fhir.headers()
    ).json()
    printer.line(
        f"  {reference}: status {report.get('status')}, {report.get('code', {}).get('text', '')}".rstrip(", ")
    )
    for interpreter in report.get("resultsInterpreter", []):
        printer.line(f"    signed by: {interpreter.get('display') or interpreter.get('reference')}")
    printer.markdown(f"conclusion: {report.get('conclusion', '')}", "    ")
    for entry in provenances.get("entry", []):
        provenance = entry["resource"]
        activity = (provenance.get("activity", {}).get("coding") or [{}])[0].get("code", "?")
        agents = ", ".join(
            str(agent.get("who", {}).get("display") or agent.get("who", {}).get("reference", "?"))
            for agent in provenance.get("agent", [])
        )
        printer.line(f"  Provenance/{provenance['id']}: {activity} by {agents}")


def run_demo(
    port: int,
    *,
    once: bool = False,
    wait_s: float = 180.0,
    cache_dir: Path | None = None,
    out: TextIO | None = None,
) -> int:
    """Run the local demo on ``port``; return 0 once the loop is shown (also when stopped with Ctrl-C).

    Everything the demo started is stopped before it returns, whichever way it ends.
    """
    printer = Printer(out or sys.stdout)
    settings = Settings()
    cache_dir = cache_dir or Path.home() / ".cache" / "medgemma-cds"
    workdir = Path(tempfile.mkdtemp(prefix="medgemma-cds-demo-"))
    processes = Processes(printer, workdir)
    try:
        with _stop_on_sigterm():
            return _run(settings, port, once, wait_s, cache_dir, workdir, processes, printer)
    except KeyboardInterrupt:
        printer.line()
        printer.line("interrupted: stopping what the demo started")
        return 130 if once else 0
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
    once: bool,
    wait_s: float,
    cache_dir: Path,
    workdir: Path,
    processes: Processes,
    printer: Printer,
) -> int:
    url = f"http://127.0.0.1:{port}"
    printer.line(printer.style("MedGemma CDS demo", "bold"))
    if answers_tcp("127.0.0.1", port):
        raise DemoError(f"port {port} is taken; choose another with --port")
    ensure_redis(settings.redis_url, processes)
    with httpx.Client(timeout=30) as http:
        return _show_the_loop(settings, url, once, wait_s, cache_dir, workdir, processes, printer, http)


def _show_the_loop(
    settings: Settings,
    url: str,
    once: bool,
    wait_s: float,
    cache_dir: Path,
    workdir: Path,
    processes: Processes,
    printer: Printer,
    http: httpx.Client,
) -> int:
    port = url.rsplit(":", 1)[1]
    fhir = start_fhir_server(processes, workdir, http)
    env = dict(os.environ) | model_settings(settings, cache_dir, processes)
    env |= {
        "MEDGEMMA_CDS_REDIS_URL": settings.redis_url,
        "MEDGEMMA_CDS_DATABASE_URL": f"sqlite:///{workdir / 'demo.db'}",
        "MEDGEMMA_CDS_PUBLIC_URL": url,
        # Development mode: the demo's calls are signed by the local development issuer, and the draft is
        # signed through the development review link.
        "MEDGEMMA_CDS_DEV_MODE": "true",
        # Shared by the API and the workers: job requests in Redis are encrypted with a key derived from it.
        "MEDGEMMA_CDS_SECRET_KEY": settings.secret_key.get_secret_value(),
        "MEDGEMMA_CDS_FHIR_SERVER_ALLOWLIST": json.dumps([fhir.base]),
        "MEDGEMMA_CDS_FHIR_ALLOW_HTTP_LOOPBACK": "true",
        "MEDGEMMA_CDS_FHIR_WRITEBACK_URL": fhir.base,
        "MEDGEMMA_CDS_FHIR_WRITEBACK_TOKEN": fhir.token,
    }
    command = medgemma_cds_command()
    for queue in ("text", "image"):
        others = workers_on(settings, queue)
        if others:
            printer.line(f"  note: other workers consume the {queue} queue too ({', '.join(others)})")
        processes.start(
            f"{queue}-worker", [*command, "worker", "--queue", queue, "--concurrency", "1"], env, grace_s=5
        )
    processes.start("api", [*command, "serve", "--port", port, "--workers", "1", "--threads", "4"], env)
    wait_until(lambda: api_answers(url), 90, processes, "the API")

    pending: list[tuple[str, dict[str, Any], str]] = []
    answered: dict[str, list[dict[str, Any]]] = {}
    for service_id, body in demo_calls(fhir):
        patient = (
            "Kermit Trantow" if body["context"]["patientId"] == fhir.patients["Trantow"] else "Louis Erdman"
        )
        printer.line()
        printer.line(printer.style(f"== {body['hook']} -> {service_id} ({patient}) ".ljust(70, "="), "bold"))
        cards = fire(http, url, service_id, body)
        answered[service_id] = cards
        if not cards:
            printer.line("  (no cards: checked, nothing to say)")
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
        answered[service_id] = ai_cards or answered[service_id]
    signed = _sign_and_read_back(http, url, fhir, answered["imaging-report-draft"], once, processes, printer)

    printer.line()
    printer.line(printer.style("URLs", "bold"))
    printer.line(f"  discovery:  {url}/cds-services")
    for service_id, _, job_url in pending:
        printer.line(f"  job status: {job_url}  ({service_id})")
    printer.line(f"  metrics:    {url}/metrics")
    printer.line(f"  FHIR:       {fhir.base} (bearer token {fhir.token})")
    printer.line(f"  a hook by hand: MEDGEMMA_CDS_PUBLIC_URL={url} medgemma-cds call order-review")
    printer.line(
        f"  CDS Hooks sandbox: open {SANDBOX_URL}, choose 'CDS Services' > 'Add CDS Service' and enter "
        f"{url}/cds-services (the sandbox calls from your browser, so a local URL works while the demo runs)"
    )
    if not once:
        printer.line()
        printer.line("Running. Press Ctrl-C to stop everything the demo started.")
        while True:
            processes.check_alive()
            time.sleep(1)
    return 0 if signed else 1


def _sign_and_read_back(
    http: httpx.Client,
    url: str,
    fhir: FhirServer,
    cards: list[dict[str, Any]],
    once: bool,
    processes: Processes,
    printer: Printer,
) -> bool:
    """Sign the imaging draft through its development review link (the demo itself with ``once``, else the
    person at the browser), then read the final report and its Provenance back from the FHIR server."""
    printer.line()
    printer.line(printer.style("== The imaging draft: review, sign, read back ".ljust(70, "="), "bold"))
    link = development_link(cards)
    if link is None:
        printer.line("  No imaging draft to sign (its AI card did not arrive; run with a longer --wait).")
        return False
    draft_id = link.split("/drafts/", 1)[1].split("/", 1)[0]
    if once:
        sign_through_link(http, link, draft_of(http, url, draft_id))
        printer.line(f"  Signed as {DEMO_SIGNER} through the development review link.")
    else:
        printer.line(f"  Open the review link to sign the draft: {link}")
        while draft_of(http, url, draft_id)["status"] == "draft":
            processes.check_alive()
            time.sleep(1)
    draft = draft_of(http, url, draft_id)
    if draft["status"] != "signed":
        printer.line(f"  The draft was {draft['status']}: nothing is written to the record.")
        return False
    signer = f"{draft.get('signedByName')} ({draft.get('signedBy')})"
    printer.line(f"  Signed by {signer}; written to {draft.get('writtenTo')}")
    if not draft.get("writtenTo"):
        raise DemoError(f"the signed report was not written back: {draft.get('writeBackError')}")
    read_back(http, fhir, draft["writtenTo"], printer)
    return True
