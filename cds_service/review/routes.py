"""The review app's pages: SMART launch and callback, the worklist, a draft to review, sign and reject.

A login is bound to the browser that started it: the launch sets a cookie whose value the pending
authorization keeps, and the callback is refused without it (login CSRF: an attacker's callback URL opened
by a clinician can't sign the clinician into the attacker's session). Every page after the callback needs
the review session (its cookie); every form carries the session's CSRF token; a draft is shown only to a
session of its patient on its FHIR server (never one made without a server); only a clinician (fhirUser a
Practitioner or PractitionerRole) may sign or reject. Refusals are pages that say why, and write nothing.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from typing import Any
from urllib.parse import urlsplit

import redis
from flask import Blueprint
from flask import Response
from flask import current_app
from flask import jsonify
from flask import make_response
from flask import redirect
from flask import render_template
from flask import request
from flask import url_for

from cds_service.dicomweb import DicomwebClient
from cds_service.dicomweb import DicomwebError
from cds_service.drafts import WriteTarget
from cds_service.errors import BadRequest
from cds_service.errors import CdsError
from cds_service.fhir_guard import check_fhir_server_url
from cds_service.review.sessions import PENDING_TTL_S
from cds_service.review.sessions import ReviewSession
from cds_service.review.sessions import ReviewStore
from cds_service.review.smart import SmartConfiguration
from cds_service.review.smart import SmartError
from cds_service.review.smart import authorization_request
from cds_service.review.smart import discover
from cds_service.review.smart import draft_from_app_context
from cds_service.review.smart import exchange_code
from cds_service.review.smart import fhir_server
from cds_service.review.smart import oauth_client
from cds_service.review.smart import patient_banner
from cds_service.review.smart import requested_scope
from cds_service.review.smart import user_name
from cds_service.review.smart import verify_id_token
from cds_service.review.study import pacs_client
from cds_service.review.study import read_of
from cds_service.review.study import study_view
from cds_service.store import Draft
from cds_service.wire import ImageRead

bp = Blueprint("review", __name__, url_prefix="/review", template_folder="templates", static_folder="static")
log = logging.getLogger(__name__)
COOKIE = "mgcds_review"
#: The launch's browser binding: one cookie per pending login (``{prefix}{hash of state}``), so two tabs
#: launching at once each keep theirs; it lives as long as the pending authorization.
LOGIN_COOKIE_PREFIX = "mgcds_login_"
MAX_TEXT = 20_000


class ReviewRefused(Exception):
    """A page the clinician sees instead of what they asked for: a status and a plain reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@bp.errorhandler(ReviewRefused)
def _refused(error: ReviewRefused) -> tuple[str, int]:
    return render_template("review/refused.html", reason=error.reason), error.status


@bp.errorhandler(BadRequest)
def _bad_request(error: BadRequest) -> tuple[str, int]:
    # Raised before the view runs (a control character in the address or a form): a page, like every refusal.
    return render_template("review/refused.html", reason=f"This request is malformed: {error.message}."), 400


@bp.errorhandler(redis.RedisError)
def _store_down(error: redis.RedisError) -> tuple[str, int]:
    log.warning("review app: session store unavailable (%s)", type(error).__name__)
    reason = "The review app is temporarily unavailable; try again in a minute."
    return render_template("review/refused.html", reason=reason), 503


@bp.errorhandler(SmartError)
def _smart_failed(error: SmartError) -> tuple[str, int]:
    return render_template("review/refused.html", reason=f"The EHR sign-in failed: {error}."), 400


def _deps() -> Any:
    return current_app.extensions["cds"]


def _store() -> ReviewStore:
    return current_app.extensions["review"]


def _redirect_uri() -> str:
    return _deps().settings.public_url.rstrip("/") + url_for("review.callback")


