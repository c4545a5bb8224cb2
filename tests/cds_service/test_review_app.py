"""The review app as a SMART on FHIR app, against a real OAuth 2.0 / OpenID Connect server (authlib).

The served instance (``live_server``) is registered with the test SMART server (``smart_server``), which
stands in front of the test FHIR server. Drafts are made directly in the store the served instance uses;
the browser journey from a real card is in tests/hooks/test_imaging_report_draft.py.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from urllib.parse import parse_qs
from urllib.parse import urlencode
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from playwright.sync_api import sync_playwright
from smart_server import SmartServer
from support import HOOK_ONLY_FHIR_SERVER
from support import SECRET_KEY
from support import FhirServer
from support import LiveServer
from support import leaks_in_log
from support import record_draft

from cds_service.drafts import DraftService
from cds_service.review.routes import COOKIE
from cds_service.review.sessions import ReviewSession
from cds_service.review.sessions import ReviewStore
from cds_service.settings import Settings
from cds_service.settings import purpose_key
from cds_service.signed_links import sign_link
from cds_service.store import Store
from fhir_mappings.reports import DRAFT_IDENTIFIER_SYSTEM

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]


@pytest.fixture
def smart(smart_server: SmartServer, live_server: LiveServer) -> Iterator[SmartServer]:
    """The session's SMART server, reset around each test; no code or token it issued reached the log."""
    smart_server.reset()
    yield smart_server
    issued = {f"access token {n}": t.access_token for n, t in enumerate(smart_server.issued_tokens)}
    issued |= {f"authorization code {n}": code for n, code in enumerate(smart_server.codes)}
    assert live_server.log_path is not None
    assert not leaks_in_log(live_server.log_path, issued)
    smart_server.reset()


@pytest.fixture(scope="module")
def practitioner(fhir_server: FhirServer) -> str:
    """A Practitioner on the FHIR server, with the name the review app must show and sign with."""
    name = [{"prefix": ["Dr"], "given": ["Ada"], "family": "Radiolog"}]
    return f"Practitioner/{fhir_server.post({'resourceType': 'Practitioner', 'name': name})['id']}"


def make_draft(database_url: str, patient_id: str, fhir_server: str | None) -> str:
    """Store a draft for ``patient_id`` on ``fhir_server`` as the imaging hook would; return its id."""
    drafts = DraftService(Store(database_url), Settings(secret_key=SECRET_KEY), httpx.Client())
    return str(record_draft(drafts, patient_id, fhir_server, image_hash=uuid.uuid4().hex).id)


def new_browser(live: LiveServer) -> httpx.Client:
    """Return a browser-like client of the served app: it keeps its cookies and follows redirects."""
    return httpx.Client(base_url=live.url, follow_redirects=True)


def ehr_launch(
    browser: httpx.Client, smart: SmartServer, draft_id: str | None, launch: str
) -> httpx.Response:
    """Open the card's link in ``browser`` as an EHR launches it; return the authorization server's redirect
    back to the callback (not followed)."""
    query = {"iss": smart.iss, "launch": launch} | ({"draft": draft_id} if draft_id else {})
    answer = browser.get(f"/review/launch?{urlencode(query)}", follow_redirects=False)
    assert answer.status_code == 302, answer.text
    authorized = httpx.get(answer.headers["location"])
    assert authorized.status_code == 302, authorized.text
    return authorized


def signed_in(
    live: LiveServer, smart: SmartServer, draft_id: str | None, user: str, patient: str
) -> httpx.Client:
    """Return a browser-like client with a review session for ``user`` launched on ``patient``."""
    browser = new_browser(live)
    callback = ehr_launch(browser, smart, draft_id, smart.mint_launch(patient, user)).headers["location"]
    page = browser.get(callback)
    assert page.status_code == 200, page.text
    return browser


