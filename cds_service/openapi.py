"""Serves ``GET /openapi.json``: an OpenAPI 3.1 description of the service, generated from the wire models.

Request and response bodies come from the pydantic models in ``cds_service/wire.py`` (requests in validation
mode, responses in serialization mode, so each side is described as it is parsed or written); the error
bodies are the ones ``errors.py`` renders. The document is built once per app from its registry and routes,
without I/O, and served from that cache afterwards.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint
from flask import Flask
from flask import Response
from flask import current_app
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode
from pydantic.json_schema import models_json_schema

from cds_service.drafts_api import DraftView
from cds_service.drafts_api import RejectRequest
from cds_service.drafts_api import SignRequest
from cds_service.wire import HOOK_CONTEXTS
from cds_service.wire import DiscoveryResponse
from cds_service.wire import FeedbackRequest
from cds_service.wire import HookRequest
from cds_service.wire import HookResponse
from cds_service.wire import JobRecord

bp = Blueprint("openapi", __name__)

OPENAPI_VERSION = "3.1.0"
SECURITY_SCHEME = "cdsHooksJwt"
SUBSCRIPTION_SCHEME = "fhirSubscriptionSecret"
_CACHE_KEY = "cds_openapi_json"
_SCHEMA_REF = "#/components/schemas/{model}"

# Each model in the mode its bodies cross the wire: parsed (validation) or written (serialization).
_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (HookRequest, "validation"),
    (FeedbackRequest, "validation"),
    *((context, "validation") for context in HOOK_CONTEXTS.values()),
    (HookResponse, "serialization"),
    (DiscoveryResponse, "serialization"),
    (JobRecord, "serialization"),
    (SignRequest, "validation"),
    (RejectRequest, "validation"),
    (DraftView, "serialization"),
]

_ERROR = {
    "type": "object",
    "description": "Every error answer but 412: a stable code and a message without PHI or tokens.",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "Stable machine-readable code, e.g. bad-request."},
        "message": {"type": "string"},
        "details": {
            "type": "array",
            "description": "One entry per failing field (400); input values are never echoed.",
            "items": {
                "type": "object",
                "required": ["field", "problem"],
                "properties": {"field": {"type": "string"}, "problem": {"type": "string"}},
            },
        },
        "requestId": {"type": "string", "description": "Present on 500: quote it to the operator."},
    },
}

# CDS Hooks 2.0 §Prefetch: data that can be neither prefetched nor read answers 412; the body is an R4
# OperationOutcome naming the prefetch key (as the 3.0 ballot adds).
_OPERATION_OUTCOME = {
    "type": "object",
    "description": "FHIR R4 OperationOutcome: which prefetch key could not be obtained and why.",
    "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"const": "OperationOutcome"},
        "issue": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["severity", "code"],
                "properties": {
                    "severity": {"enum": ["fatal", "error", "warning", "information"]},
                    "code": {"type": "string"},
                    "diagnostics": {"type": "string"},
                    "expression": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}

_EXTRA_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _ERROR,
    "OperationOutcome": _OPERATION_OUTCOME,
    "FeedbackAccepted": {
        "type": "object",
        "description": "§Feedback: an empty object.",
        "maxProperties": 0,
    },
    "FeedbackSummary": {
        "type": "object",
        "required": ["services"],
        "properties": {
            "services": {
                "type": "object",
                "description": "Counts per service id.",
                "additionalProperties": {
                    "type": "object",
                    "required": ["accepted", "overridden"],
                    "properties": {
                        "accepted": {"type": "integer", "minimum": 0},
                        "overridden": {"type": "integer", "minimum": 0},
                    },
                },
            }
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"const": "ok"}},
    },
    "Readiness": {
        "type": "object",
        "description": "degraded: ready, but a model queue has no live worker (hooks answer rule cards).",
        "required": ["status", "checks"],
        "properties": {
            "status": {"enum": ["ready", "degraded", "not-ready"]},
            "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
            "workers": {
                "type": "object",
                "description": "Live workers per model role.",
                "additionalProperties": {"type": "integer", "minimum": 0},
            },
            "missing": {"type": "array", "items": {"type": "string"}},
        },
    },
}

# status -> (component name, description); 412 has its own body shape.
_ERROR_RESPONSES: dict[int, tuple[str, str]] = {
    400: (
        "BadRequest",
        "Malformed JSON, a field that fails validation, or a fhirServer refused by the guard.",
    ),
    401: ("Unauthorized", "Missing or invalid JWT (any reason; the reason is only logged)."),
    404: ("NotFound", "No such service, job or draft."),
    409: ("Conflict", "The draft's state forbids it (signing a rejected draft, a deleted patient)."),
    412: ("PrefetchFailed", "Data the service needs was neither prefetched nor readable from fhirServer."),
    413: ("PayloadTooLarge", "Body larger than the configured limit."),
    415: ("UnsupportedMediaType", "Body is not JSON."),
    500: ("InternalError", "Unexpected failure; the body carries a request id, the log the details."),
    502: (
        "FhirServerError",
        "A FHIR server (fhirServer or write-back) answered with an error or invalid FHIR.",
    ),
    503: ("Unavailable", "A dependency (e.g. the JWT replay store) is down."),
    504: ("FhirServerTimeout", "fhirServer did not answer in time."),
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _SCHEMA_REF.format(model=name)}


def _response(description: str, schema: dict[str, Any], **headers: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}, **headers},
        "content": _json(schema),
    }


def _job_response(schema: dict[str, Any]) -> dict[str, Any]:
    answer = _response("The job: its JSON record, or its page for a browser.", schema)
    answer["content"]["text/html"] = {"schema": {"type": "string"}}
    return answer


def _errors(*statuses: int) -> dict[str, dict[str, str]]:
    return {
        str(status): {"$ref": f"#/components/responses/{_ERROR_RESPONSES[status][0]}"} for status in statuses
    }


def _error_components() -> dict[str, dict[str, Any]]:
    responses: dict[str, dict[str, Any]] = {}
    for status, (name, description) in _ERROR_RESPONSES.items():
        body = _ref("OperationOutcome") if status == 412 else _ref("Error")
        if status == 401:
            www_authenticate = {"description": "Always Bearer.", "schema": {"type": "string"}}
            responses[name] = _response(description, body, **{"WWW-Authenticate": www_authenticate})
        else:
            responses[name] = _response(description, body)
    return responses


def model_schemas() -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Return each wire model's ``$ref`` (by model name) and every schema they need (by component name)."""
    refs, top = models_json_schema(_MODELS, by_alias=True, ref_template=_SCHEMA_REF)
    schemas: dict[str, dict[str, Any]] = dict(top.get("$defs", {}))
    by_name = {model.__name__: ref for (model, _mode), ref in refs.items()}
    hook_request = schemas[by_name["HookRequest"]["$ref"].rsplit("/", 1)[-1]]
    # The model takes any hook name and a plain context object and checks both against the service called;
    # the document names the hooks understood and their context shapes, which is what a caller needs.
    hook_request["properties"]["hook"] = {
        "type": "string",
        "enum": sorted(HOOK_CONTEXTS),
        "description": "The hook that fired; it must be the hook of the service called (see discovery).",
    }
    hook_request["properties"]["context"] = {
        "type": "object",
        "description": "The hook's context (https://cds-hooks.org/hooks/): one shape per hook.",
        "anyOf": [by_name[context.__name__] for context in HOOK_CONTEXTS.values()],
    }
    hook_response = schemas[by_name["HookResponse"]["$ref"].rsplit("/", 1)[-1]]
    # wire() always writes cards, even empty (§CDS Service Response: "cards" is REQUIRED).
    hook_response["required"] = ["cards"]
    return by_name, schemas


