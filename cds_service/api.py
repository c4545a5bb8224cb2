"""HTTP endpoints: discovery, hooks, feedback, health. Views stay thin; the pipeline lives in ``invoke``."""

from __future__ import annotations

import logging
import time
from datetime import UTC
from typing import Any

import orjson
from flask import Blueprint
from flask import Response
from flask import current_app
from flask import jsonify
from flask import render_template
from flask import request

from cds_service.drafts import DraftOwner
from cds_service.errors import BadRequest
from cds_service.errors import CdsError
from cds_service.errors import NotFound
from cds_service.errors import UnsupportedMediaType
from cds_service.invoke import json_problem
from cds_service.invoke import run_service
from cds_service.invoke import validate
from cds_service.job_progress import role_of
from cds_service.job_progress import with_progress
from cds_service.jobs import JobQueue
from cds_service.jobs import live_workers
from cds_service.jobs import workers_with_another_secret
from cds_service.metrics import count_feedback
from cds_service.metrics import count_job_lookup
from cds_service.metrics import count_limit
from cds_service.metrics import count_tolerated
from cds_service.metrics import observe_prefetch
from cds_service.registry import ServiceDefinition
from cds_service.signed_links import link_grants
from cds_service.wire import DiscoveryResponse
from cds_service.wire import FeedbackRequest
from cds_service.wire import JobRecord
from fhir_mappings.ai_cards import ai_state

bp = Blueprint("cds", __name__)
log = logging.getLogger("cds_service.api")


def services() -> Any:
    """Return the app's ``Services`` bundle."""
    return current_app.extensions["cds"]


def read_json_body() -> Any:
    """Return the parsed JSON body; 415 when it isn't JSON, 400 when it doesn't parse or nests too deep."""
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType("send the body as JSON (Content-Type: application/json)")
    raw = request.get_data(cache=False)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("body is not valid JSON") from None
    problem = json_problem(raw, body, services().settings.max_json_depth)
    if problem:
        raise BadRequest(problem)
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def find_service(service_id: str) -> ServiceDefinition:
    """Return the declared service with this id; 404 otherwise."""
    definition = services().registry.get(service_id)
    if definition is None:
        raise NotFound(f"no CDS service with id '{service_id}'")
    return definition


def authenticate(path: str) -> dict[str, Any]:
    """Verify the caller's JWT for the endpoint at ``path`` (its ``aud`` is PUBLIC_URL + path)."""
    audience = services().settings.public_url.rstrip("/") + path
    return services().verifier.verify(request.headers.get("Authorization"), audience)


@bp.get("/cds-services")
def discovery() -> Response:
    """§Discovery: every declared service, sorted by id; open to all (no PHI)."""
    return jsonify(DiscoveryResponse(services=services().registry.descriptors()).wire())


@bp.post("/cds-services/<service_id>")
def call_service(service_id: str) -> Response:
    """§Calling a CDS Service: run the hook and answer its cards."""
    definition = find_service(service_id)
    claims = authenticate(f"/cds-services/{service_id}")
    started = time.perf_counter()
    body = read_json_body()
    deps = services()
    background = definition.precomputes == "background"
    jobs = JobQueue(
        deps.jobs,
        deps.task_messages,
        deps.settings,
        definition.id,
        # A precompute trigger never waits: nobody is looking at the answer's AI card.
        deadline=time.monotonic() + (0 if definition.precomputes else deps.settings.hook_budget_ms / 1000),
        capacity=deps.capacity,
        on_lookup=count_job_lookup,
        background=background,
        trigger=definition.id if definition.precomputes else None,
        count_first_calls=definition.hook == "patient-view",
    )
    call = None
    status, outcome, cards = 200, "ok", 0
    try:
        call, response = run_service(
            definition,
            body,
            settings=deps.settings,
            http=deps.http,
            executor=deps.executor,
            cache=deps.prefetch_cache,
            jobs=jobs,
            drafts=deps.drafts,
            owner=DraftOwner.of(claims),
            on_fetch=observe_prefetch,
            on_limit=lambda limit: count_limit(definition.id, limit),
            today=deps.today(),
            image_reads=deps.image_reads,
        )
        cards = len(response.cards)
        count_tolerated(definition.id, call.tolerated)
        return jsonify(response.wire())
    except CdsError as error:
        status, outcome = error.status, error.code
        raise
    except Exception:
        status, outcome = 500, "internal-error"
        raise
    finally:
        record_audit(definition.id, body, call, status, outcome, cards, started)