def session_of(live: LiveServer, browser: httpx.Client) -> ReviewSession:
    """Return the review session a browser's cookie names, read from Redis as the served app reads it."""
    client = redis.Redis.from_url(live.env["MEDGEMMA_CDS_REDIS_URL"])
    store = ReviewStore(client, purpose_key(Settings(secret_key=SECRET_KEY), "review-app"), 3600)
    session = store.session(browser.cookies.get(COOKIE))
    assert session is not None
    return session


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def test_sign_as_the_launched_clinician_with_their_own_token(
    live_server: LiveServer,
    smart: SmartServer,
    fhir_server: FhirServer,
    database_url: str,
    practitioner: str,
) -> None:
    patient = fhir_server.patients["Trantow"]
    draft_id = make_draft(database_url, patient, smart.iss)
    browser = signed_in(live_server, smart, draft_id, practitioner, patient)
    page = browser.get(f"/review/drafts/{draft_id}").text
    # The banner shows who the patient is and who signs; the form asks no identity.
    assert "Trantow" in page and 'id="patient-birth-date">19' in page
    assert "Dr Ada Radiolog" in page and 'name="practitioner"' not in page

    signed = browser.post(
        f"/review/drafts/{draft_id}/sign",
        data={
            "csrf": csrf_of(page),
            "text": "FINDINGS:\nClear.\n\nIMPRESSION:\nNormal (edited by the clinician).",
        },
    )
    assert signed.status_code == 200, signed.text
    assert 'id="written"' in signed.text, signed.text[signed.text.find("<h2>Signed") :][:600]

    (report,) = fhir_server.search(f"DiagnosticReport?identifier={DRAFT_IDENTIFIER_SYSTEM}|{draft_id}")
    assert report["status"] == "final"
    assert report["resultsInterpreter"][0] == {"reference": practitioner, "display": "Dr Ada Radiolog"}
    verify = [
        p
        for p in fhir_server.search("Provenance?_count=500")
        if p["target"][0]["reference"] == f"DiagnosticReport/{report['id']}"
        and p["activity"]["coding"][0]["code"] == "VERIFY"
    ]
    assert verify[0]["agent"][0]["who"]["reference"] == practitioner
    # The write went to the launching EHR with the token it gave this clinician.
    (token,) = [t.access_token for t in smart.issued_tokens]
    writes = [r for r in smart.requests if r.method == "POST"]
    assert writes and all(w.token == token and w.status < 300 for w in writes)


def test_tokens_are_never_kept_in_clear_in_redis(
    live_server: LiveServer, smart: SmartServer, fhir_server: FhirServer, database_url: str, practitioner: str
) -> None:
    patient = fhir_server.patients["Trantow"]
    signed_in(live_server, smart, make_draft(database_url, patient, smart.iss), practitioner, patient)
    (token,) = [t.access_token for t in smart.issued_tokens]
    client = redis.Redis.from_url(live_server.env["MEDGEMMA_CDS_REDIS_URL"])
    for key in client.scan_iter(match="mgcds:review:*"):
        value = client.get(key) or b""
        assert token.encode() not in value and practitioner.encode() not in value


@pytest.mark.parametrize(
    "tampering",
    [{"aud": "another-app"}, {"iss": "https://attacker.example"}, {"nonce": "other"}, {"exp": 1000}],
    ids=["aud", "iss", "nonce", "expired"],
)
def test_a_bad_id_token_is_refused_with_a_page_and_no_session(
    live_server: LiveServer, smart: SmartServer, fhir_server: FhirServer, practitioner: str, tampering: dict
) -> None:
    patient = fhir_server.patients["Trantow"]
    browser = new_browser(live_server)
    callback = ehr_launch(browser, smart, None, smart.mint_launch(patient, practitioner)).headers["location"]
    smart.tamper(**tampering)
    answer = browser.get(callback)
    assert answer.status_code == 400
    assert "sign-in failed" in answer.text and "set-cookie" not in answer.headers


def test_an_id_token_signed_by_another_key_is_refused(
    live_server: LiveServer, smart: SmartServer, fhir_server: FhirServer, practitioner: str
) -> None:
    patient = fhir_server.patients["Trantow"]
    browser = new_browser(live_server)
    callback = ehr_launch(browser, smart, None, smart.mint_launch(patient, practitioner)).headers["location"]
    smart.tamper(foreign_key=True)
    answer = browser.get(callback)
    assert answer.status_code == 400 and "signature does not verify" in answer.text