@bp.get("/launch")
def launch() -> Response:
    """SMART launch: EHR launch (``iss`` and ``launch``) or standalone (``iss`` only); ``draft`` names one.

    The ``iss`` must be on the review app's allowlist (``REVIEW_ISS_ALLOWLIST``, not the hooks' FHIR server
    allowlist) before anything is fetched from it.
    """
    iss = request.args.get("iss", "")
    launch_token = request.args.get("launch") or None
    draft = request.args.get("draft") or None
    if not iss:
        raise ReviewRefused(400, "Open this page from your EHR: the launch names no FHIR server (iss).")
    if draft is not None and not draft.isalnum():
        raise ReviewRefused(400, "The link names no valid draft.")
    settings = _deps().settings
    try:
        check_fhir_server_url(iss, settings.review_iss_allowlist, settings.fhir_allow_http_loopback)
    except BadRequest as refused:
        raise ReviewRefused(403, f"This EHR is not one this service trusts ({refused.message}).") from None
    config = discover(_deps().http, iss)
    client = oauth_client(
        settings.smart_client_id,
        settings.smart_client_secret.get_secret_value() if settings.smart_client_secret else None,
        _redirect_uri(),
        requested_scope(config, ehr_launch=launch_token is not None),
    )
    url, pending = authorization_request(client, config, iss, launch_token)
    binding = secrets.token_urlsafe(32)
    _store().begin(
        pending["state"],
        {
            "binding": binding,
            "iss": iss,
            "draft": draft,
            "nonce": pending["nonce"],
            "code_verifier": pending["code_verifier"],
            "scope": client.scope,
            "config": config.model_dump(),
        },
    )
    response = redirect(url, code=302)
    response.set_cookie(
        _login_cookie(pending["state"]),
        binding,
        max_age=PENDING_TTL_S,
        path=url_for("review.callback"),
        httponly=True,
        samesite="Lax",  # sent on the authorization server's top-level redirect back, not on cross-site posts
        secure=urlsplit(settings.public_url).scheme == "https",
    )
    return response


def _login_cookie(state: str) -> str:
    return LOGIN_COOKIE_PREFIX + hashlib.sha256(state.encode()).hexdigest()[:16]


@bp.get("/callback")
def callback() -> Response:
    """The authorization answer: check state and code, redeem it, verify the id_token, open a session."""
    if request.args.get("error"):
        raise ReviewRefused(403, "The EHR did not authorize the review app.")
    state, code = request.args.get("state", ""), request.args.get("code", "")
    if not state or not code:
        raise ReviewRefused(
            400, "The sign-in answer is incomplete (no state or no code); start again from the EHR."
        )
    pending = _store().take(state)
    if pending is None:
        raise ReviewRefused(400, "This sign-in was already used or has expired; start again from the EHR.")
    binding = request.cookies.get(_login_cookie(state), "")
    if not binding or not secrets.compare_digest(binding.encode(), str(pending.get("binding", "")).encode()):
        raise ReviewRefused(
            400, "This sign-in was started in another browser; start again from the EHR in this one."
        )
    if not _store().first_use_of_code(code):
        raise ReviewRefused(400, "This authorization code was already used; start again from the EHR.")
    settings = _deps().settings
    config = SmartConfiguration.model_validate(pending["config"])
    client = oauth_client(
        settings.smart_client_id,
        settings.smart_client_secret.get_secret_value() if settings.smart_client_secret else None,
        _redirect_uri(),
        pending["scope"],
    )
    token = exchange_code(client, config, code, pending["code_verifier"])
    if not token.id_token:
        raise ReviewRefused(403, "The EHR sent no id_token: the app can't tell who you are.")
    claims = verify_id_token(
        _deps().http,
        config,
        token.id_token,
        iss=pending["iss"],
        client_id=settings.smart_client_id,
        nonce=pending["nonce"],
    )
    if not token.patient:
        raise ReviewRefused(403, "The EHR launched the app without a patient.")
    fhir_user = claims.get("fhirUser") or claims.get("profile")
    fhir_user = fhir_user.split("/_history")[0].rsplit("/", 2) if isinstance(fhir_user, str) else None
    fhir_user_ref = "/".join(fhir_user[-2:]) if fhir_user and len(fhir_user) >= 2 else None
    server = fhir_server(pending["iss"], token.access_token)
    name = user_name(server, fhir_user_ref) if fhir_user_ref else ""
    patient_name, birth_date = patient_banner(server, token.patient)
    lifetime = min(settings.smart_session_ttl_s, token.expires_in or settings.smart_session_ttl_s)
    session = ReviewSession(
        iss=pending["iss"].rstrip("/"),
        patient=token.patient,
        fhir_user=fhir_user_ref,
        user_name=name or fhir_user_ref or "",
        patient_name=patient_name,
        patient_birth_date=birth_date,
        access_token=token.access_token,
        granted_scope=token.scope,
        csrf=secrets.token_urlsafe(32),
        expires_at=time.time() + lifetime,
    )
    session_id = _store().open_session(session)
    draft = pending.get("draft") or draft_from_app_context(token.appContext)
    target = url_for("review.draft_page", draft_id=draft) if draft else url_for("review.worklist")
    response = make_response(redirect(target, code=303))
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=int(lifetime),
        path="/review",
        httponly=True,
        samesite="Lax",
        secure=urlsplit(settings.public_url).scheme == "https",
    )
    response.delete_cookie(_login_cookie(state), path=url_for("review.callback"))
    return response


