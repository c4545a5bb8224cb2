"""A simulated clinic day: the morning sweep prepares every booked patient's AI summary, and the chart opens
at appointment times (the app's clock injected) carry the AI card on their first call.

The test FHIR server holds the two sample patients and 31 synthetic ones (problems, a medication, an
allergy, labs), a day of 34 appointments (booked and arrived, one patient twice, one cancelled). The sweep
runs as operators run it (``medgemma-cds precompute``) and a real worker on the tiny model computes the
jobs; each chart open sends a prefetch formatted unlike the server's JSON (entries shuffled, keys reordered,
the Bundle's own id, meta and links new, search modes, servers' lastUpdated rewritten). Records changed after
the sweep get a fresh job, never the stale result as current; a chart opened while the sweep's jobs are
still queued is served first.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import uuid
from datetime import date
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from flask.testing import FlaskClient
from support import FhirServer
from support import Issuer
from support import LiveServer
from support import ModelWorker
from support import waiting

from cds_service.app import create_app
from cds_service.jobs import PRECOMPUTE_JOBS_KEY
from cds_service.jobs import PRECOMPUTE_QUEUES
from cds_service.jobs import ZERO_WAIT_KEY
from cds_service.jobs import JobStore
from cds_service.settings import Settings

# A day no other test books anything on; the sweep, and every chart open, happen "on" it.
DAY = date(2031, 5, 14)
SUMMARY = "/cds-services/patient-summary"
AI_CARD = "AI pre-visit summary (draft, needs clinician review)"
RUNNING = waiting("Pre-visit summary")
PROBLEMS = ["Hypertension", "Type 2 diabetes mellitus", "Asthma", "Osteoarthritis of knee", "Hypothyroidism"]
DRUGS = ["Lisinopril 10 MG Oral Tablet", "Metformin 500 MG Oral Tablet", "Levothyroxine 50 MCG Oral Tablet"]
LABS = [("Body Weight", "kg", 50, 110), ("Heart rate", "/min", 55, 100), ("Hemoglobin A1c", "%", 5, 9)]


def fhir_request(fhir: FhirServer, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    response = httpx.request(
        method,
        f"{fhir.base_url}/{path}",
        json=body,
        headers={"Authorization": f"Bearer {fhir.token}", "Content-Type": "application/fhir+json"},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()


def synthetic_chart(rng: random.Random) -> dict[str, Any]:
    """A transaction Bundle: one synthetic Patient with two problems, a medication, an allergy and labs."""
    patient = f"urn:uuid:{uuid.uuid4()}"
    subject = {"reference": patient}
    active = {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
    }
    resources: list[tuple[str | None, dict[str, Any]]] = [
        (
            patient,
            {
                "resourceType": "Patient",
                "gender": rng.choice(["female", "male"]),
                "birthDate": f"{rng.randint(1940, 2000)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            },
        )
    ]
    for problem in rng.sample(PROBLEMS, 2):
        onset = f"{rng.randint(2005, 2029)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"
        resources.append(
            (
                None,
                {
                    "resourceType": "Condition",
                    "clinicalStatus": active,
                    "code": {"text": problem},
                    "subject": subject,
                    "onsetDateTime": onset,
                },
            )
        )
    resources.append(
        (
            None,
            {
                "resourceType": "MedicationRequest",
                "status": "active",
                "intent": "order",
                "medicationCodeableConcept": {"text": rng.choice(DRUGS)},
                "subject": subject,
                "authoredOn": "2030-01-15",
            },
        )
    )
    resources.append(
        (
            None,
            {
                "resourceType": "AllergyIntolerance",
                "clinicalStatus": {"coding": [{"code": "active"}]},
                "code": {"text": rng.choice(["Penicillin", "Peanuts", "Latex"])},
                "patient": subject,
            },
        )
    )
    for name, unit, low, high in LABS:
        resources.append(
            (
                None,
                {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": name},
                    "subject": subject,
                    # Same-day labs: their order in the prompt must come from their ids, not the Bundle.
                    "effectiveDateTime": "2031-04-30T09:00:00+00:00",
                    "valueQuantity": {"value": rng.randint(low, high), "unit": unit},
                },
            )
        )
    entries = [
        {
            **({"fullUrl": full_url} if full_url else {}),
            "resource": resource,
            "request": {"method": "POST", "url": resource["resourceType"]},
        }
        for full_url, resource in resources
    ]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def appointment(patient_id: str, start: datetime, status: str = "booked") -> dict[str, Any]:
    return {
        "resourceType": "Appointment",
        "status": status,
        "start": start.isoformat(),
        "end": (start + timedelta(minutes=15)).isoformat(),
        "participant": [
            {"actor": {"reference": f"Patient/{patient_id}"}, "status": "accepted"},
            {"actor": {"reference": "Practitioner/COREPRACTITIONER1"}, "status": "accepted"},
        ],
    }


def reordered(value: Any) -> Any:
    """The same JSON with every object's keys in reverse order."""
    if isinstance(value, dict):
        return {key: reordered(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [reordered(item) for item in value]
    return value


def as_the_ehr_sends_it(data: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The same resources as another system serialises them: nothing clinical differs."""
    data = json.loads(json.dumps(data))
    resources = [e["resource"] for e in data.get("entry", [])] if data["resourceType"] == "Bundle" else [data]
    for resource in resources:
        # Servers rewrite lastUpdated (and its format) without a new version.
        resource.setdefault("meta", {})["lastUpdated"] = "2031-05-14T05:59:59.123+02:00"
    if data["resourceType"] != "Bundle":
        return reordered(data)
    entries = [
        {"search": {"mode": "match", "score": 1}, "fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": r}
        for r in resources
    ]
    rng.shuffle(entries)
    return reordered(
        {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "meta": {"lastUpdated": "2031-05-14T06:00:00Z"},
            "type": "searchset",
            "total": len(entries),
            "link": [{"relation": "self", "url": f"https://ehr.test/fhir/search?{uuid.uuid4().hex}"}],
            "entry": entries,
        }
    )


def chart_prefetch(fhir: FhirServer, patient_id: str, rng: random.Random) -> dict[str, Any]:
    """What an EHR prefetches for patient-summary at chart open, formatted its own way."""
    queries = {
        "patient": f"Patient/{patient_id}",
        "conditions": f"Condition?patient={patient_id}&clinical-status=active",
        "medications": f"MedicationRequest?patient={patient_id}&status=active",
        "allergies": f"AllergyIntolerance?patient={patient_id}",
        "observations": f"Observation?patient={patient_id}&_sort=-date&_count=30",
    }
    return {key: as_the_ehr_sends_it(fhir.get(query), rng) for key, query in queries.items()}


def open_chart(
    client: FlaskClient, issuer: Issuer, fhir: FhirServer, patient_id: str, rng: random.Random
) -> Any:
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/COREPRACTITIONER1", "patientId": patient_id},
        "prefetch": chart_prefetch(fhir, patient_id, rng),
    }
    return client.post(SUMMARY, json=body, headers=issuer.headers(SUMMARY))


def job_id_of(card: dict[str, Any]) -> str:
    return str(card["links"][0]["url"].split("/jobs/")[1].split("?")[0])


def wait_until_done(client: redis.Redis, job_ids: set[str], timeout_s: float = 600) -> dict[str, str]:
    """Return each job's final state once none is queued or running."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = {j: (client.hget(JobStore.key(j), "state") or b"gone").decode() for j in job_ids}
        if all(state not in ("queued", "running") for state in states.values()):
            return states
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs still pending: {sorted(states.values())}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def clinic(fhir_server: FhirServer) -> dict[str, Any]:
    """The day's schedule on the FHIR server: 33 patients, 34 appointments (plus one cancelled)."""
    rng = random.Random(14)
    patient_ids = list(fhir_server.patients.values())
    for _ in range(31):
        answer = fhir_request(fhir_server, "POST", "", synthetic_chart(rng))
        locations = [e["response"]["location"] for e in answer["entry"]]
        patient = next(loc for loc in locations if "Patient/" in loc).split("/_history")[0]
        patient_ids.append(patient.rsplit("/", 1)[1])
    booked = patient_ids[:32]
    starts = [datetime(2031, 5, 14, 8, 0).astimezone() + timedelta(minutes=15 * n) for n in range(34)]
    visits = [(patient_id, start) for patient_id, start in zip(booked + booked[:2], starts, strict=True)]
    for index, (patient_id, start) in enumerate(visits):
        fhir_request(
            fhir_server,
            "POST",
            "Appointment",
            appointment(patient_id, start, "arrived" if index == 0 else "booked"),
        )
    # Cancelled: the sweep must leave this patient alone.
    fhir_request(fhir_server, "POST", "Appointment", appointment(patient_ids[32], starts[5], "cancelled"))
    return {"visits": visits, "patients": booked, "cancelled": patient_ids[32]}


# 32 summaries on the tiny model through two CPU workers: minutes on a busy machine, so the sweep's wait (a
# bound, not a timing check) and the test's own limit leave room.
@pytest.mark.timeout(900)
def test_a_clinic_day_opens_every_chart_with_its_ai_summary(
    clinic: dict[str, Any],
    live_server: LiveServer,
    model_worker: ModelWorker,
    fhir_server: FhirServer,
    issuer: Issuer,
    settings: Settings,
) -> None:
    redis_client = redis.Redis.from_url(live_server.env["MEDGEMMA_CDS_REDIS_URL"])
    # The chart opens are made "on" DAY: the app's clock is injected. Its model settings are the sweep's
    # and the worker's (the live server's environment), as in a deployment.
    same_models = settings.model_copy(
        update={"max_new_tokens": int(live_server.env["MEDGEMMA_CDS_MAX_NEW_TOKENS"]), "hook_budget_ms": 0}
    )
    no_wait = create_app(same_models, today=lambda: DAY).test_client()
    before = {m.decode() for m in redis_client.smembers(PRECOMPUTE_JOBS_KEY)}

    # 06:00: the morning sweep, as operators run it.
    command = [
        str(Path(sys.executable).parent / "medgemma-cds"),
        "precompute",
        "--fhir-base",
        fhir_server.base_url,
    ]
    command += ["--token", fhir_server.token, "--date", DAY.isoformat(), "--rate", "100/s"]
    swept = subprocess.run(command, env=live_server.env, capture_output=True, text=True, timeout=120)
    assert swept.returncode == 0, swept.stdout + swept.stderr
    last = swept.stdout.strip().splitlines()[-1]
    assert last.startswith(f"{DAY.isoformat()}: 34 appointments, 32 patients: 32 enqueued;"), swept.stdout
    assert "32/32 patients" in swept.stdout
    sweep_jobs = {m.decode() for m in redis_client.smembers(PRECOMPUTE_JOBS_KEY)} - before
    assert len(sweep_jobs) == 32

    # A chart opened now, while the sweep's jobs wait: it is served ahead of them.
    rng = random.Random(5)
    walk_in = clinic["cancelled"]
    pending = open_chart(no_wait, issuer, fhir_server, walk_in, rng).json["cards"][-1]
    assert pending["summary"] in RUNNING
    wait_until_done(redis_client, {job_id_of(pending)}, timeout_s=60)
    still_queued = sum(1 for j in sweep_jobs if redis_client.hget(JobStore.key(j), "state") == b"queued")
    assert still_queued > 0, "the chart opened now waited for the whole sweep"
    assert redis_client.llen(PRECOMPUTE_QUEUES["text"]) > 0

    # Two records change after the sweep (a problem is revised: a new version on the server).
    changed = clinic["patients"][10:12]
    for patient_id in changed:
        condition = fhir_server.search(f"Condition?patient={patient_id}")[0]
        condition["onsetDateTime"] = "2031-05-01"
        fhir_request(fhir_server, "PUT", f"Condition/{condition['id']}", condition)

    states = wait_until_done(redis_client, sweep_jobs)
    assert set(states.values()) == {"done"}, states

    # The day: each chart opens at its appointment time, the prefetch formatted as the EHR sends it.
    zero_wait_before = {k.decode(): int(v) for k, v in redis_client.hgetall(ZERO_WAIT_KEY).items()}
    first_open: dict[str, bool] = {}
    for patient_id, _start in clinic["visits"]:
        if patient_id in changed:
            continue
        # With no budget to wait in, the AI card is there only when its result was ready before the open:
        # zero-wait, judged without a clock (a timed check fails on a busy machine, not on a regression).
        response = open_chart(no_wait, issuer, fhir_server, patient_id, rng)
        assert response.status_code == 200, response.json
        summaries = [card["summary"] for card in response.json["cards"]]
        if patient_id not in first_open:
            first_open[patient_id] = AI_CARD in summaries
    carried = sum(first_open.values())
    assert len(first_open) == 30
    assert carried / len(first_open) >= 0.95, f"{carried} of {len(first_open)} first opens had the AI card"

    # The zero-wait rate /metrics reports counts these first opens (and only first opens).
    zero_wait = {k.decode(): int(v) for k, v in redis_client.hgetall(ZERO_WAIT_KEY).items()}
    opened = zero_wait["patient-summary:first"] - zero_wait_before.get("patient-summary:first", 0)
    ready = zero_wait.get("patient-summary:ready", 0) - zero_wait_before.get("patient-summary:ready", 0)
    assert (opened, ready) == (30, carried)
    metrics = no_wait.get("/metrics").get_data(as_text=True)
    assert 'medgemma_cds_zero_wait_ratio{service="patient-summary"}' in metrics
    assert 'medgemma_cds_precompute_sweep_patients{progress="done"} 32.0' in metrics
    assert 'medgemma_cds_precompute_requests_total{outcome="enqueued",trigger="sweep"}' in metrics

    # A changed record: a fresh job, never the sweep's stale summary as current.
    for patient_id in changed:
        cards = open_chart(no_wait, issuer, fhir_server, patient_id, rng).json["cards"]
        summaries = [card["summary"] for card in cards]
        assert AI_CARD not in summaries and RUNNING & set(summaries), summaries
        fresh = job_id_of(cards[-1])
        assert fresh not in sweep_jobs

    # `medgemma-cds check` shows the sweep.
    checked = subprocess.run(
        [str(Path(sys.executable).parent / "medgemma-cds"), "check"],
        env=live_server.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(checked.stdout)
    sweep = report["precompute"]["sweep"]
    assert (sweep["day"], sweep["state"], sweep["patients"], sweep["done"]) == (
        DAY.isoformat(),
        "finished",
        "32",
        "32",
    )
    assert report["precompute"]["jobs"]["done"] >= 32
