"""FHIR R4 Subscription (rest-hook) notifications: new imaging gets its AI draft before the chart opens.

How HAPI FHIR delivers a rest-hook notification (``SubscriptionDeliveringRestHookSubscriber``): with
``channel.payload`` set it acts as a FHIR client of the endpoint, so a created or updated resource is PUT to
``{endpoint}/{type}/{id}`` with the resource as the body and a deleted one is a DELETE there; with no payload
it POSTs an empty body to the endpoint itself. Every request carries the Subscription's ``channel.header``
lines, here ``Authorization: Bearer <MEDGEMMA_CDS_FHIR_SUBSCRIPTION_SECRET>``. Some servers POST the resource
to the endpoint instead; that is read the same way.

A notified ImagingStudy, Media, DocumentReference or DiagnosticReport names its patient (``subject``): the
patient's imaging is read back from ``MEDGEMMA_CDS_FHIR_SUBSCRIPTION_SERVER`` exactly as the
imaging-report-draft chart open reads it, and the same imaging-read job is asked for, on the precompute
queue. The answer is an OperationOutcome saying what was done (HAPI's client parses a FHIR answer).
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from flask import Blueprint
from flask import Response
from flask import current_app
from flask import request

from cds_service.errors import BadRequest
from cds_service.errors import NotFound
from cds_service.errors import Unauthorized
from cds_service.fhir_client import FhirReadError
from cds_service.invoke import json_problem
from cds_service.precompute import IMAGING_TYPES
from cds_service.precompute import Precomputer
from cds_service.precompute import notified_patient
from cds_service.precompute import operator_reader
from fhir_mappings.read_models import read_resource

bp = Blueprint("notifications", __name__)
log = logging.getLogger("cds_service.notifications")

#: The channels ``medgemma-cds subscribe`` creates Subscriptions for: one, for the imaging resource types.
CHANNELS = ("imaging",)
FHIR_JSON = "application/fhir+json"


def _outcome(text: str) -> Response:
    """Return 200 with an informational OperationOutcome saying what was done (no patient named)."""
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational", "diagnostics": text}],
    }
    return Response(json.dumps(body), status=200, mimetype=FHIR_JSON)


def _authenticate(channel_id: str) -> None:
    """Refuse (404) an unknown channel or one not configured; refuse (401) a wrong or missing secret."""
    settings = current_app.extensions["cds"].settings
    secret = settings.fhir_subscription_secret.get_secret_value() if settings.fhir_subscription_secret else ""
    if channel_id not in CHANNELS or not secret or not settings.fhir_subscription_server:
        raise NotFound("no such notification channel (FHIR subscription notifications are not configured)")
    sent = request.headers.get("Authorization", "")
    scheme, _, token = sent.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), secret.encode()):
        log.warning("refused a FHIR notification: missing or wrong subscription secret")
        raise Unauthorized("Unauthorized")


def _body() -> dict[str, Any] | None:
    """Return the notified resource's JSON, None for an empty notification; 400 when it is not FHIR JSON."""
    text = request.get_data(cache=False).decode(errors="replace")
    if not text.strip():
        return None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise BadRequest("the notification body is not valid JSON") from None
    problem = json_problem(text.encode(), body, current_app.extensions["cds"].settings.max_json_depth)
    if problem:
        raise BadRequest(problem)
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise BadRequest("the notification body is not a FHIR resource")
    return body


def _precompute_imaging(resource_type: str, resource_id: str | None, body: dict[str, Any] | None) -> Response:
    """Ask for the imaging-read job of the notified resource's patient; answer what was done."""
    if resource_type not in IMAGING_TYPES:
        return _outcome(f"ignored: {resource_type} is not an imaging resource")
    deps = current_app.extensions["cds"]
    settings = deps.settings
    server = settings.fhir_subscription_server
    token = settings.fhir_subscription_token.get_secret_value() if settings.fhir_subscription_token else None
    reader = operator_reader(settings, deps.http, server, token)
    resource = read_resource(body) if body is not None else None
    patient_id = notified_patient(resource) if resource is not None else None
    if patient_id is None and resource_id:
        # No payload (or no subject in it): the server holds the resource that changed.
        try:
            data, _seconds = reader.read(f"{resource_type}/{resource_id}")
            patient_id = notified_patient(read_resource(data))
        except (FhirReadError, ValueError):
            log.warning("a notified %s could not be read back from the FHIR server", resource_type)
            return _outcome("read-failed")
    if patient_id is None:
        return _outcome(f"ignored: the {resource_type} names no patient")
    precomputer = Precomputer(
        settings, deps.registry, deps.jobs, deps.capacity, deps.task_messages, deps.executor, deps.today
    )
    outcome = precomputer.imaging(reader, server, patient_id, trigger="subscription")
    log.info("FHIR notification handled", extra={"resource_type": resource_type, "outcome": outcome})
    return _outcome(outcome)


@bp.put("/fhir-notifications/<channel_id>/<resource_type>/<resource_id>")
def notified_resource(channel_id: str, resource_type: str, resource_id: str) -> Response:
    """A created or updated resource, as HAPI delivers it with a payload (a FHIR update of the endpoint)."""
    _authenticate(channel_id)
    body = _body()
    if body is not None and (body.get("resourceType"), str(body.get("id", resource_id))) != (
        resource_type,
        resource_id,
    ):
        raise BadRequest("the notified resource is not the one the URL names")
    return _precompute_imaging(resource_type, resource_id, body)


@bp.post("/fhir-notifications/<channel_id>")
def notified(channel_id: str) -> Response:
    """A notification POSTed to the endpoint: empty (HAPI without payload), or the resource itself."""
    _authenticate(channel_id)
    body = _body()
    if body is None:
        # An empty notification says something matched, not what: the morning sweep and the chart open
        # still find it; create the Subscription with a payload (``medgemma-cds subscribe``) to act on it.
        return _outcome("ignored: an empty notification names no resource")
    return _precompute_imaging(body["resourceType"], body.get("id"), body)


@bp.delete("/fhir-notifications/<channel_id>/<resource_type>/<resource_id>")
def notified_deletion(channel_id: str, resource_type: str, resource_id: str) -> Response:
    """A deleted resource (HAPI with a payload): nothing to prepare; a stale job is never shown as current,
    since the chart open no longer asks for it."""
    _authenticate(channel_id)
    return _outcome("ignored: a deletion needs no draft")
