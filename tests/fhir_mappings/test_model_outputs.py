"""Model output schemas: valid answers parse; every bound the grammar relies on is enforced and published."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic import ValidationError

from fhir_mappings.model_outputs import ImagingReadOutput
from fhir_mappings.model_outputs import OrderReviewOutput
from fhir_mappings.model_outputs import PatientSummaryOutput
from fhir_mappings.model_outputs import capped_strings

SUMMARY: dict[str, Any] = {
    "summary": "67 year old woman with poorly controlled type 2 diabetes and CKD stage 3.",
    "key_problems": ["Type 2 diabetes", "CKD stage 3"],
    "medication_concerns": ["Metformin dose high for eGFR 42"],
    "follow_up": ["Recheck potassium in two weeks"],
    "evidence_ids": ["Condition/c-1", "Observation/egfr.2024", "MedicationRequest/m3"],
}
READ: dict[str, Any] = {
    "findings": "Right lower lobe opacity. No effusion.",
    "impression": "Findings concerning for pneumonia.",
    "urgency": "urgent",
}
REVIEW: dict[str, Any] = {
    "concerns": [
        {
            "order_id": "MedicationRequest/draft-1",
            "severity": "warning",
            "issue": "Ibuprofen with warfarin raises bleeding risk.",
            "recommendation": "Use paracetamol instead.",
            "action": "change",
        }
    ],
    "evidence_ids": ["MedicationRequest/warfarin-5"],
}
VALID = [(PatientSummaryOutput, SUMMARY), (ImagingReadOutput, READ), (OrderReviewOutput, REVIEW)]


def _with(document: Any, path: tuple[str | int, ...], value: Any) -> Any:
    """Return a copy of ``document`` with the value at ``path`` replaced (or added, for the last key)."""
    if not path:
        return value
    head, *rest = path
    copied = list(document) if isinstance(document, list) else dict(document)
    copied[head] = _with(
        document.get(head) if isinstance(document, dict) else document[head], tuple(rest), value
    )
    return copied


@pytest.mark.parametrize(("schema", "document"), VALID)
def test_valid_answers_parse(schema: type[BaseModel], document: dict[str, Any]) -> None:
    assert schema.model_validate(document).model_dump() == document


def test_no_concern_is_a_valid_review() -> None:
    assert OrderReviewOutput.model_validate({"concerns": [], "evidence_ids": []}).concerns == []


@pytest.mark.parametrize(("schema", "document"), VALID)
def test_extra_keys_are_rejected(schema: type[BaseModel], document: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as invalid:
        schema.model_validate({**document, "confidence": 0.9})

    assert [error["type"] for error in invalid.value.errors()] == ["extra_forbidden"]


@pytest.mark.parametrize(
    ("schema", "document", "path", "value", "error_type"),
    [
        (PatientSummaryOutput, SUMMARY, ("summary",), "x" * 401, "string_too_long"),
        (PatientSummaryOutput, SUMMARY, ("summary",), "", "string_too_short"),
        (PatientSummaryOutput, SUMMARY, ("key_problems",), ["p"] * 9, "too_long"),
        (PatientSummaryOutput, SUMMARY, ("key_problems", 0), "p" * 61, "string_too_long"),
        (PatientSummaryOutput, SUMMARY, ("medication_concerns",), ["m"] * 7, "too_long"),
        (PatientSummaryOutput, SUMMARY, ("follow_up", 0), "f" * 101, "string_too_long"),
        (PatientSummaryOutput, SUMMARY, ("evidence_ids",), ["Patient/p"] * 17, "too_long"),
        (ImagingReadOutput, READ, ("findings",), "x" * 1201, "string_too_long"),
        (ImagingReadOutput, READ, ("impression",), "x" * 401, "string_too_long"),
        (ImagingReadOutput, READ, ("urgency",), "stat", "literal_error"),
        (OrderReviewOutput, REVIEW, ("concerns",), [REVIEW["concerns"][0]] * 7, "too_long"),
        (OrderReviewOutput, REVIEW, ("concerns", 0, "severity"), "high", "literal_error"),
        (OrderReviewOutput, REVIEW, ("concerns", 0, "action"), "hold", "literal_error"),
        (OrderReviewOutput, REVIEW, ("concerns", 0, "issue"), "x" * 201, "string_too_long"),
        (OrderReviewOutput, REVIEW, ("concerns", 0, "recommendation"), "x" * 201, "string_too_long"),
        (OrderReviewOutput, REVIEW, ("concerns", 0, "order_id"), "draft-1", "string_pattern_mismatch"),
        (OrderReviewOutput, REVIEW, ("concerns", 0, "extra"), "x", "extra_forbidden"),
    ],
)
def test_bounds_are_enforced(
    schema: type[BaseModel],
    document: dict[str, Any],
    path: tuple[str | int, ...],
    value: Any,
    error_type: str,
) -> None:
    with pytest.raises(ValidationError) as invalid:
        schema.model_validate(_with(document, path, value))

    assert error_type in {error["type"] for error in invalid.value.errors()}


@pytest.mark.parametrize(
    "reference",
    ["Patient/123", "MedicationRequest/a-b.c", "Observation/" + "9" * 52],
)
def test_fhir_references_are_accepted(reference: str) -> None:
    assert OrderReviewOutput.model_validate({**REVIEW, "evidence_ids": [reference]}).evidence_ids == [
        reference
    ]


@pytest.mark.parametrize(
    "reference",
    [
        "patient/123",
        "Patient 123",
        "Patient/",
        "/123",
        "Patient/12 3",
        "Patient/1/_history/2",
        "Observation/" + "9" * 53,
    ],
)
def test_malformed_fhir_references_are_rejected(reference: str) -> None:
    with pytest.raises(ValidationError):
        OrderReviewOutput.model_validate({**REVIEW, "evidence_ids": [reference]})


def _nodes(node: Any) -> list[dict[str, Any]]:
    """Return every schema object nested in ``node``, the JSON schema of a model included."""
    if isinstance(node, list):
        return [found for item in node for found in _nodes(item)]
    if not isinstance(node, dict):
        return []
    return [node, *(found for value in node.values() for found in _nodes(value))]


@pytest.mark.parametrize("schema", [PatientSummaryOutput, ImagingReadOutput, OrderReviewOutput])
def test_json_schema_bounds_every_string_array_and_object(schema: type[BaseModel]) -> None:
    nodes = [node for node in _nodes(schema.model_json_schema()) if "type" in node]

    for node in nodes:
        if node["type"] == "string" and "enum" not in node:
            assert "maxLength" in node, node
        if node["type"] == "array":
            assert "maxItems" in node, node
        if node["type"] == "object":
            assert node["additionalProperties"] is False, node


def test_importing_the_schemas_does_not_import_torch() -> None:
    probe = "import sys, fhir_mappings.model_outputs; print('torch' in sys.modules)"

    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)

    assert completed.stdout.strip() == "False"


def test_capped_strings_name_free_text_at_its_limit_but_never_ids_or_codes() -> None:
    review = {
        "concerns": [
            {**REVIEW["concerns"][0], "issue": "x" * 200},
            {**REVIEW["concerns"][0], "order_id": "MedicationRequest/" + "9" * 46},
        ],
        "evidence_ids": ["Observation/" + "9" * 52],
    }
    summary = {**SUMMARY, "summary": "s" * 400, "follow_up": ["ok", "f" * 100]}

    assert capped_strings(OrderReviewOutput, OrderReviewOutput.model_validate(review)) == ["concerns.0.issue"]
    assert capped_strings(PatientSummaryOutput, PatientSummaryOutput.model_validate(summary)) == [
        "summary",
        "follow_up.1",
    ]
    assert capped_strings(ImagingReadOutput, ImagingReadOutput.model_validate(READ)) == []