def build_document(app: Flask) -> dict[str, Any]:
    """Return the OpenAPI 3.1 document of ``app``: its routes, registered service ids and wire models."""
    services = app.extensions["cds"]
    refs, schemas = model_schemas()
    service_ids = sorted(services.registry.services)
    service_id = {
        "name": "service_id",
        "in": "path",
        "required": True,
        "description": "A service id from discovery.",
        "schema": {"type": "string", "enum": service_ids},
    }
    jwt = [{SECURITY_SCHEME: []}]
    paths: dict[str, Any] = {
        "/cds-services": {
            "get": {
                "operationId": "discovery",
                "summary": "§Discovery: the services offered, sorted by id (no authentication, no PHI).",
                "responses": {
                    "200": _response("The services.", refs["DiscoveryResponse"]),
                    **_errors(500),
                },
            }
        },
        "/cds-services/{service_id}": {
            "post": {
                "operationId": "callService",
                "summary": "§Calling a CDS Service: run the hook and answer its cards.",
                "security": jwt,
                "parameters": [service_id],
                "requestBody": {"required": True, "content": _json(refs["HookRequest"])},
                "responses": {
                    "200": _response("Cards (possibly none) and system actions.", refs["HookResponse"]),
                    **_errors(400, 401, 404, 412, 413, 415, 500, 502, 503, 504),
                },
            }
        },
        "/cds-services/{service_id}/feedback": {
            "post": {
                "operationId": "feedback",
                "summary": "§Feedback: what the clinician did with each card.",
                "security": jwt,
                "parameters": [service_id],
                "requestBody": {"required": True, "content": _json(refs["FeedbackRequest"])},
                "responses": {
                    "200": _response("Feedback stored.", _ref("FeedbackAccepted")),
                    **_errors(400, 401, 404, 413, 415, 500, 503),
                },
            }
        },
        "/feedback/summary": {
            "get": {
                "operationId": "feedbackSummary",
                "summary": "For operators: accepted and overridden counts per service (no PHI).",
                "responses": {"200": _response("Counts.", _ref("FeedbackSummary")), **_errors(500)},
            }
        },
        "/healthz": {
            "get": {
                "operationId": "liveness",
                "summary": "Liveness: the process answers.",
                "responses": {"200": _response("Alive.", _ref("Health")), **_errors(500)},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readiness",
                "summary": "Readiness: services loaded, database and Redis answer.",
                "responses": {
                    "200": _response("Ready.", _ref("Readiness")),
                    "503": _response("Not ready; missing names what is down.", _ref("Readiness")),
                    **_errors(500),
                },
            }
        },
    }
    paths["/jobs/{job_id}"] = {
        "get": {
            "operationId": "jobStatus",
            "summary": "A model job's state, timestamps and, when done, its result.",
            "security": jwt,
            "description": (
                "Takes the EHR's JWT, or instead the signed ``access`` link a card carries. Negotiated on "
                "``Accept``: a browser preferring ``text/html`` gets a page for a clinician (the state in "
                "words, progress, the result readably, refreshing itself until done); ``*/*``, JSON or no "
                "``Accept`` gets the JSON record."
            ),
            "parameters": [
                {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "access", "in": "query", "required": False, "schema": {"type": "string"}},
            ],
            "responses": {
                "200": _job_response(refs["JobRecord"]),
                **_errors(400, 401, 404, 500, 503),
            },
        }
    }
    paths.update(draft_paths(refs, jwt))
    paths.update(notification_paths())
    paths.update(review_paths())
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "medgemma-cds",
            "version": "2.0",
            "summary": "CDS Hooks 2.0 services backed by MedGemma.",
            "description": "Implements CDS Hooks 2.0 (https://cds-hooks.hl7.org/2.0/).",
        },
        "servers": [{"url": services.settings.public_url.rstrip("/") or "/"}],
        "paths": paths,
        "components": {
            "schemas": {**schemas, **_EXTRA_SCHEMAS},
            "responses": _error_components(),
            "headers": {
                "RequestId": {
                    "description": "The request's id, as in the service's log lines.",
                    "schema": {"type": "string"},
                }
            },
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": (
                        "CDS Hooks 2.0 §Trusting CDS Clients: a JWT signed by a trusted EHR, its aud the "
                        "exact URL called, used once (jti)."
                    ),
                },
                SUBSCRIPTION_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "The shared secret MEDGEMMA_CDS_FHIR_SUBSCRIPTION_SECRET, which the FHIR server "
                        "sends with each notification (Subscription.channel.header 'Authorization: Bearer')."
                    ),
                },
            },
        },
    }