def test_missing_or_wrong_state_and_a_replayed_code_are_refused(
    live_server: LiveServer, smart: SmartServer, fhir_server: FhirServer, practitioner: str
) -> None:
    patient = fhir_server.patients["Trantow"]
    browser = new_browser(live_server)
    callback = ehr_launch(browser, smart, None, smart.mint_launch(patient, practitioner)).headers["location"]
    code = parse_qs(urlsplit(callback).query)["code"][0]
    assert browser.get(f"/review/callback?code={code}").status_code == 400
    assert browser.get(f"/review/callback?code={code}&state=forged").status_code == 400
    assert browser.get(callback).status_code == 200
    # The same callback again: its state was used.
    again = browser.get(callback)
    assert again.status_code == 400 and "already used or has expired" in again.text
    # A fresh state with the old code: the code was redeemed (the server itself would redeem it twice).
    fresh = ehr_launch(browser, smart, None, smart.mint_launch(patient, practitioner)).headers["location"]
    state = parse_qs(urlsplit(fresh).query)["state"][0]
    replayed = browser.get(f"/review/callback?code={code}&state={state}")
    assert replayed.status_code == 400 and "code was already used" in replayed.text


def test_a_patient_user_reads_but_cannot_sign(
    live_server: LiveServer, smart: SmartServer, fhir_server: FhirServer, database_url: str
) -> None:
    patient = fhir_server.patients["Trantow"]
    draft_id = make_draft(database_url, patient, smart.iss)
    browser = signed_in(live_server, smart, draft_id, f"Patient/{patient}", patient)
    page = browser.get(f"/review/drafts/{draft_id}").text
    assert 'id="read-only"' in page and 'id="sign-form"' not in page
    # With the session's own CSRF token, so the role check is what refuses (the page has no form to read).
    form = {"csrf": session_of(live_server, browser).csrf, "text": "signed by a patient"}
    refused = browser.post(f"/review/drafts/{draft_id}/sign", data=form)
    assert refused.status_code == 403 and "Only a clinician" in refused.text
    assert browser.get(f"/review/drafts/{draft_id}").text.count('class="status" id="status">draft') == 1


def test_forms_need_the_sessions_csrf_token_and_a_live_session(
    live_server: LiveServer, smart: SmartServer, fhir_server: FhirServer, database_url: str, practitioner: str
) -> None:
    patient = fhir_server.patients["Trantow"]
    draft_id = make_draft(database_url, patient, smart.iss)
    browser = signed_in(live_server, smart, draft_id, practitioner, patient)
    missing = browser.post(f"/review/drafts/{draft_id}/sign", data={"text": "IMPRESSION:\nx"})
    assert missing.status_code == 403 and "CSRF" in missing.text
    # The session ends (its Redis record expires): every page asks to start again from the EHR.
    client = redis.Redis.from_url(live_server.env["MEDGEMMA_CDS_REDIS_URL"])
    for key in client.scan_iter(match="mgcds:review:session:*"):
        client.delete(key)
    expired = browser.get(f"/review/drafts/{draft_id}")
    assert expired.status_code == 401 and "open the draft from the EHR" in expired.text
    assert DraftService(Store(database_url), Settings(), httpx.Client()).get(draft_id).status == "draft"


def test_a_draft_of_another_patient_or_server_is_refused(
    live_server: LiveServer, smart: SmartServer, fhir_server: FhirServer, database_url: str, practitioner: str
) -> None:
    trantow, erdman = fhir_server.patients["Trantow"], fhir_server.patients["Erdman"]
    other_patient = make_draft(database_url, erdman, smart.iss)
    other_server = make_draft(database_url, trantow, "https://another-ehr.example.org/fhir")
    # A hook call that named no fhirServer: the same patient id at this EHR proves nothing.
    no_server = make_draft(database_url, trantow, None)
    browser = signed_in(live_server, smart, None, practitioner, trantow)
    for draft_id in (other_patient, other_server):
        answer = browser.get(f"/review/drafts/{draft_id}")
        assert answer.status_code == 403 and "not about the patient" in answer.text
    answer = browser.get(f"/review/drafts/{no_server}")
    assert answer.status_code == 403 and "names no FHIR server" in answer.text
    form = {"csrf": session_of(live_server, browser).csrf, "text": "IMPRESSION:\nsigned elsewhere"}
    assert browser.post(f"/review/drafts/{no_server}/sign", data=form).status_code == 403
    worklist = browser.get("/review/").text
    assert other_patient not in worklist and other_server not in worklist and no_server not in worklist
    drafts = DraftService(Store(database_url), Settings(), httpx.Client())
    assert drafts.get(no_server).status == "draft"


