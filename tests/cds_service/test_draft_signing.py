"""Signing drafts on the default SQLite store: once under a real race, patient checked first, failures kept.

A loopback FHIR server records what it is sent: the Patient read, the identifier search and the transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from support import ISSUER
from support import FhirStubHandler
from support import record_draft

from cds_service.drafts import DraftService
from cds_service.drafts import WriteTarget
from cds_service.errors import Conflict
from cds_service.settings import Settings
from cds_service.store import Draft
from cds_service.store import Store


@dataclass
class StubFhir:
    """What the stub FHIR server saw, and how it answers."""

    url: str
    patient_status: int = 200
    transaction_status: int = 200
    transactions: list[str | None] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)


@pytest.fixture
def stub_fhir() -> Iterator[StubFhir]:
    state = StubFhir(url="")
    lock = threading.Lock()

    class Handler(FhirStubHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            state.reads.append(self.path)
            if self.path.startswith("/fhir/Patient/"):
                self._answer(state.patient_status, {"resourceType": "Patient", "id": "p1"})
            else:
                self._answer(200, {"resourceType": "Bundle", "type": "searchset", "entry": []})

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                state.transactions.append(self.headers.get("Authorization"))
            location = {"response": {"status": "201", "location": "DiagnosticReport/r1/_history/1"}}
            bundle = {"resourceType": "Bundle", "type": "transaction-response", "entry": [location] * 3}
            self._answer(state.transaction_status, bundle)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/fhir"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()


@pytest.fixture
def drafts(tmp_path: Path) -> DraftService:
    store = Store(f"sqlite:///{tmp_path / 'cds.db'}")
    store.migrate()
    return DraftService(store, Settings(), httpx.Client(timeout=5))


def new_draft(drafts: DraftService, fhir_server: str | None = None) -> Draft:
    return record_draft(drafts, "p1", fhir_server, image_hash="img1", study="ImagingStudy/s1")


def test_two_concurrent_first_signs_sign_once_and_write_once(
    drafts: DraftService, stub_fhir: StubFhir
) -> None:
    draft = new_draft(drafts)
    target = WriteTarget(stub_fhir.url, "clinician-token")
    barrier = threading.Barrier(2)

    def sign(name: str) -> Draft:
        barrier.wait()
        return drafts.sign(
            draft.id,
            f"FINDINGS:\n{name}\n\nIMPRESSION:\nok",
            f"Practitioner/{name}",
            name,
            target,
            vouched_by=ISSUER,
        )

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(sign, ["a", "b"]))

    assert {r.status for r in results} == {"signed"}
    assert stub_fhir.transactions == ["Bearer clinician-token"]
    final = drafts.get(draft.id)
    assert final.signed_by in ("Practitioner/a", "Practitioner/b")
    assert final.writeback == "DiagnosticReport/r1"


def test_a_refused_write_leaves_the_draft_signed_visibly_and_a_retry_writes_it(
    drafts: DraftService, stub_fhir: StubFhir
) -> None:
    draft = new_draft(drafts)
    target = WriteTarget(stub_fhir.url, "clinician-token")
    stub_fhir.transaction_status = 403
    signed = drafts.sign(draft.id, "IMPRESSION:\nok", "Practitioner/a", "Dr A", target, vouched_by=ISSUER)
    assert signed.status == "signed" and signed.writeback is None
    assert signed.writeback_error == "the FHIR server refused the signed report (403)"
    # A refusal needs a person (a fresh token): failed, shown, and not retried by the outbox sweep.
    assert signed.writeback_state == "failed"
    assert drafts.deliver_due() == 0 and stub_fhir.transactions == ["Bearer clinician-token"]

    stub_fhir.transaction_status = 200
    retried = drafts.retry_write_back(draft.id, target)
    assert retried.writeback == "DiagnosticReport/r1" and retried.writeback_error is None
    assert retried.writeback_state == "written"


@pytest.mark.parametrize("status", [401, 403, 500])
def test_no_write_unless_the_patient_read_succeeds(
    drafts: DraftService, stub_fhir: StubFhir, status: int
) -> None:
    draft = new_draft(drafts)
    stub_fhir.patient_status = status
    signed = drafts.sign(
        draft.id,
        "IMPRESSION:\nok",
        "Practitioner/a",
        "Dr A",
        WriteTarget(stub_fhir.url, "t"),
        vouched_by=ISSUER,
    )
    assert signed.status == "signed" and stub_fhir.transactions == []
    assert signed.writeback_error == f"the FHIR server answered {status} reading the patient"


def test_a_patient_gone_from_the_server_refuses_the_sign_and_changes_nothing(
    drafts: DraftService, stub_fhir: StubFhir
) -> None:
    draft = new_draft(drafts)
    stub_fhir.patient_status = 404
    with pytest.raises(Conflict, match="no longer exists"):
        drafts.sign(
            draft.id,
            "IMPRESSION:\nok",
            "Practitioner/a",
            "Dr A",
            WriteTarget(stub_fhir.url, "t"),
            vouched_by=ISSUER,
        )
    assert drafts.get(draft.id).status == "draft" and stub_fhir.transactions == []


def test_a_draft_belongs_to_one_patient_on_one_server(drafts: DraftService) -> None:
    first = new_draft(drafts, "https://ehr-a.example.org/fhir")
    assert new_draft(drafts, "https://ehr-a.example.org/fhir/").id == first.id
    assert new_draft(drafts, "https://ehr-b.example.org/fhir").id != first.id