def _session() -> ReviewSession:
    session = _store().session(request.cookies.get(COOKIE))
    if session is None:
        raise ReviewRefused(
            401, "Your review session has expired or was never opened: open the draft from the EHR."
        )
    return session


def _checked_form(session: ReviewSession) -> None:
    given = request.form.get("csrf", "")
    # Compared as bytes: compare_digest refuses str with non-ASCII characters (a TypeError, not a refusal).
    if not given or not secrets.compare_digest(given.encode(), session.csrf.encode()):
        raise ReviewRefused(403, "This form is not from your review session (CSRF check); reload the page.")


def _draft_of(session: ReviewSession, draft_id: str) -> Draft:
    try:
        draft = _deps().drafts.get(draft_id)
    except CdsError:
        raise ReviewRefused(404, "There is no such draft.") from None
    if draft.fhir_server is None:
        # Made by a hook call that named no FHIR server: no launch can show it is this EHR's patient.
        raise ReviewRefused(
            403, "This draft names no FHIR server: it can be signed only by the EHR that made it, not here."
        )
    if draft.patient_id != session.patient or draft.fhir_server.rstrip("/") != session.iss:
        raise ReviewRefused(403, "This draft is not about the patient the EHR opened.")
    return draft


def _signer(session: ReviewSession) -> str:
    if not session.may_sign or session.fhir_user is None:
        raise ReviewRefused(403, "Only a clinician the EHR signed in (a Practitioner) may sign or reject.")
    return session.fhir_user


def _decision_form(draft_id: str) -> tuple[ReviewSession, str]:
    """Return the session and signer once a decision form passes every check: a live session, its CSRF
    token, a clinician, and a draft of the session's patient."""
    session = _session()
    _checked_form(session)
    signer = _signer(session)
    _draft_of(session, draft_id)
    return session, signer


@bp.get("/")
def worklist() -> str:
    """The drafts awaiting review for the launch's patient."""
    session = _session()
    drafts = _deps().drafts.list(session.patient, "draft", fhir_server=session.iss)
    return render_template("review/worklist.html", session=session, drafts=drafts)


@bp.get("/drafts/<draft_id>")
def draft_page(draft_id: str) -> str:
    """One draft: the image, the AI text, the patient banner, and (for a clinician) edit, sign or reject."""
    session = _session()
    return render_template("review/draft.html", session=session, draft=_draft_of(session, draft_id))


