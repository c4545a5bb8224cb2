"""Maps every error to a JSON answer in one place: CdsError subclasses, HTTP errors, and the unexpected."""

from __future__ import annotations

import logging
import traceback
import uuid

from flask import Flask
from flask import Response
from flask import g
from flask import jsonify
from flask import request
from werkzeug.exceptions import HTTPException

from cds_service.errors import CdsError
from cds_service.errors import Unauthorized
from cds_service.logging import clear_request_id
from cds_service.logging import get_request_id
from cds_service.logging import set_request_id

log = logging.getLogger("cds_service.errors")


def _begin_request() -> None:
    # A caller's X-Request-Id is kept only when it is a plain token, so logs can't be injected into.
    given = request.headers.get("X-Request-Id", "")
    request_id = given if given.isalnum() and len(given) <= 64 else uuid.uuid4().hex
    g.request_id = request_id
    set_request_id(request_id)


def _end_request(response: Response) -> Response:
    response.headers["X-Request-Id"] = get_request_id() or ""
    return response


def _render_cds_error(error: CdsError) -> tuple[Response, int]:
    if isinstance(error, Unauthorized):
        # §Security: a failed token check is a bare 401; which check failed is only logged by the verifier.
        response = jsonify({"error": error.code, "message": "Unauthorized"})
        response.headers["WWW-Authenticate"] = "Bearer"
        return response, 401
    log.info("request refused", extra={"status": error.status, "error": error.code})
    return jsonify(error.body()), error.status


def _render_http_error(error: HTTPException) -> tuple[Response, int]:
    status = error.code or 500
    messages = {
        404: "no such endpoint",
        405: f"method {request.method} is not allowed here",
        413: "request body is larger than the configured limit",
    }
    code = (error.name or "error").lower().replace(" ", "-")
    return jsonify({"error": code, "message": messages.get(status, error.name)}), status


def _render_unexpected(error: Exception) -> tuple[Response, int]:
    # The message of an unexpected exception may quote record data, so only its class and frames are logged.
    frames = "".join(traceback.format_tb(error.__traceback__))
    log.error("unhandled %s\n%s", type(error).__name__, frames)
    body = {"error": "internal-error", "message": "internal error", "requestId": get_request_id()}
    return jsonify(body), 500


def register(app: Flask) -> None:
    """Install the request-id hooks and one error handler per error class."""
    app.before_request(_begin_request)
    app.after_request(_end_request)
    # gthread reuses threads: a finished request's id must not leak into the next one's log lines.
    app.teardown_request(lambda error: clear_request_id())
    app.register_error_handler(CdsError, _render_cds_error)
    app.register_error_handler(HTTPException, _render_http_error)
    app.register_error_handler(Exception, _render_unexpected)
