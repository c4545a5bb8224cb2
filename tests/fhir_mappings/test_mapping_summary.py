"""Patient summary card and the record readers under it, on the shipped Synthea charts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cds_service.wire import Card
from fhir_mappings.markdown import markdown_list
from fhir_mappings.record import active_allergies
from fhir_mappings.record import active_conditions
from fhir_mappings.record import active_medication_requests
from fhir_mappings.record import bundle_resources
from fhir_mappings.record import concept_text
from fhir_mappings.summary import summary_cards


def _status(data: dict[str, Any], key: str) -> str | None:
    codings = data.get(key, {}).get("coding", [])
    return codings[0]["code"] if codings else None


def test_kermit_summary_counts_match_the_record(kermit: Any) -> None:
    # The expected counts are read from the raw JSON, independently of the readers under test.
    active_problems = {
        c["code"]["text"] for c in kermit.raw("Condition") if _status(c, "clinicalStatus") == "active"
    }
    active_meds = {
        m["medicationCodeableConcept"]["text"]
        for m in kermit.raw("MedicationRequest")
        if m["status"] == "active"
    }
    allergies = [a for a in kermit.raw("AllergyIntolerance") if _status(a, "clinicalStatus") == "active"]
    assert (len(active_problems), len(active_meds), len(allergies)) == (1, 3, 3)

    cards = summary_cards(
        kermit.patient(),
        kermit.search("Condition"),
        kermit.search("MedicationRequest"),
        kermit.search("AllergyIntolerance"),
    )

    assert len(cards) == 1
    body = cards[0].wire()
    assert body["summary"] == "1 active problem, 3 active medications, 3 allergies"
    assert body["indicator"] == "info"
    assert body["source"] == {"label": "MedGemma CDS rules"}
    assert "suggestions" not in body and "selectionBehavior" not in body
    for text in active_problems | active_meds:
        assert f"- {text}\n" in body["detail"] + "\n"
    assert "- Allergy to peanuts (low criticality)" in body["detail"]
    assert "- Shellfish allergy (low criticality)" in body["detail"]
    assert "- Allergy to bee venom (low criticality)" in body["detail"]
    # Resolved problems of the chart stay out.
    resolved = {c["code"]["text"] for c in kermit.raw("Condition")} - active_problems
    assert resolved and not any(text in body["detail"] for text in resolved)
    Card.model_validate(body)


def test_summary_names_no_patient(kermit: Any) -> None:
    patient = kermit.raw("Patient")[0]
    cards = summary_cards(
        kermit.patient(),
        kermit.search("Condition"),
        kermit.search("MedicationRequest"),
        kermit.search("AllergyIntolerance"),
    )
    text = str(cards[0].wire())
    assert patient["name"][0]["family"] not in text
    assert patient["name"][0]["given"][0] not in text
    assert patient["birthDate"] not in text


def test_empty_record_gives_zero_counts_and_none_lists(kermit: Any, bundle_of: Callable[..., Any]) -> None:
    empty = bundle_of([])
    cards = summary_cards(kermit.patient(), empty, empty, empty)

    assert len(cards) == 1
    body = cards[0].wire()
    assert body["summary"] == "0 active problems, 0 active medications, 0 allergies"
    assert body["detail"].count("_none_") == 3


def test_missing_searches_count_as_empty(kermit: Any) -> None:
    # A prefetch key the EHR sent as null reaches the mapping as None.
    cards = summary_cards(kermit.patient(), None, None, None)
    assert cards[0].summary == "0 active problems, 0 active medications, 0 allergies"


def test_no_patient_no_card(kermit: Any) -> None:
    assert (
        summary_cards(
            None,
            kermit.search("Condition"),
            kermit.search("MedicationRequest"),
            kermit.search("AllergyIntolerance"),
        )
        == []
    )


def test_refuted_and_resolved_allergies_are_not_counted(
    fhir: Callable[..., Any], bundle_of: Callable[..., Any], kermit: Any
) -> None:
    def allergy(allergy_id: str, clinical: str | None, verification: str) -> dict[str, Any]:
        data: dict[str, Any] = {
            "resourceType": "AllergyIntolerance",
            "id": allergy_id,
            "patient": {"reference": "Patient/p1"},
            "code": {"text": f"Allergy {allergy_id}"},
            "verificationStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                        "code": verification,
                    }
                ]
            },
        }
        if clinical:
            data["clinicalStatus"] = {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                        "code": clinical,
                    }
                ]
            }
        return data

    allergies = bundle_of(
        [
            allergy("kept", "active", "confirmed"),
            allergy("no-status", None, "unconfirmed"),
            allergy("refuted", "active", "refuted"),
            allergy("in-error", "active", "entered-in-error"),
            allergy("resolved", "resolved", "confirmed"),
            allergy("inactive", "inactive", "confirmed"),
        ]
    )

    assert [a.id for a in active_allergies(allergies)] == ["kept", "no-status"]
    card = summary_cards(kermit.patient(), None, None, allergies)[0]
    assert card.summary.endswith("2 allergies")
    assert "Allergy refuted" not in (card.detail or "")


def test_readers_pick_types_and_statuses(kermit: Any) -> None:
    everything = kermit.search("Condition")
    assert len(bundle_resources(everything, "Condition")) == len(kermit.raw("Condition"))
    assert bundle_resources(everything, "Observation") == []
    assert bundle_resources(None, "Condition") == []
    # A single resource (a read rather than a search) is its own list.
    assert bundle_resources(kermit.patient(), "Patient")[0].id == kermit.raw("Patient")[0]["id"]
    assert bundle_resources(kermit.patient(), "Condition") == []

    assert [concept_text(c.code) for c in active_conditions(everything)] == ["Hypertension"]
    assert len(active_medication_requests(kermit.search("MedicationRequest"))) == 3
    assert markdown_list([]) == "_none_"
    assert markdown_list(["a", "b"]) == "- a\n- b"
