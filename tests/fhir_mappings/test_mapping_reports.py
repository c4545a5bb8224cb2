"""Draft and signed DiagnosticReports, their Provenances and the write-back transaction, checked as FHIR."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC
from datetime import datetime
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

from fhir_mappings.model_outputs import ImagingReadOutput
from fhir_mappings.reports import AI_CONCLUSION_PREFIX
from fhir_mappings.reports import AI_NOTICE
from fhir_mappings.reports import DRAFT_IDENTIFIER_SYSTEM
from fhir_mappings.reports import ai_provenance
from fhir_mappings.reports import clinician_provenance
from fhir_mappings.reports import draft_id_uuid
from fhir_mappings.reports import draft_report
from fhir_mappings.reports import report_text
from fhir_mappings.reports import signed_report
from fhir_mappings.reports import writeback_bundle

READ = ImagingReadOutput(
    findings="  Right lower lobe opacity. No pleural effusion.\n",
    impression="Findings concerning for pneumonia.",
    urgency="urgent",
)
ISSUED = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
SIGNED = datetime(2025, 3, 5, 9, 0, 0, tzinfo=UTC)
DRAFT_ID = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").hex
PRACTITIONER = ("Practitioner/dr-7", "Dr. Ada Radiologist")
CLINICIAN_TEXT = "FINDINGS:\nRight lower lobe consolidation.\n\nIMPRESSION:\nLobar pneumonia."


def _wire(resource: Any) -> dict[str, Any]:
    """Return the JSON a FHIR server would receive, after checking it parses back unchanged."""
    data = resource.model_dump(mode="json", exclude_none=True)
    again = get_fhir_model_class(data["resourceType"]).model_validate(data)
    assert again.model_dump(mode="json", exclude_none=True) == data
    return data


def _attachment_text(attachment: dict[str, Any]) -> str:
    assert attachment["contentType"] == "text/plain; charset=utf-8"
    return base64.b64decode(attachment["data"]).decode()


def _draft(**override: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "draft_id": DRAFT_ID,
        "patient_id": "p1",
        "encounter_id": "e1",
        "study": "ImagingStudy/s1",
        "media": "Media/m1",
        "issued": ISSUED,
    }
    arguments.update(override)
    return _wire(draft_report(READ, **arguments))


def test_draft_report_is_preliminary_and_says_it_is_ai() -> None:
    report = _draft()

    assert report["resourceType"] == "DiagnosticReport"
    assert report["status"] == "preliminary"
    assert report["identifier"] == [{"system": DRAFT_IDENTIFIER_SYSTEM, "value": DRAFT_ID}]
    assert report["subject"] == {"reference": "Patient/p1"}
    assert report["encounter"] == {"reference": "Encounter/e1"}
    assert report["imagingStudy"] == [{"reference": "ImagingStudy/s1"}]
    assert report["media"] == [{"link": {"reference": "Media/m1"}}]
    assert report["category"][0]["coding"][0]["code"] == "RAD"
    assert report["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "18748-4",
        "display": "Diagnostic imaging study",
    }
    # EHRs list a report by its conclusion alone: it says it is an unreviewed AI draft until signed.
    assert report["conclusion"] == f"{AI_CONCLUSION_PREFIX} Findings concerning for pneumonia."
    assert report["issued"].startswith("2025-03-04T05:06:07")
    (form,) = report["presentedForm"]
    text = _attachment_text(form)
    assert text.startswith(AI_NOTICE)
    assert "requires clinician review" in text
    assert text.endswith(
        "FINDINGS:\nRight lower lobe opacity. No pleural effusion.\n\n"
        "IMPRESSION:\nFindings concerning for pneumonia."
    )
    assert "id" not in report  # the server assigns it


def test_draft_report_leaves_out_what_it_does_not_have() -> None:
    report = _draft(encounter_id=None, study=None, media=None)
    assert not {"encounter", "imagingStudy", "media"} & report.keys()
    # DiagnosticReport.media.link is a Reference(Media): an image held by a DocumentReference is not linked.
    assert "media" not in _draft(media="DocumentReference/d1")


def test_report_text_trims_sections() -> None:
    assert report_text(" a \n", "\nb ") == "FINDINGS:\na\n\nIMPRESSION:\nb"


def test_ai_provenance_names_the_model_as_a_contained_device() -> None:
    provenance = _wire(ai_provenance("urn:uuid:1234", "google/medgemma-4b-it", "rev-abc123", ISSUED))

    assert provenance["target"] == [{"reference": "urn:uuid:1234"}]
    (device,) = provenance["contained"]
    assert device["resourceType"] == "Device"
    assert device["deviceName"] == [{"name": "google/medgemma-4b-it", "type": "model-name"}]
    assert device["version"] == [{"value": "rev-abc123"}]
    assert provenance["activity"]["coding"][0]["code"] == "CREATE"
    assert (
        provenance["activity"]["coding"][0]["system"]
        == "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
    )
    (agent,) = provenance["agent"]
    assert agent["type"]["coding"][0]["code"] == "author"
    assert agent["who"]["reference"] == f"#{device['id']}"
    assert provenance["recorded"].startswith("2025-03-04T05:06:07")


def test_signed_report_is_final_with_the_clinicians_text() -> None:
    report = _wire(signed_report(_draft(), CLINICIAN_TEXT, "Lobar pneumonia.", *PRACTITIONER, SIGNED))

    assert report["status"] == "final"
    assert report["resultsInterpreter"] == [
        {"reference": "Practitioner/dr-7", "display": "Dr. Ada Radiologist"}
    ]
    assert report["conclusion"] == "Lobar pneumonia."
    (form,) = report["presentedForm"]
    assert _attachment_text(form) == CLINICIAN_TEXT
    assert "AI draft" not in report["code"]["text"]
    assert report["issued"].startswith("2025-03-05T09:00:00")
    # What ties the report to its draft and image stays.
    assert report["identifier"] == [{"system": DRAFT_IDENTIFIER_SYSTEM, "value": DRAFT_ID}]
    assert report["imagingStudy"] == [{"reference": "ImagingStudy/s1"}]
    assert report["subject"] == {"reference": "Patient/p1"}


def test_clinician_provenance_records_the_verifier() -> None:
    provenance = _wire(clinician_provenance("urn:uuid:1234", *PRACTITIONER, SIGNED))

    assert provenance["activity"]["coding"][0]["code"] == "VERIFY"
    (agent,) = provenance["agent"]
    assert agent["type"]["coding"][0]["code"] == "verifier"
    assert agent["who"] == {"reference": "Practitioner/dr-7", "display": "Dr. Ada Radiologist"}
    assert "contained" not in provenance


def test_writeback_bundle_is_an_idempotent_transaction() -> None:
    report = signed_report(_draft(), CLINICIAN_TEXT, "Lobar pneumonia.", *PRACTITIONER, SIGNED)

    bundle = _wire(
        writeback_bundle(report, DRAFT_ID, ("google/medgemma-4b-it", "rev-abc123"), PRACTITIONER, SIGNED)
    )

    assert bundle["type"] == "transaction"
    report_entry, ai_entry, clinician_entry = bundle["entry"]
    full_url = report_entry["fullUrl"]
    assert full_url == "urn:uuid:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    assert report_entry["request"] == {
        "method": "POST",
        "url": "DiagnosticReport",
        "ifNoneExist": f"identifier={DRAFT_IDENTIFIER_SYSTEM}|{DRAFT_ID}",
    }
    assert report_entry["resource"] == _wire(report)
    assert report_entry["resource"]["status"] == "final"

    assert ai_entry["request"] == {"method": "POST", "url": "Provenance"}
    assert ai_entry["resource"]["target"] == [{"reference": full_url}]
    assert ai_entry["resource"]["activity"]["coding"][0]["code"] == "CREATE"
    assert ai_entry["resource"]["contained"][0]["deviceName"][0]["name"] == "google/medgemma-4b-it"

    assert clinician_entry["request"] == {"method": "POST", "url": "Provenance"}
    assert clinician_entry["resource"]["target"] == [{"reference": full_url}]
    assert clinician_entry["resource"]["agent"][0]["who"]["reference"] == "Practitioner/dr-7"

    for entry in bundle["entry"]:
        _wire(get_fhir_model_class(entry["resource"]["resourceType"]).model_validate(entry["resource"]))


def test_draft_id_uuid_spells_a_uuid() -> None:
    assert draft_id_uuid(DRAFT_ID) == str(uuid.UUID(DRAFT_ID))
    assert draft_id_uuid(str(uuid.UUID(DRAFT_ID))) == str(uuid.UUID(DRAFT_ID))
    assert str(uuid.UUID(draft_id_uuid("abc"))) == "abc00000-0000-0000-0000-000000000000"
