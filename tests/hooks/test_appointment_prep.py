"""appointment-prep over the Flask test client: a booking asks for the job the chart open will ask for."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC
from datetime import date
from datetime import datetime
from datetime import timedelta
from typing import Any

import redis
from flask.testing import FlaskClient
from support import FhirServer
from support import Issuer
from support import waiting

from cds_service.jobs import PRECOMPUTE_JOBS_KEY
from cds_service.jobs import PRECOMPUTE_MARK_PREFIX
from cds_service.jobs import JobStore

PATH = "/cds-services/appointment-prep"
SUMMARY = "/cds-services/patient-summary"


def chart_prefetch(fhir: FhirServer, patient_id: str, note: str) -> dict[str, Any]:
    """patient-summary's whole prefetch, the patient's text changed so the record (and job) is new."""
    patient = fhir.get(f"Patient/{patient_id}")
    patient["text"] = {
        "status": "generated",
        "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{note}</div>',
    }
    return {
        "patient": patient,
        "conditions": fhir.get(f"Condition?patient={patient_id}&clinical-status=active"),
        "medications": fhir.get(f"MedicationRequest?patient={patient_id}&status=active"),
        "allergies": fhir.get(f"AllergyIntolerance?patient={patient_id}"),
        "observations": fhir.get(f"Observation?patient={patient_id}&_sort=-date&_count=30"),
    }


def appointments(patient_id: str, start: datetime) -> dict[str, Any]:
    """The ``appointments`` context of appointment-book: a Bundle of one proposed Appointment."""
    appointment = {
        "resourceType": "Appointment",
        "id": "apt-1",
        "status": "proposed",
        "start": start.isoformat(),
        "participant": [{"actor": {"reference": f"Patient/{patient_id}"}, "status": "accepted"}],
    }
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": appointment}]}


def book(
    client: FlaskClient,
    issuer: Issuer,
    hook_body: Callable[..., dict[str, Any]],
    patient_id: str,
    **fields: Any,
) -> Any:
    body = hook_body("appointment-book", patient_id, prefetch=fields.pop("prefetch", None))
    if body["prefetch"] is None:
        del body["prefetch"]
    body["context"]["appointments"] = fields.pop("appointments")
    return client.post(PATH, json=body, headers=issuer.headers(PATH))


def job_id_of(card: dict[str, Any]) -> str:
    return str(card["links"][0]["url"].split("/jobs/")[1].split("?")[0])


def test_booking_today_queues_the_summary_the_chart_open_finds(
    client: FlaskClient, issuer: Issuer, fhir_server: FhirServer, hook_body, redis_client: redis.Redis
) -> None:
    patient_id = fhir_server.patients["Trantow"]
    prefetch = chart_prefetch(fhir_server, patient_id, f"booked {uuid.uuid4()}")
    before = {m.decode() for m in redis_client.smembers(PRECOMPUTE_JOBS_KEY)}
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    booked = book(
        client, issuer, hook_body, patient_id, prefetch=prefetch, appointments=appointments(patient_id, start)
    )
    assert booked.status_code == 200, booked.json
    (card,) = booked.json["cards"]
    assert card["summary"] == "Pre-visit summary will be ready" and card["indicator"] == "info"
    (job_id,) = {m.decode() for m in redis_client.smembers(PRECOMPUTE_JOBS_KEY)} - before
    # Sent to the low-priority queue, marked so a chart open can move it ahead.
    assert redis_client.exists(JobStore.key(job_id))
    queued_on_precompute = redis_client.exists(PRECOMPUTE_MARK_PREFIX + job_id)

    # The chart opens (patient-view, the same record sent the same way): the same job, not a new one.
    view = hook_body("patient-view", patient_id, prefetch=prefetch)
    opened = client.post(SUMMARY, json=view, headers=issuer.headers(SUMMARY))
    assert opened.status_code == 200
    ai_card = opened.json["cards"][1]
    if ai_card["summary"] in waiting("Pre-visit summary"):
        assert job_id_of(ai_card) == job_id
        # Still queued behind precomputed work: the chart open took the mark and sent it ahead.
        if queued_on_precompute and redis_client.hget(JobStore.key(job_id), "state") == b"queued":
            assert not redis_client.exists(PRECOMPUTE_MARK_PREFIX + job_id)
    else:  # a worker of this run had already finished it: the first open carried the AI card
        assert ai_card["summary"] == "AI pre-visit summary (draft, needs clinician review)"
    assert {m.decode() for m in redis_client.smembers(PRECOMPUTE_JOBS_KEY)} - before == {job_id}


def test_a_visit_next_month_is_left_to_its_morning_sweep(
    client: FlaskClient, issuer: Issuer, fhir_server: FhirServer, hook_body, redis_client: redis.Redis
) -> None:
    patient_id = fhir_server.patients["Erdman"]
    prefetch = chart_prefetch(fhir_server, patient_id, f"later {uuid.uuid4()}")
    before = redis_client.scard(PRECOMPUTE_JOBS_KEY)
    later = datetime.combine(date.today() + timedelta(days=30), datetime.min.time(), UTC)
    booked = book(
        client, issuer, hook_body, patient_id, prefetch=prefetch, appointments=appointments(patient_id, later)
    )
    assert booked.status_code == 200
    assert booked.json == {"cards": []}
    assert redis_client.scard(PRECOMPUTE_JOBS_KEY) == before


def test_booking_never_fails_on_data_it_cannot_read(
    client: FlaskClient, issuer: Issuer, fhir_server: FhirServer, hook_body, redis_client: redis.Redis
) -> None:
    patient_id = fhir_server.patients["Erdman"]
    prefetch = chart_prefetch(fhir_server, patient_id, f"partial {uuid.uuid4()}")
    del prefetch["allergies"]  # not prefetched, and no fhirServer to read it from
    before = redis_client.scard(PRECOMPUTE_JOBS_KEY)
    now = datetime.now(UTC)
    booked = book(
        client, issuer, hook_body, patient_id, prefetch=prefetch, appointments=appointments(patient_id, now)
    )
    assert booked.status_code == 200
    # The chart open would read the allergies: a job without them would never be asked for again.
    assert booked.json == {"cards": []}
    assert redis_client.scard(PRECOMPUTE_JOBS_KEY) == before


def test_appointments_must_be_a_bundle(client: FlaskClient, issuer: Issuer, hook_body) -> None:
    response = book(client, issuer, hook_body, "p1", appointments={"resourceType": "Appointment"})
    assert response.status_code == 400
    assert response.json["details"][0]["field"] == "context.appointments"
    unsigned = hook_body("appointment-book", "p1")
    unsigned["context"]["appointments"] = appointments("p1", datetime.now(UTC))
    assert client.post(PATH, json=unsigned).status_code == 401


def test_discovery_offers_the_summary_prefetch(client: FlaskClient) -> None:
    services = {s["id"]: s for s in client.get("/cds-services").json["services"]}
    prep, summary = services["appointment-prep"], services["patient-summary"]
    assert prep["hook"] == "appointment-book"
    assert prep["prefetch"] == summary["prefetch"]
    assert "potentiallyLongRunning" not in prep
