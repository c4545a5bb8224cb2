"""Model output → draft DiagnosticReport and Provenance; clinician sign-off → final report and its Provenance.

Every resource is built with fhir.resources (R4B, wire-compatible with R4 for these resources), so it is
validated before it leaves the service. Nothing here is final until a named clinician signs it.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.provenance import Provenance

from cds_service.wire import ImageRead
from fhir_mappings.model_outputs import ImagingReadOutput

DRAFT_IDENTIFIER_SYSTEM = "urn:medgemma-cds:draft-report"
AI_NOTICE = (
    "AI-generated draft (MedGemma, not a clinical-grade model) - requires clinician review and signature."
)
#: Leads a preliminary report's conclusion: EHRs show ``conclusion`` alone, without the presented form.
AI_CONCLUSION_PREFIX = "AI draft, not reviewed by a clinician:"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
# LOINC 18748-4 "Diagnostic imaging study" names the report when the study carries no procedure code.
IMAGING_REPORT_CODE = {"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}


def report_text(findings: str, impression: str) -> str:
    """Return the report body a clinician reads and edits: findings, then impression."""
    return f"FINDINGS:\n{findings.strip()}\n\nIMPRESSION:\n{impression.strip()}"


def _text_attachment(text: str, title: str) -> dict[str, Any]:
    return {
        "contentType": "text/plain; charset=utf-8",
        "data": base64.b64encode(text.encode()).decode(),
        "title": title,
    }


def dicom_uid_identifier(uid: str) -> dict[str, str]:
    """Return a DICOM UID as a FHIR Identifier (system ``urn:dicom:uid``, value ``urn:oid:`` + UID)."""
    return {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}


def read_entities(study: str | None, image_ref: str | None, read: ImageRead | None) -> list[dict[str, Any]]:
    """Return the Provenance entities of what the model read: the study (reference and Study Instance
    UID), the instance (SOP Instance UID, described), or the resource holding an attached image."""
    entities: list[dict[str, Any]] = []
    if study or (read and read.study_uid):
        what: dict[str, Any] = {"reference": study} if study else {}
        if read and read.study_uid:
            what["identifier"] = dicom_uid_identifier(read.study_uid)
        entities.append({"role": "source", "what": what})
    if read and read.instance_uid:
        entities.append(
            {
                "role": "source",
                "what": {
                    "identifier": dicom_uid_identifier(read.instance_uid),
                    "display": f"Instance read: {read.description}"[:500],
                },
            }
        )
    elif image_ref and image_ref != study:
        entities.append({"role": "source", "what": {"reference": image_ref}})
    return entities


def draft_report(
    output: ImagingReadOutput,
    *,
    draft_id: str,
    patient_id: str,
    encounter_id: str | None,
    study: str | None,
    media: str | None,
    issued: datetime,
    study_uid: str | None = None,
) -> DiagnosticReport:
    """Return the preliminary DiagnosticReport for an AI image read (status preliminary)."""
    data: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": DRAFT_IDENTIFIER_SYSTEM, "value": draft_id}],
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        "code": {"coding": [IMAGING_REPORT_CODE], "text": "Imaging report (AI draft)"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "issued": issued.isoformat(),
        "conclusion": f"{AI_CONCLUSION_PREFIX} {output.impression}",
        "presentedForm": [
            _text_attachment(
                f"{AI_NOTICE}\n\n{report_text(output.findings, output.impression)}", "AI draft report"
            )
        ],
    }
    if encounter_id:
        data["encounter"] = {"reference": f"Encounter/{encounter_id}"}
    if study:
        data["imagingStudy"] = [
            {"reference": study} | ({"identifier": dicom_uid_identifier(study_uid)} if study_uid else {})
        ]
    if media and media.startswith("Media/"):
        data["media"] = [{"link": {"reference": media}}]
    return DiagnosticReport.model_validate(data)


def ai_provenance(
    target: str,
    model_id: str,
    model_version: str,
    recorded: datetime,
    entities: list[dict[str, Any]] | None = None,
) -> Provenance:
    """Return the Provenance of an AI draft: the model (a contained Device) authored it from ``entities``
    (``read_entities``: the study and instance it read)."""
    return Provenance.model_validate(
        {
            "resourceType": "Provenance",
            "contained": [
                {
                    "resourceType": "Device",
                    "id": "model",
                    "deviceName": [{"name": model_id[:200], "type": "model-name"}],
                    "version": [{"value": model_version[:200]}],
                    "note": [{"text": "MedGemma is not a clinical-grade model."}],
                }
            ],
            "target": [{"reference": target}],
            "recorded": recorded.isoformat(),
            "activity": {"coding": [{"system": DATA_OPERATION, "code": "CREATE", "display": "create"}]},
            "agent": [
                {
                    "type": {"coding": [{"system": PARTICIPANT_TYPE, "code": "author", "display": "Author"}]},
                    "who": {"reference": "#model", "display": f"{model_id} {model_version}"[:200]},
                }
            ],
            "entity": entities or None,
        }
    )


def signed_report(
    draft: dict[str, Any],
    text: str,
    conclusion: str,
    practitioner: str,
    practitioner_name: str,
    issued: datetime,
) -> DiagnosticReport:
    """Return the final report: the clinician's text, the clinician as results interpreter."""
    data = dict(draft)
    data.update(
        {
            "status": "final",
            "issued": issued.isoformat(),
            "conclusion": conclusion,
            "presentedForm": [_text_attachment(text, "Signed report")],
            "resultsInterpreter": [{"reference": practitioner, "display": practitioner_name}],
        }
    )
    data["code"] = {"coding": [IMAGING_REPORT_CODE], "text": "Imaging report"}
    return DiagnosticReport.model_validate(data)


