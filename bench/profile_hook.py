"""Prints where the time of one new-chart hook goes: auth, body parse, validation and prefetch reading,
rules, the model job request, the audit, and serialising the answer (wall clock per phase).

Run: ``.venv/bin/python bench/profile_hook.py [--calls 300]`` (a throw-away redis-server on a free port and
a temporary SQLite store). To profile another checkout of the project (e.g. the commit before a
change), run this file with that checkout first on the path: ``PYTHONPATH=/path/to/checkout``.

patient-summary is called through Flask's test client with the demo patient's full prefetch, every call a
chart never seen before (own patient id, own problem text), authentication off and a zero hook budget. Each
phase is the wall-clock time of the function that does it (wrapped where the pipeline looks it up; the phases
don't nest), per call; "other" is Flask, Werkzeug and the test client around them. cProfile is not used: it
inflates code that makes many small calls (the JSON walk, validators) several times over. Figures only.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_hooks import redis_server

#: Phase → (module, attribute path) of the function that does it, as the pipeline looks it up.
PHASES = {
    "auth (JWT check)": ("cds_service.api", "authenticate"),
    "read JSON body (parse, depth/NUL walk)": ("cds_service.api", "read_json_body"),
    "validate request and context": ("cds_service.invoke", "parse_hook_call"),
    "read prefetch (FHIR parse, hashes)": ("cds_service.invoke", "resolve_prefetch"),
    "rules (summary card)": ("hooks.patient_summary", "summary_cards"),
    "record context for the model": ("hooks.patient_summary", "record_context"),
    "model job request (one Redis script)": ("cds_service.jobs", "JobQueue.request"),
    "audit": ("cds_service.api", "record_audit"),
    "serialise cards": ("cds_service.wire", "HookResponse.wire"),
}


def timed(spent: dict[str, float], phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """Return ``function`` adding its wall-clock time to ``spent[phase]``."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[phase] += time.perf_counter() - started

    return wrapper


def instrument(spent: dict[str, float]) -> None:
    """Wrap every phase's function where the pipeline looks it up."""
    for phase, (module_name, path) in PHASES.items():
        owner: Any = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        setattr(owner, name, timed(spent, phase, getattr(owner, name)))


def new_chart_bodies(count: int, sample: Path) -> list[dict[str, Any]]:
    """Return ``count`` patient-view bodies, each a chart the service has not seen."""
    (path,) = sample.glob("Kermit_Trantow_*.json")
    resources = [entry["resource"] for entry in json.loads(path.read_text())["entry"]]

    def search(resource_type: str) -> dict[str, Any]:
        found = [copy.deepcopy(r) for r in resources if r["resourceType"] == resource_type]
        return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in found]}

    bodies = []
    for number in range(count):
        patient_id = f"profile-{number}-{uuid.uuid4().hex[:8]}"
        patient = next(copy.deepcopy(r) for r in resources if r["resourceType"] == "Patient")
        conditions = search("Condition")
        conditions["entry"][0]["resource"]["code"]["text"] = f"Hypertension (chart {number})"
        bodies.append(
            {
                "hook": "patient-view",
                "hookInstance": str(uuid.uuid4()),
                "context": {"userId": "Practitioner/p1", "patientId": patient_id},
                "prefetch": {
                    "patient": patient | {"id": patient_id},
                    "conditions": conditions,
                    "medications": search("MedicationRequest"),
                    "allergies": search("AllergyIntolerance"),
                    "observations": search("Observation"),
                },
            }
        )
    return bodies


def main() -> None:
    """Profile the calls and print the per-call time of each phase."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    options = parser.parse_args()

    from cds_service.app import create_app
    from cds_service.settings import Settings

    with redis_server() as redis_url:
        sample = Path(sys.modules["cds_service"].__file__).resolve().parent / "data" / "sample"
        workdir = Path(tempfile.mkdtemp(prefix="profile-hook-"))
        settings = Settings(
            auth_disabled=True,
            redis_url=redis_url,
            database_url=f"sqlite:///{workdir / 'cds.db'}",
            hook_budget_ms=0,
        )
        app = create_app(settings)
        client = app.test_client()
        try:
            # What `medgemma-cds serve` does in each worker, where it exists.
            from cds_service.cli import tune_gc
        except ImportError:
            pass
        else:
            tune_gc()
        bodies = new_chart_bodies(options.calls + 20, sample)
        for body in bodies[:20]:  # warm-up: imports, connections, caches of code paths
            assert client.post("/cds-services/patient-summary", json=body).status_code == 200
        spent = dict.fromkeys(PHASES, 0.0)
        instrument(spent)
        started = time.perf_counter()
        for body in bodies[20:]:
            response = client.post("/cds-services/patient-summary", json=body)
            assert response.status_code == 200, response.get_json()
        wall_ms = (time.perf_counter() - started) * 1000 / options.calls
    print(f"checkout: {Path(sys.modules['cds_service'].__file__).resolve().parents[1]}")
    print(f"{options.calls} new-chart patient-summary calls, wall clock per call:")
    for phase, seconds in spent.items():
        print(f"  {phase:42s} {seconds * 1000 / options.calls:7.2f} ms")
    other = wall_ms - sum(spent.values()) * 1000 / options.calls
    print(f"  {'other (Flask, Werkzeug, test client)':42s} {other:7.2f} ms")
    print(f"  {'total':42s} {wall_ms:7.2f} ms")


if __name__ == "__main__":
    main()
