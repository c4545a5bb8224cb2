"""Drafts belong to the EHR that made them: two trusted issuers, each with its own key, against one service.

The draft API lists, reads, signs and rejects only its caller's drafts (issuer and ``tenant`` claim); another
issuer's draft is "not found", and nothing about it changes. A signer the EHR names must be a Practitioner,
recorded with the issuer that vouched for it.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from support import Issuer
from support import record_draft

from cds_service.store import Draft

SIGN = {"text": "IMPRESSION:\nClear.", "practitioner": "Practitioner/dr-1", "practitionerName": "Dr One"}
REJECT = {"reason": "Wrong patient", "practitioner": "Practitioner/dr-1"}


def draft_of(app: Flask, issuer: Issuer, patient: str = "p1", tenant: str | None = None) -> Draft:
    """A draft the imaging hook made for ``issuer``'s call (no write-back server: the store only)."""
    drafts = app.extensions["cds"].drafts
    return record_draft(drafts, patient, None, image_hash=uuid.uuid4().hex, issuer=issuer.iss, tenant=tenant)


def call(client: FlaskClient, issuer: Issuer, method: str, path: str, body: Any = None, **claims: Any) -> Any:
    token = issuer.token("http://cds.test" + path.split("?")[0], **claims)
    return client.open(path, method=method, json=body, headers={"Authorization": f"Bearer {token}"})


def test_an_ehr_never_lists_reads_signs_or_rejects_another_ehrs_draft(
    app: Flask, client: FlaskClient, issuer: Issuer, other_issuer: Issuer
) -> None:
    patient = f"p-{uuid.uuid4().hex[:8]}"  # the same patient id at both EHRs
    mine, theirs = draft_of(app, issuer, patient), draft_of(app, other_issuer, patient)

    listed = call(client, other_issuer, "GET", f"/drafts?patient={patient}").json["drafts"]
    assert [d["id"] for d in listed] == [theirs.id]
    assert call(client, other_issuer, "GET", f"/drafts/{mine.id}").status_code == 404
    assert call(client, other_issuer, "POST", f"/drafts/{mine.id}/sign", SIGN).status_code == 404
    assert call(client, other_issuer, "POST", f"/drafts/{mine.id}/reject", REJECT).status_code == 404

    own = call(client, issuer, "GET", f"/drafts/{mine.id}")
    assert own.status_code == 200 and own.json["status"] == "draft" and own.json["aiText"]
    listed = call(client, issuer, "GET", f"/drafts?patient={patient}").json["drafts"]
    assert [d["id"] for d in listed] == [mine.id]


def test_the_signer_is_a_practitioner_recorded_with_the_issuer_that_vouched(
    app: Flask, client: FlaskClient, issuer: Issuer
) -> None:
    draft = draft_of(app, issuer)
    for signer in ("PractitionerRole/r1", "Patient/p1", "Organization/o1", "Practitioner/a/b"):
        answer = call(client, issuer, "POST", f"/drafts/{draft.id}/sign", SIGN | {"practitioner": signer})
        assert answer.status_code == 400, signer
    signed = call(client, issuer, "POST", f"/drafts/{draft.id}/sign", SIGN)
    assert signed.status_code == 200
    assert signed.json["signedBy"] == "Practitioner/dr-1" and signed.json["signedByIssuer"] == issuer.iss


@pytest.mark.parametrize("tenant", [None, "other-tenant"])
def test_a_draft_made_for_a_tenant_is_that_tenants_only(
    app: Flask, client: FlaskClient, issuer: Issuer, tenant: str | None
) -> None:
    draft = draft_of(app, issuer, tenant="tenant-a")
    claims = {"tenant": tenant} if tenant else {}
    assert call(client, issuer, "GET", f"/drafts/{draft.id}", **claims).status_code == 404
    assert call(client, issuer, "POST", f"/drafts/{draft.id}/sign", SIGN, **claims).status_code == 404
    assert call(client, issuer, "GET", f"/drafts/{draft.id}", tenant="tenant-a").status_code == 200