def draft_paths(refs: dict[str, dict[str, Any]], jwt: list[dict[str, list[str]]]) -> dict[str, Any]:
    """Return the draft endpoints: the worklist and JSON sign-off (JWT), and the review page (signed link)."""
    draft_id = {"name": "draft_id", "in": "path", "required": True, "schema": {"type": "string"}}
    access = {
        "name": "access",
        "in": "query",
        "required": True,
        "description": "The signed, expiring review link token from the card's SMART link.",
        "schema": {"type": "string"},
    }
    draft_list = {"type": "object", "properties": {"drafts": {"type": "array", "items": refs["DraftView"]}}}

    def decision(operation: str, summary: str, body: str) -> dict[str, Any]:
        return {
            "post": {
                "operationId": operation,
                "summary": summary,
                "description": "The review page posts the same fields as a form with its ``access`` token.",
                "security": jwt,
                "parameters": [draft_id],
                "requestBody": {"required": True, "content": _json(refs[body])},
                "responses": {
                    "200": _response("The draft after the decision.", refs["DraftView"]),
                    **_errors(400, 401, 404, 409, 415, 500, 502),
                },
            }
        }

    return {
        "/drafts": {
            "get": {
                "operationId": "listDrafts",
                "summary": "Worklist of AI report drafts, filtered by patient and status (e.g. draft).",
                "security": jwt,
                "parameters": [
                    {"name": "patient", "in": "query", "schema": {"type": "string"}},
                    {"name": "status", "in": "query", "schema": {"enum": ["draft", "signed", "rejected"]}},
                ],
                "responses": {
                    "200": _response("Drafts, newest first.", draft_list),
                    **_errors(400, 401, 500),
                },
            }
        },
        "/drafts/{draft_id}": {
            "get": {
                "operationId": "getDraft",
                "summary": "One draft: the AI text and, once decided, the signed text or the reason.",
                "security": jwt,
                "parameters": [draft_id],
                "responses": {
                    "200": _response("The draft.", refs["DraftView"]),
                    **_errors(400, 401, 404, 500),
                },
            }
        },
        "/drafts/{draft_id}/sign": decision(
            "signDraft",
            "Sign: the report becomes final with the clinician's text, written back once.",
            "SignRequest",
        ),
        "/drafts/{draft_id}/reject": decision(
            "rejectDraft", "Reject with a reason; nothing is written to the record.", "RejectRequest"
        ),
        "/drafts/{draft_id}/review": {
            "get": {
                "operationId": "reviewPage",
                "summary": "The clinician's review page (HTML), opened from the card's SMART link.",
                "parameters": [draft_id, access],
                "responses": {
                    "200": {
                        "description": "The page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    **_errors(400, 401, 404),
                },
            }
        },
    }


def review_paths() -> dict[str, Any]:
    """Return the review app's pages (SMART on FHIR): every answer, a refusal included, is an HTML page."""

    def page(description: str) -> dict[str, Any]:
        return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}

    refusals = {
        str(status): page(why)
        for status, why in (
            (
                400,
                "Refused: the launch or the sign-in answer is incomplete, used or forged, or the "
                "address or a field holds a control character.",
            ),
            (401, "Refused: no live review session (open the draft from the EHR)."),
            (403, "Refused: untrusted EHR, another patient's draft, not a clinician, or a CSRF failure."),
            (404, "No such draft."),
            (409, "The draft's state forbids it (e.g. signing a rejected draft)."),
            (503, "The review app is temporarily unavailable (its session store does not answer)."),
        )
    }
    draft_id = {"name": "draft_id", "in": "path", "required": True, "schema": {"type": "string"}}
    form = {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "properties": {"csrf": {"type": "string"}, "text": {"type": "string"}},
                }
            }
        },
    }

    def post(operation: str, summary: str, fields: dict[str, Any]) -> dict[str, Any]:
        body = json.loads(json.dumps(form))
        body["content"]["application/x-www-form-urlencoded"]["schema"]["properties"] = fields
        return {
            "post": {
                "operationId": operation,
                "summary": summary,
                "parameters": [draft_id],
                "requestBody": body,
                "responses": {"200": page("The draft after the decision."), **refusals},
            }
        }

    csrf = {"type": "string", "description": "The session's CSRF token, from the page's form."}
    return {
        "/review/launch": {
            "get": {
                "operationId": "reviewLaunch",
                "summary": "SMART launch: EHR launch (iss and launch) or standalone (iss only) of a draft.",
                "parameters": [
                    {"name": name, "in": "query", "required": name == "iss", "schema": {"type": "string"}}
                    for name in ("iss", "launch", "draft")
                ],
                "responses": {"302": {"description": "To the EHR's authorization endpoint."}, **refusals},
            }
        },
        "/review/callback": {
            "get": {
                "operationId": "reviewCallback",
                "summary": "The authorization answer: state, code and id_token checked; a session opened.",
                "parameters": [
                    {"name": name, "in": "query", "schema": {"type": "string"}}
                    for name in ("code", "state", "error")
                ],
                "responses": {"303": {"description": "To the draft or the worklist."}, **refusals},
            }
        },
        "/review/": {
            "get": {
                "operationId": "reviewWorklist",
                "summary": "The drafts awaiting review for the launch's patient.",
                "responses": {"200": page("The worklist."), **refusals},
            }
        },
        "/review/drafts/{draft_id}": {
            "get": {
                "operationId": "reviewDraft",
                "summary": "One draft: image, AI text, patient banner; edit, sign or reject for a clinician.",
                "parameters": [draft_id],
                "responses": {"200": page("The draft."), **refusals},
            }
        },
        "/review/drafts/{draft_id}/study": {
            "get": {
                "operationId": "reviewStudy",
                "summary": "The viewer's study: its series and instances, and the one the model read.",
                "parameters": [draft_id],
                "responses": {
                    "200": {
                        "description": "The study.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **refusals,
                },
            }
        },
        "/review/drafts/{draft_id}/instances/{series_uid}/{instance_uid}": {
            "get": {
                "operationId": "reviewInstance",
                "summary": "One instance of the draft's study from its PACS (DICOM Part 10), for the viewer.",
                "parameters": [
                    draft_id,
                    *(
                        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                        for name in ("series_uid", "instance_uid")
                    ),
                ],
                "responses": {
                    "200": {"description": "The instance.", "content": {"application/dicom": {}}},
                    **refusals,
                },
            }
        },
        "/review/drafts/{draft_id}/sign": post(
            "reviewSign",
            "Sign as the launch's clinician; written to the EHR with their token.",
            {"csrf": csrf, "text": {"type": "string", "maxLength": 20000}},
        ),
        "/review/drafts/{draft_id}/reject": post(
            "reviewReject",
            "Reject with a reason; nothing is written.",
            {"csrf": csrf, "reason": {"type": "string", "maxLength": 2000}},
        ),
        "/review/drafts/{draft_id}/write-back": post(
            "reviewWriteBack", "Write a signed report the EHR refused, again.", {"csrf": csrf}
        ),
    }


def notification_paths() -> dict[str, Any]:
    """Return the FHIR R4 Subscription (rest-hook) receiver: HAPI PUTs or DELETEs ``{endpoint}/{type}/{id}``
    when the Subscription has a payload, and POSTs to the endpoint itself when it has none."""
    security = [{SUBSCRIPTION_SCHEME: []}]
    channel = {
        "name": "channel_id",
        "in": "path",
        "required": True,
        "description": "The notification channel (`medgemma-cds subscribe` creates `imaging`).",
        "schema": {"enum": ["imaging"]},
    }
    resource = [
        {"name": "resource_type", "in": "path", "required": True, "schema": {"type": "string"}},
        {"name": "resource_id", "in": "path", "required": True, "schema": {"type": "string"}},
    ]
    fhir_resource = {
        "type": "object",
        "description": "The notified R4 resource: ImagingStudy, Media, DocumentReference, DiagnosticReport.",
        "required": ["resourceType"],
        "properties": {"resourceType": {"type": "string"}, "id": {"type": "string"}},
    }
    body = {"required": False, "content": {"application/fhir+json": {"schema": fhir_resource}}}
    done = {
        "description": "Handled: the OperationOutcome's diagnostics say what was done (e.g. enqueued).",
        "headers": {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}},
        "content": {"application/fhir+json": {"schema": _ref("OperationOutcome")}},
    }
    answers = {"200": done, **_errors(400, 401, 404, 413, 500)}
    return {
        "/fhir-notifications/{channel_id}": {
            "post": {
                "operationId": "fhirNotification",
                "summary": "A rest-hook notification POSTed to the endpoint: empty, or the resource itself.",
                "security": security,
                "parameters": [channel],
                "requestBody": body,
                "responses": answers,
            }
        },
        "/fhir-notifications/{channel_id}/{resource_type}/{resource_id}": {
            "put": {
                "operationId": "fhirNotificationOfResource",
                "summary": "A new or updated resource (HAPI with a payload): its patient's imaging draft is "
                "queued before the chart opens.",
                "security": security,
                "parameters": [channel, *resource],
                "requestBody": body,
                "responses": answers,
            },
            "delete": {
                "operationId": "fhirNotificationOfDeletion",
                "summary": "A deleted resource (HAPI with a payload): acknowledged, nothing to prepare.",
                "security": security,
                "parameters": [channel, *resource],
                "responses": answers,
            },
        },
    }


@bp.get("/openapi.json")
def openapi_document() -> Response:
    """Return the app's OpenAPI 3.1 document (built on first use, then served from the app's cache)."""
    text = current_app.extensions.get(_CACHE_KEY)
    if text is None:
        text = current_app.json.dumps(build_document(current_app))
        current_app.extensions[_CACHE_KEY] = text
    return Response(text, mimetype="application/json")
