"""encounter-prep over the Flask test client: a check-in asks for the very job the chart open will ask for."""

from __future__ import annotations

import uuid

import redis
from flask.testing import FlaskClient
from support import FhirServer
from support import Issuer
from support import fhir_access
from support import waiting
from test_appointment_prep import chart_prefetch
from test_appointment_prep import job_id_of

from cds_service.jobs import PRECOMPUTE_JOBS_KEY
from cds_service.jobs import PRECOMPUTE_MARK_PREFIX
from cds_service.jobs import JobStore

PATH = "/cds-services/encounter-prep"
SUMMARY = "/cds-services/patient-summary"


def test_check_in_queues_the_summary_the_chart_open_finds(
    client: FlaskClient, issuer: Issuer, fhir_server: FhirServer, hook_body, redis_client: redis.Redis
) -> None:
    patient_id = fhir_server.patients["Erdman"]
    prefetch = chart_prefetch(fhir_server, patient_id, f"checked in {uuid.uuid4()}")
    before = {m.decode() for m in redis_client.smembers(PRECOMPUTE_JOBS_KEY)}
    body = hook_body("encounter-start", patient_id, prefetch=prefetch)
    body["context"]["encounterId"] = "enc-1"
    started = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert started.status_code == 200, started.json
    assert started.json == {"cards": []}
    (job_id,) = {m.decode() for m in redis_client.smembers(PRECOMPUTE_JOBS_KEY)} - before
    # The patient is here: the job goes ahead of precomputed work, not to the precompute queue.
    assert not redis_client.exists(PRECOMPUTE_MARK_PREFIX + job_id)

    # The chart opens with the same record, the EHR's prefetch shaped differently (entries reversed).
    for key in ("conditions", "medications", "allergies", "observations"):
        prefetch[key]["entry"] = list(reversed(prefetch[key].get("entry", [])))
        prefetch[key]["link"] = [{"relation": "self", "url": f"https://ehr.test/{key}"}]
    view = hook_body("patient-view", patient_id, prefetch=prefetch)
    opened = client.post(SUMMARY, json=view, headers=issuer.headers(SUMMARY))
    ai_card = opened.json["cards"][1]
    if ai_card["summary"] in waiting("Pre-visit summary"):
        assert job_id_of(ai_card) == job_id
    else:  # a worker of this run had already finished it
        assert ai_card["summary"] == "AI pre-visit summary (draft, needs clinician review)"
    assert {m.decode() for m in redis_client.smembers(PRECOMPUTE_JOBS_KEY)} - before == {job_id}


def test_check_in_reads_what_was_not_prefetched(
    client: FlaskClient, issuer: Issuer, fhir_server: FhirServer, hook_body, redis_client: redis.Redis
) -> None:
    patient_id = fhir_server.patients["Trantow"]
    body = hook_body("encounter-start", patient_id, **fhir_access(fhir_server.base_url, fhir_server.token))
    body["context"]["encounterId"] = "enc-2"
    response = client.post(PATH, json=body, headers=issuer.headers(PATH))
    assert response.status_code == 200 and response.json == {"cards": []}
    # The same record read from the server, as a chart open without prefetch reads it: the same job.
    view = hook_body("patient-view", patient_id, **fhir_access(fhir_server.base_url, fhir_server.token))
    opened = client.post(SUMMARY, json=view, headers=issuer.headers(SUMMARY)).json["cards"][1]
    if opened["summary"] in waiting("Pre-visit summary"):
        assert redis_client.sismember(PRECOMPUTE_JOBS_KEY, job_id_of(opened))


def test_a_record_read_from_the_server_is_the_record_a_chart_open_prefetches(
    client: FlaskClient, issuer: Issuer, fhir_server: FhirServer, hook_body, redis_client: redis.Redis
) -> None:
    # More observations on the server than the summary's newest 30: the check-in, reading the record from
    # fhirServer as the morning sweep does, reads the 30 the EHR prefetches, not every page.
    patient_id = fhir_server.patients["Erdman"]
    observations = fhir_server.get(f"Observation?patient={patient_id}&_sort=-date&_count=30")
    assert any(link["relation"] == "next" for link in observations["link"])
    body = hook_body("encounter-start", patient_id, **fhir_access(fhir_server.base_url, fhir_server.token))
    body["context"]["encounterId"] = "enc-3"
    assert client.post(PATH, json=body, headers=issuer.headers(PATH)).status_code == 200
    jobs = set(redis_client.scan_iter(match=JobStore.key("*")))

    # The chart opens: the EHR sends the first page of each search under its own links (no next link).
    queries = {
        "conditions": f"Condition?patient={patient_id}&clinical-status=active",
        "medications": f"MedicationRequest?patient={patient_id}&status=active",
        "allergies": f"AllergyIntolerance?patient={patient_id}",
        "observations": f"Observation?patient={patient_id}&_sort=-date&_count=30",
    }
    prefetch = {"patient": fhir_server.get(f"Patient/{patient_id}")}
    for key, query in queries.items():
        prefetch[key] = fhir_server.get(query)
        prefetch[key]["link"] = [{"relation": "self", "url": f"https://ehr.test/{key}"}]
    view = hook_body("patient-view", patient_id, prefetch=prefetch)
    opened = client.post(SUMMARY, json=view, headers=issuer.headers(SUMMARY))
    assert opened.status_code == 200, opened.json
    # The job the check-in asked for, not a new one.
    assert set(redis_client.scan_iter(match=JobStore.key("*"))) == jobs
    ai_card = opened.json["cards"][1]
    if ai_card["summary"] in waiting("Pre-visit summary"):
        assert JobStore.key(job_id_of(ai_card)).encode() in jobs


def test_encounter_id_is_required(client: FlaskClient, issuer: Issuer, hook_body) -> None:
    response = client.post(PATH, json=hook_body("encounter-start", "p1"), headers=issuer.headers(PATH))
    assert response.status_code == 400
    assert response.json["details"][0]["field"] == "context.encounterId"
