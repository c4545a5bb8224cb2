"""Tolerant read models: what strict R4 rejects is read as meant, and counted; nothing else is invented."""

from __future__ import annotations

from collections import Counter

import pytest

from fhir_mappings.read_models import AllergyIntolerance
from fhir_mappings.read_models import Bundle
from fhir_mappings.read_models import MedicationRequest
from fhir_mappings.read_models import Patient
from fhir_mappings.read_models import Resource
from fhir_mappings.read_models import read_resource
from fhir_mappings.record import as_instant
from fhir_mappings.record_context import patient_line


def test_what_the_cds_hooks_sandbox_sends_as_draft_orders_is_read() -> None:
    # No Bundle.type, no intent, category as one object (sandbox Rx View, see cds-hooks-notes.md).
    tolerated: Counter[str] = Counter()
    bundle = read_resource(
        {
            "resourceType": "Bundle",
            "entry": [
                {
                    "resource": {
                        "resourceType": "MedicationRequest",
                        "id": "request-123",
                        "status": "draft",
                        "category": {"coding": [{"code": "outpatient"}]},
                        "medicationCodeableConcept": {
                            "coding": {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": 723},
                            "text": "Amoxicillin",
                        },
                        "dosageInstruction": {"text": "500 mg three times daily"},
                    }
                }
            ],
        },
        tolerated,
    )
    assert isinstance(bundle, Bundle) and bundle.type is None
    (order,) = [e.resource for e in bundle.entry]
    assert isinstance(order, MedicationRequest) and order.intent is None
    assert order.medicationCodeableConcept.coding[0].code == "723"
    assert order.dosageInstruction[0].text == "500 mg three times daily"
    assert tolerated == {"single-value-as-list": 2, "number-as-string": 1}


def test_a_list_where_one_value_belongs_gives_its_first_item() -> None:
    tolerated: Counter[str] = Counter()
    allergy = read_resource(
        {"resourceType": "AllergyIntolerance", "code": [{"text": "Penicillin"}, {"text": "other"}]}, tolerated
    )
    assert isinstance(allergy, AllergyIntolerance) and allergy.code.text == "Penicillin"
    assert tolerated == {"list-as-single-value": 1}


def test_unreadable_elements_are_dropped_not_fatal_and_unknown_ones_ignored() -> None:
    tolerated: Counter[str] = Counter()
    allergy = read_resource(
        {
            "resourceType": "AllergyIntolerance",
            "id": "a1",
            "criticality": {"oops": True},
            "code": "Penicillin",
            "reaction": [{"substance": {"text": "Penicillin V"}}, 42],
            "extension": [{"url": "urn:x", "valueString": "ignored"}],
            "someVendorElement": {"deep": [1, 2]},
        },
        tolerated,
    )
    assert allergy.criticality is None and allergy.code is None
    assert [r.substance.text for r in allergy.reaction] == ["Penicillin V"]
    assert tolerated["invalid-element-dropped"] == 3


def test_resources_of_types_not_read_are_kept_by_type_and_id() -> None:
    tolerated: Counter[str] = Counter()
    encounter = read_resource({"resourceType": "Encounter", "id": "e", "class": {"code": "AMB"}}, tolerated)
    assert type(encounter) is Resource and encounter.get_resource_type() == "Encounter"
    assert tolerated == {"unknown-resource-type": 1}


@pytest.mark.parametrize(
    "data", [None, [], "Patient", {"id": "x"}, {"resourceType": 7}, {"resourceType": "Pat ient"}]
)
def test_only_what_is_not_a_resource_at_all_is_refused(data: object) -> None:
    with pytest.raises(ValueError, match="not a FHIR resource"):
        read_resource(data)


@pytest.mark.parametrize(
    ("birth_date", "line"),
    [
        ("1970", "Patient: female, about 56 years old"),
        ("1970-06", "Patient: female, about 56 years old"),
        ("1970-12-24", "Patient: female, 55 years old"),
        ("not a date", "Patient: female"),
    ],
)
def test_partial_birth_dates_give_an_age_not_a_crash(birth_date: str, line: str) -> None:
    from datetime import date

    patient = read_resource({"resourceType": "Patient", "gender": "female", "birthDate": birth_date})
    assert isinstance(patient, Patient)
    assert patient_line(patient, date(2026, 12, 2)) == line


def test_partial_and_zoneless_date_times_are_instants() -> None:
    assert as_instant("2024").isoformat() == "2024-01-01T00:00:00+00:00"
    assert as_instant("2024-03").isoformat() == "2024-03-01T00:00:00+00:00"
    assert as_instant("2024-03-05T10:00:00").isoformat() == "2024-03-05T10:00:00+00:00"
    assert as_instant("yesterday") is None
