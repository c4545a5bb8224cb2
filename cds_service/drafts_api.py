"""Draft endpoints: the worklist and JSON views for EHRs (JWT), and the development review page.

The JSON endpoints answer an EHR only about its own drafts: those its issuer (and ``tenant``) made through
the hooks; another issuer's draft is "not found". A signer it names must be a Practitioner reference, and is
recorded with the issuer that vouched for it.

Clinicians review and sign in the SMART review app (``cds_service.review``). The signed-link page here is a
development mode for clients without SMART (the public CDS Hooks sandbox over an open FHIR server): it is
view-only unless development mode (``MEDGEMMA_CDS_DEV_MODE``, implied by ``AUTH_DISABLED``) is on.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from flask import Response
from flask import current_app
from flask import jsonify
from flask import render_template
from flask import request
from pydantic import BaseModel
from pydantic import Field

from cds_service.api import authenticate
from cds_service.api import read_json_body
from cds_service.api import services
from cds_service.drafts import DraftOwner
from cds_service.errors import Forbidden
from cds_service.errors import Unauthorized
from cds_service.invoke import validate
from cds_service.signed_links import link_grants
from cds_service.store import Draft
from cds_service.wire import WireModel

bp = Blueprint("drafts", __name__, template_folder="templates")
#: The signer an EHR names: a Practitioner reference (a FHIR id), nothing else.
PRACTITIONER = r"^Practitioner/[A-Za-z0-9\-\.]{1,64}$"


class DraftView(WireModel):
    """A draft as the worklist and JSON clients see it (the AI text and the signed text side by side)."""

    id: str
    status: str
    patient_id: str
    study: str | None = None
    image: str | None = None
    model: str
    model_version: str
    ai_text: str
    ai_urgency: str
    signed_text: str | None = None
    signed_by: str | None = None
    signed_by_name: str | None = None
    signed_by_issuer: str | None = None
    signed_at: str | None = None
    written_to: str | None = None
    #: Where the signed report is: written | pending (retried; see the last error) | failed (needs a person);
    #: None: not signed, or no write-back server (kept in the store only).
    write_back: str | None = None
    write_back_error: str | None = None
    reject_reason: str | None = None
    rejected_at: str | None = None
    created_at: str

    @classmethod
    def of(cls, draft: Draft) -> DraftView:
        """Return the view of a stored draft."""
        return cls(
            id=draft.id,
            status=draft.status,
            patient_id=draft.patient_id,
            study=draft.study_ref,
            image=draft.image_ref,
            model=draft.model_id,
            model_version=draft.model_version,
            ai_text=draft.ai_text,
            ai_urgency=draft.ai_urgency,
            signed_text=draft.signed_text,
            signed_by=draft.signed_by,
            signed_by_name=draft.signed_by_name,
            signed_by_issuer=draft.signed_by_issuer,
            signed_at=draft.signed_at.isoformat() if draft.signed_at else None,
            written_to=draft.writeback,
            write_back=draft.writeback_state,
            write_back_error=draft.writeback_error,
            reject_reason=draft.reject_reason,
            rejected_at=draft.rejected_at.isoformat() if draft.rejected_at else None,
            created_at=draft.created_at.isoformat(),
        )


class SignRequest(WireModel):
    """A clinician signs the (edited) report text."""

    text: str = Field(min_length=1, max_length=20_000)
    practitioner: str = Field(pattern=PRACTITIONER)
    practitioner_name: str = Field(min_length=1, max_length=200)


class RejectRequest(WireModel):
    """A clinician rejects the draft, saying why."""

    reason: str = Field(min_length=1, max_length=2000)
    practitioner: str = Field(pattern=PRACTITIONER)


def check_review_access(draft_id: str, access: str | None) -> None:
    """Accept a signed, unexpired review link for exactly this draft; 401 otherwise."""
    if not link_grants(services().settings, "draft-review", draft_id, access):
        raise Unauthorized("Unauthorized")


def _submitted(model: type[BaseModel], draft_id: str, action: str) -> tuple[Any, DraftOwner | None]:
    """Return the validated sign/reject request and the EHR that sent it (None: the review page's form).

    The form's identity is typed, not asserted by an EHR: it is accepted in development mode only.
    """
    if request.mimetype == "application/x-www-form-urlencoded":
        check_review_access(draft_id, request.form.get("access"))
        if not services().settings.development:
            raise Forbidden("signing from a review link is for development only: open the draft from the EHR")
        data = {k: v for k, v in request.form.items() if k != "access"}
        return validate(model, data), None
    owner = DraftOwner.of(authenticate(f"/drafts/{draft_id}/{action}"))
    return validate(model, read_json_body()), owner


@bp.get("/drafts")
def list_drafts() -> Response:
    """The worklist of the caller's drafts, filtered by ``patient`` and ``status``, newest first."""
    owner = DraftOwner.of(authenticate("/drafts"))
    status = request.args.get("status")
    drafts = services().drafts.list(request.args.get("patient"), status, owner=owner)
    return jsonify({"drafts": [DraftView.of(d).wire() for d in drafts]})


@bp.get("/drafts/<draft_id>")
def get_draft(draft_id: str) -> Response:
    """One of the caller's drafts, as JSON."""
    owner = DraftOwner.of(authenticate(f"/drafts/{draft_id}"))
    return jsonify(DraftView.of(services().drafts.get(draft_id, owner)).wire())


@bp.get("/drafts/<draft_id>/review")
def review_page(draft_id: str) -> str:
    """The review page a card's SMART link opens: image, evidence, AI text, edit, then Sign or Reject."""
    access = request.args.get("access")
    check_review_access(draft_id, access)
    draft = services().drafts.get(draft_id)
    return render_template(
        "review.html",
        draft=draft,
        access=access,
        can_sign=services().settings.development,
        practitioner=draft.requested_by if (draft.requested_by or "").startswith("Practitioner/") else "",
    )


@bp.get("/drafts/<draft_id>/image")
def draft_image(draft_id: str) -> Response:
    """The image the model read (square PNG), for the review page."""
    check_review_access(draft_id, request.args.get("access"))
    draft = services().drafts.get(draft_id)
    return current_app.response_class(draft.image_png or b"", mimetype="image/png")


@bp.post("/drafts/<draft_id>/sign")
def sign_draft(draft_id: str) -> Any:
    """Sign: the report becomes final with the clinician's text; written back once."""
    sign, owner = _submitted(SignRequest, draft_id, "sign")
    draft = services().drafts.sign(
        draft_id,
        sign.text,
        sign.practitioner,
        sign.practitioner_name,
        None,
        vouched_by=owner.issuer if owner else None,
        owner=owner,
    )
    if owner is None:
        return render_template(
            "review.html", draft=draft, access=request.form.get("access"), can_sign=True, practitioner=""
        )
    return jsonify(DraftView.of(draft).wire())


@bp.post("/drafts/<draft_id>/reject")
def reject_draft(draft_id: str) -> Any:
    """Reject with a reason: nothing is written to the record."""
    reject, owner = _submitted(RejectRequest, draft_id, "reject")
    draft = services().drafts.reject(draft_id, reject.reason, reject.practitioner, owner=owner)
    if owner is None:
        return render_template(
            "review.html", draft=draft, access=request.form.get("access"), can_sign=True, practitioner=""
        )
    return jsonify(DraftView.of(draft).wire())