def clinician_provenance(
    target: str, practitioner: str, practitioner_name: str, recorded: datetime
) -> Provenance:
    """Return the Provenance of the sign-off: the practitioner verified (VERIFY) the target as verifier."""
    return Provenance.model_validate(
        {
            "resourceType": "Provenance",
            "target": [{"reference": target}],
            "recorded": recorded.isoformat(),
            "activity": {"coding": [{"system": DATA_OPERATION, "code": "VERIFY", "display": "verify"}]},
            "agent": [
                {
                    "type": {
                        "coding": [{"system": PARTICIPANT_TYPE, "code": "verifier", "display": "Verifier"}]
                    },
                    "who": {"reference": practitioner, "display": practitioner_name},
                }
            ],
        }
    )


def writeback_bundle(
    report: DiagnosticReport,
    draft_id: str,
    model: tuple[str, str],
    practitioner: tuple[str, str],
    at: datetime,
    entities: list[dict[str, Any]] | None = None,
) -> Bundle:
    """Return the transaction that writes a signed report and both Provenances.

    The report is a conditional create on its draft identifier (FHIR R4 §3.1.0.8 "Conditional create"), so a
    retried sign-off never writes a second report.
    """
    report_url = f"urn:uuid:{draft_id_uuid(draft_id)}"
    entries = [
        {
            "fullUrl": report_url,
            "resource": report.model_dump(mode="json", exclude_none=True),
            "request": {
                "method": "POST",
                "url": "DiagnosticReport",
                "ifNoneExist": f"identifier={DRAFT_IDENTIFIER_SYSTEM}|{draft_id}",
            },
        },
        {
            "resource": ai_provenance(report_url, model[0], model[1], at, entities).model_dump(
                mode="json", exclude_none=True
            ),
            "request": {"method": "POST", "url": "Provenance"},
        },
        {
            "resource": clinician_provenance(report_url, practitioner[0], practitioner[1], at).model_dump(
                mode="json", exclude_none=True
            ),
            "request": {"method": "POST", "url": "Provenance"},
        },
    ]
    return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def draft_id_uuid(draft_id: str) -> str:
    """Return a UUID spelling of a draft id (its first 32 hex digits), for ``urn:uuid:`` full URLs."""
    hex_id = (draft_id.replace("-", "") + "0" * 32)[:32]
    return f"{hex_id[:8]}-{hex_id[8:12]}-{hex_id[12:16]}-{hex_id[16:20]}-{hex_id[20:32]}"