def record_audit(
    service_id: str, body: dict[str, Any], call: Any, status: int, outcome: str, cards: int, started: float
) -> None:
    """Hand the hook's audit row to the background writer (it never waits on the database)."""
    services().audit.record(
        service_id=service_id,
        hook_instance=str(body.get("hookInstance", ""))[:64],
        patient_id=call.context.patient_id if call else None,
        status=status,
        outcome=outcome,
        cards=cards,
        latency_ms=(time.perf_counter() - started) * 1000,
    )


@bp.post("/cds-services/<service_id>/feedback")
def feedback(service_id: str) -> Response:
    """§Feedback: store what the clinician did with each card; 200 with an empty object."""
    definition = find_service(service_id)
    authenticate(f"/cds-services/{service_id}/feedback")
    feedback_request = validate(FeedbackRequest, read_json_body())
    services().store.add_feedback(definition.id, feedback_request.feedback)
    for item in feedback_request.feedback:
        count_feedback(item.outcome)
    return jsonify({})


@bp.get("/jobs/<job_id>")
def job_status(job_id: str) -> Response:
    """A model job's state (queued | running | done | failed), where it stands while it waits (live workers,
    jobs ahead, expected wait), timestamps and, when done, its result.

    Open to an EHR's JWT, or to the signed link a card carries (a clinician's browser has no JWT).
    """
    if not link_grants(services().settings, "job-status", job_id, request.args.get("access")):
        authenticate(f"/jobs/{job_id}")
    deps = services()
    record = deps.jobs.get(job_id) if job_id.isalnum() and len(job_id) <= 64 else None
    if record is None:
        raise NotFound("no such job (it may have expired)")
    model = deps.settings.image_model if role_of(record.task) == "image" else deps.settings.text_model
    record = with_progress(record, deps.redis, deps.capacity, model) or record
    # A clinician's browser asks for HTML first; EHRs, scripts and */* get JSON, the documented default.
    if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
        response = Response(job_status_page(record), mimetype="text/html")
        # The page may show model text about a patient: no shared or browser cache keeps it.
        response.headers["Cache-Control"] = "no-store"
    else:
        response = jsonify(record.wire())
    response.vary.add("Accept")
    return response


#: Headings for the fields of the model outputs (fhir_mappings/model_outputs.py); others are spelled out.
RESULT_HEADINGS = {
    "evidence_ids": "Evidence (record entries the model cited)",
    "follow_up": "Follow-up",
    "order_id": "Order",
}
JOB_PAGE_REFRESH_S = 5


def job_status_page(record: JobRecord) -> str:
    """Return the HTML page of a job for a clinician: its state in words, progress and a readable result.

    Rendered with autoescaping, from the record only: no patient name, token or link with a token on it.
    """
    progress = [
        ("Queued", record.created_at),
        ("Started", record.started_at),
        ("Finished", record.finished_at),
    ]
    return render_template(
        "job_status.html",
        record=record,
        state=ai_state(record),
        progress=[(label, f"{at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC") for label, at in progress if at],
        headings=RESULT_HEADINGS,
        refresh_s=JOB_PAGE_REFRESH_S if record.state in ("queued", "running") else None,
    )


@bp.get("/feedback/summary")
def feedback_summary() -> Response:
    """For operators: accepted/overridden counts per service (no PHI)."""
    return jsonify({"services": services().store.feedback_summary()})


@bp.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Readiness: Redis and the database answer and services are loaded (503 otherwise).

    Model workers are reported too; without them, or with a worker whose MEDGEMMA_CDS_SECRET_KEY differs
    from the API's, the service is "degraded" but ready: hooks still answer their rule cards and say the AI
    analysis is pending.
    """
    deps = services()
    checks: dict[str, bool] = {"services": len(deps.registry.services) > 0, "database": deps.store.ping()}
    workers: dict[str, int] = {}
    other_secret = 0
    try:
        checks["redis"] = bool(deps.redis.ping())
        workers = live_workers(deps.redis)
        other_secret = workers_with_another_secret(deps.redis, deps.settings)
    except Exception:  # noqa: BLE001 - any Redis failure means "not ready"
        checks["redis"] = False
    missing = [name for name, ok in checks.items() if not ok]
    missing_workers = [f"workers:{role}" for role, count in workers.items() if count == 0]
    if other_secret:
        # Such a worker fails every job it takes: the AI is down though the worker looks alive.
        missing_workers.append("workers:secret-key")
    status = "not-ready" if missing else "degraded" if missing_workers or not workers else "ready"
    body: dict[str, Any] = {"status": status, "checks": checks, "workers": workers}
    if other_secret:
        body["workersWithAnotherSecretKey"] = other_secret
    if missing or missing_workers:
        body["missing"] = missing + missing_workers
    return jsonify(body), 503 if missing else 200
