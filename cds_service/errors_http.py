"""Maps every error to a JSON answer in one place: CdsError subclasses, HTTP errors, and the unexpected."""

from __future__ import annotations

import logging
import re
import time
import traceback
import uuid

import redis
from flask import Flask
from flask import Response
from flask import current_app
from flask import g
from flask import jsonify
from flask import request
from werkzeug.exceptions import HTTPException

from cds_service.errors import BadRequest
from cds_service.errors import CdsError
from cds_service.errors import Unauthorized
from cds_service.logging import clear_request_id
from cds_service.logging import get_request_id
from cds_service.logging import set_request_id

log = logging.getLogger("cds_service.errors")
access_log = logging.getLogger("cds_service.access")
#: C0 controls and DEL: no id, search value or form field of the service holds one, and PostgreSQL refuses
#: NUL in text, so they are refused at the door on every store alike.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _begin_request() -> None:
    # A caller's X-Request-Id is kept only when it is a plain token, so logs can't be injected into.
    given = request.headers.get("X-Request-Id", "")
    request_id = given if given.isalnum() and len(given) <= 64 else uuid.uuid4().hex
    g.request_id = request_id
    g.request_started = time.perf_counter()
    set_request_id(request_id)
    _refuse_control_characters()


def _refuse_control_characters() -> None:
    """400 when a path segment or query value holds a control character, or a form field a NUL byte."""
    for name, value in (request.view_args or {}).items():
        if isinstance(value, str) and _CONTROL.search(value):
            raise BadRequest(f"the path's {name} contains a control character")
    for name, value in request.args.items(multi=True):
        if _CONTROL.search(name) or _CONTROL.search(value):
            raise BadRequest("a query parameter contains a control character")
    if request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        # Text typed into a form keeps its line breaks and tabs; only NUL, which no store takes, is refused.
        if any("\x00" in name or "\x00" in value for name, value in request.form.items(multi=True)):
            raise BadRequest("a form field contains a NUL character")


def _route() -> str:
    """Return the route template matched (``/cds-services/<service_id>``), never the URL or its query."""
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


def _service_id() -> str | None:
    # Only a declared service id is logged: a caller can't write arbitrary text into the log.
    given = (request.view_args or {}).get("service_id")
    if given is None:
        return None
    return given if given in current_app.extensions["cds"].registry.services else "unknown"


def _end_request(response: Response) -> Response:
    response.headers["X-Request-Id"] = get_request_id() or ""
    started = g.get("request_started")
    access_log.info(
        "request",
        extra={
            "method": request.method,
            "route": _route(),
            "service": _service_id(),
            "status": response.status_code,
            "latency_ms": round((time.perf_counter() - started) * 1000, 2) if started else None,
        },
    )
    return response


def _render_cds_error(error: CdsError) -> tuple[Response, int]:
    if isinstance(error, Unauthorized):
        # §Security: a failed token check is a bare 401; which check failed is only logged by the verifier.
        log.info("request refused", extra={"route": _route(), "status": 401, "error": error.code})
        response = jsonify({"error": error.code, "message": "Unauthorized"})
        response.headers["WWW-Authenticate"] = "Bearer"
        return response, 401
    log.info(
        "request refused",
        extra={"route": _route(), "status": error.status, "error": error.code, "reason": error.message},
    )
    return jsonify(error.body()), error.status


def _render_http_error(error: HTTPException) -> tuple[Response, int]:
    status = error.code or 500
    messages = {
        404: "no such endpoint",
        405: f"method {request.method} is not allowed here",
        413: "request body is larger than the configured limit",
    }
    code = (error.name or "error").lower().replace(" ", "-")
    message = messages.get(status, error.name)
    log.info("request refused", extra={"route": _route(), "status": status, "error": code, "reason": message})
    return jsonify({"error": code, "message": message}), status


def _render_unexpected(error: Exception) -> tuple[Response, int]:
    # The message of an unexpected exception may quote record data, so it is never logged; the error id (the
    # request id, also in the answer) and the class find it, and the frames follow only at DEBUG.
    log.error("unhandled %s", type(error).__name__, extra={"error_id": get_request_id()})
    if log.isEnabledFor(logging.DEBUG):
        log.debug("unhandled %s\n%s", type(error).__name__, "".join(traceback.format_tb(error.__traceback__)))
    body = {"error": "internal-error", "message": "internal error", "requestId": get_request_id()}
    return jsonify(body), 500


def _render_store_unavailable(error: redis.RedisError) -> tuple[Response, int]:
    # Redis down or too slow to answer: the job and session store is away for a while, not a server bug.
    log.warning("job store unavailable", extra={"route": _route(), "error": type(error).__name__})
    body = {
        "error": "store-unavailable",
        "message": "the job store is temporarily unavailable; try again shortly",
        "requestId": get_request_id(),
    }
    return jsonify(body), 503


def register(app: Flask) -> None:
    """Install the request-id hooks and one error handler per error class."""
    app.before_request(_begin_request)
    app.after_request(_end_request)
    # gthread reuses threads: a finished request's id must not leak into the next one's log lines.
    app.teardown_request(lambda error: clear_request_id())
    app.register_error_handler(CdsError, _render_cds_error)
    app.register_error_handler(HTTPException, _render_http_error)
    app.register_error_handler(redis.RedisError, _render_store_unavailable)
    app.register_error_handler(Exception, _render_unexpected)