@bp.get("/drafts/<draft_id>/image")
def draft_image(draft_id: str) -> Response:
    """The image the model read (square PNG)."""
    draft = _draft_of(_session(), draft_id)
    return current_app.response_class(draft.image_png or b"", mimetype="image/png")


@bp.get("/drafts/<draft_id>/study")
def draft_study(draft_id: str) -> Response:
    """The viewer's description of the draft's study (series, instances, what the model read), as JSON."""
    session = _session()
    draft = _draft_of(session, draft_id)
    read = read_of(draft)
    try:
        client = _pacs(session, read) if read and read.endpoint else None
        view = study_view(
            draft,
            client,
            lambda series, instance: url_for(
                "review.draft_instance", draft_id=draft.id, series_uid=series, instance_uid=instance
            ),
            url_for("review.draft_image", draft_id=draft.id),
        )
    except DicomwebError as error:
        raise ReviewRefused(502, f"The PACS could not be read: {error}.") from None
    return jsonify(view)


@bp.get("/drafts/<draft_id>/instances/<series_uid>/<instance_uid>")
def draft_instance(draft_id: str, series_uid: str, instance_uid: str) -> Response:
    """One instance of the draft's study from its PACS (DICOM Part 10), for the viewer to decode."""
    session = _session()
    read = read_of(_draft_of(session, draft_id))
    if read is None or not read.endpoint or not read.study_uid:
        raise ReviewRefused(404, "This draft's image is not on a PACS.")
    try:
        data = _pacs(session, read).instance(read.study_uid, series_uid, instance_uid)
    except DicomwebError as error:
        raise ReviewRefused(502, f"The PACS could not be read: {error}.") from None
    return current_app.response_class(data, mimetype="application/dicom")


def _pacs(session: ReviewSession, read: ImageRead) -> DicomwebClient:
    deps = _deps()
    return pacs_client(read, deps.settings, deps.http, session.iss, session.access_token)


@bp.post("/drafts/<draft_id>/sign")
def sign(draft_id: str) -> str:
    """Sign as the launch's clinician; the report goes to the EHR with the clinician's own token."""
    session, signer = _decision_form(draft_id)
    text = request.form.get("text", "").strip()
    if not text or len(text) > MAX_TEXT:
        raise ReviewRefused(400, f"The report text must be 1 to {MAX_TEXT} characters.")
    # Without a write scope the EHR keeps its audit out of reach: the configured server is the fallback.
    target = WriteTarget(session.iss, session.access_token) if session.may_write() else None
    try:
        draft = _deps().drafts.sign(draft_id, text, signer, session.user_name, target, vouched_by=session.iss)
    except CdsError as error:
        raise ReviewRefused(error.status, error.message) from None
    return render_template("review/draft.html", session=session, draft=draft)


@bp.post("/drafts/<draft_id>/reject")
def reject(draft_id: str) -> str:
    """Reject with a reason; nothing is written to the record."""
    session, signer = _decision_form(draft_id)
    reason = request.form.get("reason", "").strip()
    if not reason or len(reason) > 2000:
        raise ReviewRefused(400, "Say why the draft is rejected (up to 2000 characters).")
    try:
        draft = _deps().drafts.reject(draft_id, reason, signer)
    except CdsError as error:
        raise ReviewRefused(error.status, error.message) from None
    return render_template("review/draft.html", session=session, draft=draft)


@bp.post("/drafts/<draft_id>/write-back")
def retry_write_back(draft_id: str) -> str:
    """Try again to write a signed report the EHR refused or could not take."""
    session, _ = _decision_form(draft_id)
    target = WriteTarget(session.iss, session.access_token) if session.may_write() else None
    try:
        draft = _deps().drafts.retry_write_back(draft_id, target)
    except CdsError as error:
        raise ReviewRefused(error.status, error.message) from None
    return render_template("review/draft.html", session=session, draft=draft)
