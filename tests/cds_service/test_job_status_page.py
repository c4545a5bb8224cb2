"""The job-status link: an HTML page for a clinician's browser, JSON for EHRs and scripts (``Accept``)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient
from support import Issuer
from support import RedisServer

SUMMARY = "/cds-services/patient-summary"
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
FAMILY = "Quillfeather"


def empty_bundle() -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": 0}


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A database of this module's own: no worker heartbeats in it, so no worker serves the queue."""
    return redis_server.new_database()


@pytest.fixture
def job_link(client: FlaskClient, issuer: Issuer, hook_body: Callable[..., dict[str, Any]]) -> str:
    """Return the signed status link (path and query) of the model job a patient-summary call queued."""
    patient_id = f"p-{uuid.uuid4().hex[:10]}"
    patient = {"resourceType": "Patient", "id": patient_id, "name": [{"family": FAMILY, "given": ["Ada"]}]}
    prefetch = {
        "patient": patient,
        "conditions": empty_bundle(),
        "medications": empty_bundle(),
        "allergies": empty_bundle(),
        "observations": empty_bundle(),
    }
    response = client.post(
        SUMMARY,
        json=hook_body("patient-view", patient_id, prefetch=prefetch),
        headers=issuer.headers(SUMMARY),
    )
    assert response.status_code == 200, response.json
    links = [
        link["url"]
        for card in response.json["cards"]
        for link in card.get("links", [])
        if "/jobs/" in link["url"]
    ]
    assert len(links) == 1
    url = urlsplit(links[0])
    return f"{url.path}?{url.query}"


def job_id_of(link: str) -> str:
    return link.split("/jobs/")[1].split("?")[0]


def access_of(link: str) -> str:
    return link.split("access=")[1]


def test_a_browser_gets_a_page_that_refreshes_while_the_job_is_queued(
    client: FlaskClient, job_link: str
) -> None:
    response = client.get(job_link, headers={"Accept": BROWSER})
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    # This module's Redis database has no worker heartbeats: the job waits for a worker that isn't there.
    assert '<p class="state unavailable" id="state">AI analysis unavailable</p>' in page
    assert "No model worker is running for it" in page
    assert '<meta http-equiv="refresh" content="5">' in page
    assert "AI-generated draft — requires clinician review; MedGemma is not a clinical-grade model" in page
    assert "Attempts" in page and "Queued" in page
    # Neither the patient's name nor the link's token is on the page (the refresh reloads the same URL).
    assert FAMILY not in page and "Ada" not in page
    assert access_of(job_link) not in page
    assert response.headers["Cache-Control"] == "no-store"
    assert "Accept" in response.headers["Vary"]


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "application/fhir+json"])
def test_clients_get_json_by_default(client: FlaskClient, job_link: str, accept: str | None) -> None:
    headers = {"Accept": accept} if accept else {}
    response = client.get(job_link, headers=headers)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.json["id"] == job_id_of(job_link)
    assert response.json["state"] == "queued"
    assert "Accept" in response.headers["Vary"]


def test_the_jwt_path_negotiates_too(client: FlaskClient, issuer: Issuer, job_link: str) -> None:
    path = job_link.split("?")[0]
    as_json = client.get(path, headers=issuer.headers(path))
    assert as_json.status_code == 200 and as_json.json["state"] == "queued"
    as_html = client.get(path, headers=issuer.headers(path) | {"Accept": "text/html"})
    assert as_html.status_code == 200 and as_html.mimetype == "text/html"
    assert "Queued" in as_html.get_data(as_text=True)


def test_without_the_signed_link_or_a_jwt_a_browser_gets_401(client: FlaskClient, job_link: str) -> None:
    response = client.get(job_link.split("?")[0], headers={"Accept": BROWSER})
    assert response.status_code == 401
    assert (
        client.get(job_link.replace(job_id_of(job_link), "0" * 40), headers={"Accept": BROWSER}).status_code
        == 401
    )


def test_a_done_job_shows_its_result_readably_and_escaped(
    app: Flask, client: FlaskClient, job_link: str
) -> None:
    jobs = app.extensions["cds"].jobs
    job_id = job_id_of(job_link)
    jobs.start(job_id, "test-worker")
    result = {
        "summary": "Stable <script>alert('x')</script> hypertension.",
        "key_problems": ["Essential hypertension", "Type 2 diabetes"],
        "medication_concerns": [],
        "follow_up": ["Recheck HbA1c in 3 months"],
        "evidence_ids": ["Condition/c1"],
    }
    fields = {
        "state": "done",
        "result": json.dumps(result),
        "model": "google/medgemma-27b-text-it",
        "seconds": 2.5,
    }
    assert jobs.finish(job_id, fields)
    response = client.get(job_link, headers={"Accept": BROWSER})
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert '<p class="state done" id="state">AI analysis done</p>' in page
    assert 'http-equiv="refresh"' not in page
    for heading in (
        "Summary",
        "Key problems",
        "Medication concerns",
        "Follow-up",
        "Evidence (record entries",
    ):
        assert f">{heading}" in page
    assert "<li><p>Essential hypertension</p></li>" in page
    assert "Recheck HbA1c in 3 months" in page
    # Model text is data: escaped, never markup, and the result is never shown as raw JSON.
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert '"key_problems"' not in page and "{" not in page.split('id="result"')[1]
    assert "google/medgemma-27b-text-it" in page and "2.5 s" in page
    assert "Finished" in page and "Started" in page
    assert "AI-generated draft — requires clinician review" in page
    assert client.get(job_link).json["result"] == result


def test_a_failed_job_says_so(app: Flask, client: FlaskClient, job_link: str) -> None:
    jobs = app.extensions["cds"].jobs
    job_id = job_id_of(job_link)
    assert jobs.finish(job_id, {"state": "failed", "error": "model task exceeded its time limit"})
    page = client.get(job_link, headers={"Accept": BROWSER}).get_data(as_text=True)
    assert ">AI analysis failed<" in page and "the model took longer than it is allowed to" in page
    # The record's error is for operators (JSON); the clinician's page says what failed in plain words.
    assert "model task exceeded" not in page
    assert 'http-equiv="refresh"' not in page