def test_an_iss_off_the_allowlist_is_refused_before_any_request(
    live_server: LiveServer, smart: SmartServer
) -> None:
    answer = httpx.get(f"{live_server.url}/review/launch?{urlencode({'iss': 'https://evil.example/fhir'})}")
    assert answer.status_code == 403 and "not one this service trusts" in answer.text
    # On the hooks' FHIR server allowlist only (an open test launcher): it signs no one in to the review app.
    answer = httpx.get(f"{live_server.url}/review/launch?{urlencode({'iss': HOOK_ONLY_FHIR_SERVER})}")
    assert answer.status_code == 403 and "not one this service trusts" in answer.text


def test_a_signed_link_is_view_only_outside_development_mode(
    live_server: LiveServer, fhir_server: FhirServer, database_url: str
) -> None:
    draft_id = make_draft(database_url, fhir_server.patients["Trantow"], fhir_server.base_url)
    access = sign_link(Settings(secret_key=SECRET_KEY), "draft-review", draft_id)
    page = httpx.get(f"{live_server.url}/drafts/{draft_id}/review", params={"access": access})
    assert page.status_code == 200 and 'id="read-only"' in page.text and 'id="sign-form"' not in page.text
    form = {"access": access, "text": "x", "practitioner": "Practitioner/1", "practitionerName": "Forged"}
    refused = httpx.post(f"{live_server.url}/drafts/{draft_id}/sign", data=form)
    assert refused.status_code == 403
    for wrong in ("", "forged", sign_link(Settings(secret_key=SECRET_KEY), "draft-review", "other")):
        assert (
            httpx.get(f"{live_server.url}/drafts/{draft_id}/review", params={"access": wrong}).status_code
            == 401
        )


def test_a_standalone_launch_opens_the_worklist_of_the_chosen_patient(
    live_server: LiveServer, smart: SmartServer, fhir_server: FhirServer, database_url: str, practitioner: str
) -> None:
    patient = fhir_server.patients["Erdman"]
    draft_id = make_draft(database_url, patient, smart.iss)
    smart.set_user(practitioner, patient)
    browser = new_browser(live_server)
    launched = browser.get(f"/review/launch?{urlencode({'iss': smart.iss})}", follow_redirects=False)
    assert launched.status_code == 302
    assert (
        "launch%2Fpatient" in launched.headers["location"] or "launch/patient" in launched.headers["location"]
    )
    callback = httpx.get(launched.headers["location"]).headers["location"]
    worklist = browser.get(callback)
    assert worklist.status_code == 200 and f"/review/drafts/{draft_id}" in worklist.text


def test_a_callback_opened_in_another_browser_signs_no_one_in(
    live_server: LiveServer, smart: SmartServer, fhir_server: FhirServer, practitioner: str
) -> None:
    """Login CSRF: the attacker launches in their browser and sends the clinician the callback URL."""
    patient = fhir_server.patients["Trantow"]
    launch = smart.mint_launch(patient, practitioner)
    launch_url = f"{live_server.url}/review/launch?{urlencode({'iss': smart.iss, 'launch': launch})}"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        attacker, clinician = chromium.new_context(), chromium.new_context()
        # The attacker launches in their browser and stops at the authorization server's redirect back.
        launched = attacker.request.get(launch_url, max_redirects=0)
        assert launched.status == 302 and launched.headers["location"].startswith(smart.iss.rsplit("/", 1)[0])
        callback = attacker.request.get(launched.headers["location"], max_redirects=0).headers["location"]
        assert [c for c in attacker.cookies() if c["name"].startswith("mgcds_login_")]

        victim_page = clinician.new_page()
        answer = victim_page.goto(callback)
        assert answer is not None and answer.status == 400
        assert "started in another browser" in victim_page.inner_text("body")
        assert not [c for c in clinician.cookies() if c["name"] == COOKIE]
        chromium.close()
