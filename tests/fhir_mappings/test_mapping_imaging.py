"""Which imaging still needs a report, and the cards the imaging-report-draft service answers with."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from cds_service.wire import Card
from cds_service.wire import DraftRef
from cds_service.wire import JobRecord
from fhir_mappings.images import ImageSource
from fhir_mappings.images import source_hash
from fhir_mappings.images import study_sources
from fhir_mappings.imaging import describe_source
from fhir_mappings.imaging import imaging_draft_card
from fhir_mappings.imaging import imaging_worklist
from fhir_mappings.imaging import no_image_card
from fhir_mappings.imaging import reported_references
from fhir_mappings.imaging import study_description
from fhir_mappings.imaging import unreadable_image_card
from fhir_mappings.model_outputs import ImagingReadOutput
from fhir_mappings.reports import draft_report

CXR_PNG = (
    Path(__file__).resolve().parents[2] / "cds_service" / "data" / "sample" / "cxr-00000001_000.png"
).read_bytes()
STUDY_ID = "529fd47e-3e17-462c-a003-fd5043481053"  # Louis Erdman's chest radiograph
STUDY = f"ImagingStudy/{STUDY_ID}"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
READ = ImagingReadOutput(
    findings="Right lower lobe opacity. No pleural effusion.",
    impression="Findings concerning for pneumonia.",
    urgency="urgent",
)


def _media(media_id: str, study: str | None = STUDY, created: str = "2018-04-13T16:30:00Z") -> dict[str, Any]:
    data: dict[str, Any] = {
        "resourceType": "Media",
        "id": media_id,
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "createdDateTime": created,
        "content": {"contentType": "image/png", "data": base64.b64encode(CXR_PNG).decode()},
    }
    if study:
        data["partOf"] = [{"reference": study}]
    return data


def _report(
    report_id: str, status: str, study: str | None = None, media: str | None = None
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "status": status,
        "code": {"text": "XR chest"},
        "subject": {"reference": "Patient/p1"},
    }
    if study:
        data["imagingStudy"] = [{"reference": study}]
    if media:
        data["media"] = [{"link": {"reference": media}}]
    return data


def _job(**fields: Any) -> JobRecord:
    values: dict[str, Any] = {
        "id": "job-1",
        "service_id": "imaging-report-draft",
        "task": "imaging-read",
        "state": "done",
        "created_at": datetime(2025, 1, 1, tzinfo=UTC),
        "model": "google/medgemma-4b-it",
        "model_version": "rev-abc123",
        "result": READ.model_dump(),
    }
    values.update(fields)
    return JobRecord(**values)


def test_louis_study_without_image_is_listed_for_a_no_image_card(
    louis: Any, bundle_of: Callable[..., Any]
) -> None:
    # Louis's DiagnosticReports are final lab panels: none covers the radiograph.
    sources, without_image = imaging_worklist(
        louis.search("ImagingStudy"), bundle_of([]), bundle_of([]), louis.search("DiagnosticReport")
    )

    assert sources == []
    assert [s.id for s in without_image] == [STUDY_ID]
    body = no_image_card(without_image[0]).wire()
    Card.model_validate(body)
    assert body["summary"] == "No retrievable image for Digital Radiography Chest study 2018-04-13"
    assert body["indicator"] == "info"
    assert STUDY in body["detail"]
    assert "suggestions" not in body


def test_media_of_the_study_is_to_be_read(louis: Any, bundle_of: Callable[..., Any]) -> None:
    sources, without_image = imaging_worklist(
        louis.search("ImagingStudy"), bundle_of([_media("m1")]), None, louis.search("DiagnosticReport")
    )

    assert [(s.resource, s.study) for s in sources] == [("Media/m1", STUDY)]
    assert without_image == []
    assert (
        describe_source(sources[0], louis.search("ImagingStudy"))
        == "Digital Radiography Chest study 2018-04-13"
    )


def test_final_report_on_the_study_takes_it_off_the_worklist(
    louis: Any, bundle_of: Callable[..., Any]
) -> None:
    for status in ("final", "amended", "corrected", "appended"):
        reports = bundle_of([*louis.raw("DiagnosticReport"), _report("r1", status, study=STUDY)])
        sources, without_image = imaging_worklist(
            louis.search("ImagingStudy"), bundle_of([_media("m1")]), None, reports
        )
        assert (sources, without_image) == ([], []), status
        # Without its image too: a reported study needs no "no image" card.
        assert imaging_worklist(louis.search("ImagingStudy"), None, None, reports) == ([], []), status


def test_preliminary_report_leaves_the_study_on_the_worklist(
    louis: Any, bundle_of: Callable[..., Any]
) -> None:
    for status in ("registered", "partial", "preliminary", "cancelled", "entered-in-error"):
        reports = bundle_of([_report("r1", status, study=STUDY)])
        sources, without_image = imaging_worklist(
            louis.search("ImagingStudy"), bundle_of([_media("m1")]), None, reports
        )
        assert [s.resource for s in sources] == ["Media/m1"], status
        assert imaging_worklist(louis.search("ImagingStudy"), None, None, reports)[1][0].id == STUDY_ID


def test_final_report_on_one_media_leaves_the_others(bundle_of: Callable[..., Any]) -> None:
    media = bundle_of(
        [_media("reported", study=None), _media("new", study=None, created="2019-01-01T00:00:00Z")]
    )
    reports = bundle_of([_report("r1", "final", media="Media/reported")])

    assert reported_references(reports) == {"Media/reported"}
    sources, without_image = imaging_worklist(None, media, None, reports)
    assert [s.resource for s in sources] == ["Media/new"]
    assert without_image == []


def test_images_come_newest_first_from_media_and_documents(louis: Any, bundle_of: Callable[..., Any]) -> None:
    document = {
        "resourceType": "DocumentReference",
        "id": "d1",
        "status": "current",
        "subject": {"reference": "Patient/p1"},
        "date": "2021-05-05T00:00:00Z",
        "content": [{"attachment": {"contentType": "application/dicom", "url": "Binary/b1"}}],
        "context": {"related": [{"reference": "ImagingStudy/other"}]},
    }
    sources, without_image = imaging_worklist(
        louis.search("ImagingStudy"), bundle_of([_media("m1")]), bundle_of([document]), None
    )
    assert [s.resource for s in sources] == ["DocumentReference/d1", "Media/m1"]
    assert without_image == []
    assert describe_source(sources[0], louis.search("ImagingStudy")) == "medical image"


def test_study_whose_image_is_reported_gets_no_no_image_card(
    louis: Any, bundle_of: Callable[..., Any]
) -> None:
    reports = bundle_of([_report("r1", "final", media="Media/m1")])
    sources, without_image = imaging_worklist(
        louis.search("ImagingStudy"), bundle_of([_media("m1")]), None, reports
    )
    assert sources == []
    assert without_image == []


def test_study_description_without_series_details(fhir: Callable[..., Any]) -> None:
    study = fhir(
        {
            "resourceType": "ImagingStudy",
            "id": "ct1",
            "status": "available",
            "subject": {"reference": "Patient/p1"},
            "series": [{"uid": "1.2.3", "modality": {"system": DCM, "code": "CT"}}],
        }
    )
    assert study_description(study) == "CT study"
    bare = fhir(
        {
            "resourceType": "ImagingStudy",
            "id": "x",
            "status": "available",
            "subject": {"reference": "Patient/p"},
        }
    )
    assert study_description(bare) == "imaging study"


def test_unreadable_image_card() -> None:
    source = ImageSource(
        resource="Media/m9", study=STUDY, content_type="image/png", data_b64="AAAA", url=None, taken="2024"
    )
    body = unreadable_image_card(source, "image could not be decoded (UnidentifiedImageError)").wire()
    Card.model_validate(body)
    assert body["indicator"] == "warning"
    assert body["detail"].startswith("Media/m9: image could not be decoded (UnidentifiedImageError).")
    assert "suggestions" not in body


@pytest.mark.parametrize(
    ("urgency", "indicator"), [("routine", "info"), ("urgent", "warning"), ("critical", "critical")]
)
def test_imaging_draft_card(urgency: str, indicator: str) -> None:
    output = READ.model_copy(update={"urgency": urgency})
    draft_id = uuid.uuid4().hex
    report = draft_report(
        output,
        draft_id=draft_id,
        patient_id="p1",
        encounter_id=None,
        study=STUDY,
        media="Media/m1",
        issued=datetime(2025, 1, 1, tzinfo=UTC),
    ).model_dump(mode="json", exclude_none=True)
    review_url = f"https://cds.test/drafts/{draft_id}/review?access=t0k"
    draft = DraftRef(id=draft_id, status="draft", report=report, review_url=review_url)

    body = imaging_draft_card(output, _job(), draft).wire()

    Card.model_validate(body)
    assert body["summary"] == f"AI draft imaging report ready for review ({urgency})"
    assert body["indicator"] == indicator
    assert body["source"]["label"] == "MedGemma AI draft: MedGemma 4B (rev-abc123)"
    assert "**Impression (AI draft):** Findings concerning for pneumonia." in body["detail"]
    assert "**Findings (AI draft):** Right lower lobe opacity." in body["detail"]
    assert "requires clinician review" in body["detail"]
    assert body["selectionBehavior"] == "at-most-one"
    (suggestion,) = body["suggestions"]
    (action,) = suggestion["actions"]
    assert action["type"] == "create"
    assert action["resource"] == report
    assert action["resource"]["status"] == "preliminary"
    (link,) = body["links"]
    assert (link["type"], link["url"]) == ("smart", review_url)
    assert json.loads(link["appContext"]) == {"draftId": draft_id}


@pytest.mark.parametrize("status", ["signed", "rejected"])
def test_decided_draft_is_no_longer_offered(status: str) -> None:
    draft = DraftRef(
        id="d1", status=status, report={"resourceType": "DiagnosticReport"}, review_url="https://x/y"
    )
    assert imaging_draft_card(READ, _job(), draft) is None


def test_an_imaging_draft_cut_at_its_limit_says_so() -> None:
    draft = DraftRef(
        id="d1", status="draft", report={"resourceType": "DiagnosticReport"}, review_url="https://x/y"
    )
    whole = imaging_draft_card(READ, _job(), draft)
    cut = imaging_draft_card(READ, _job(truncated=["findings"]), draft)

    assert whole is not None and "cut short" not in (whole.detail or "")
    assert cut is not None
    assert "**Text cut short:** findings reached its length limit" in (cut.detail or "")


# --- Studies on a PACS (DICOMweb) ---------------------------------------------------------------------

WADO = {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "code": "dicom-wado-rs"}


def _pacs_study(
    study_id: str, endpoint: list[str], *, instances: list[str] = (), contained: list[dict] = (), **extra: Any
) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": study_id,
        "status": "available",
        "subject": {"reference": "Patient/p1"},
        "started": "2024-01-05T09:00:00Z",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:1.2.{study_id.removeprefix('s')}"}],
        "endpoint": [{"reference": ref} for ref in endpoint],
        "contained": list(contained),
        "series": [{"uid": "1.2.9", "modality": {"code": "CR"}, "instance": [{"uid": u} for u in instances]}],
    } | extra


def test_a_study_with_a_wado_rs_endpoint_is_read_from_the_pacs(bundle_of: Callable[..., Any]) -> None:
    held = {
        "resourceType": "Endpoint",
        "id": "ep1",
        "connectionType": WADO,
        "address": "https://pacs.test/wado",
    }
    contained = {
        "resourceType": "Endpoint",
        "id": "c",
        "connectionType": WADO,
        "address": "https://c.test/dw",
    }
    not_wado = {"resourceType": "Endpoint", "id": "ep2", "connectionType": {"code": "hl7-fhir-rest"}}
    studies = bundle_of(
        [
            _pacs_study("s1", ["Endpoint/ep1"]),
            _pacs_study("s2", ["Endpoint/elsewhere"]),
            _pacs_study("s3", ["#c"], contained=[contained]),
            _pacs_study("s4", ["Endpoint/ep2"]),
            _pacs_study("s5", []),
            held,
            not_wado,
        ]
    )
    sources, without_image = imaging_worklist(studies, None, None, None)

    found = {s.resource: s.dicom for s in sources}
    assert set(found) == {"ImagingStudy/s1", "ImagingStudy/s2", "ImagingStudy/s3"}
    assert (found["ImagingStudy/s1"].uid, found["ImagingStudy/s1"].endpoint_address) == (
        "1.2.1",
        held["address"],
    )
    # An Endpoint the record doesn't hold is read by the worker; a contained one is used as it is.
    assert (found["ImagingStudy/s2"].endpoint_address, found["ImagingStudy/s2"].endpoint_ref) == (
        None,
        "Endpoint/elsewhere",
    )
    assert found["ImagingStudy/s3"].endpoint_address == "https://c.test/dw"
    assert [s.id for s in without_image] == ["s4", "s5"]


def test_a_new_instance_is_a_new_image_and_the_token_is_not_part_of_it(fhir: Callable[..., Any]) -> None:
    def hashed(study: dict[str, Any]) -> str:
        (source,) = study_sources([fhir(study)], {})
        return source_hash(source, "https://ehr.test/fhir")

    one = hashed(_pacs_study("s1", ["Endpoint/e"], instances=["1.2.9.1"]))
    assert one == hashed(_pacs_study("s1", ["Endpoint/e"], instances=["1.2.9.1"], started="2025-01-01"))
    assert one != hashed(_pacs_study("s1", ["Endpoint/e"], instances=["1.2.9.1", "1.2.9.2"]))
    # With no instances listed, the study's version stands for them.
    bare = _pacs_study("s1", ["Endpoint/e"])
    assert hashed(bare | {"meta": {"versionId": "1"}}) != hashed(bare | {"meta": {"versionId": "2"}})
