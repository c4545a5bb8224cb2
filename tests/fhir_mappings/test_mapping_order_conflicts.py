"""Rule cards for draft medication orders: allergy conflicts, cross-reactivity, duplicates, "not checked"."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from cds_service.wire import Card
from fhir_mappings.order_conflicts import medication_orders
from fhir_mappings.order_conflicts import order_check_cards

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"


def order(order_id: str, text: str, code: str | None = None, status: str = "draft") -> dict[str, Any]:
    """A MedicationRequest as an EHR puts it in draftOrders (RxNorm-coded when ``code`` is given)."""
    concept: dict[str, Any] = {"text": text}
    if code:
        concept["coding"] = [{"system": RXNORM, "code": code, "display": text}]
    return {
        "resourceType": "MedicationRequest",
        "id": order_id,
        "status": status,
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": concept,
    }


def allergy(
    allergy_id: str,
    code: dict[str, Any],
    *,
    criticality: str | None = "low",
    clinical: str = "active",
    verification: str = "confirmed",
) -> dict[str, Any]:
    """An AllergyIntolerance with the given substance concept and statuses."""
    data: dict[str, Any] = {
        "resourceType": "AllergyIntolerance",
        "id": allergy_id,
        "patient": {"reference": "Patient/p1"},
        "code": code,
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                    "code": clinical,
                }
            ]
        },
        "verificationStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                    "code": verification,
                }
            ]
        },
    }
    if criticality:
        data["criticality"] = criticality
    return data


PENICILLIN_ALLERGY = allergy(
    "pen",
    {"coding": [{"system": SNOMED, "code": "91936005", "display": "Allergy to penicillin"}]},
    criticality="high",
)


def checks(drafts: Any, selections: list[str] | None, allergies: Any, medications: Any) -> list[Card]:
    """The rule cards when both lists were read (``None``: the EHR sent null, no data)."""
    return order_check_cards(drafts, selections, allergies, medications, {})


def _assert_rule_card(card: Card, order_ref: str) -> dict[str, Any]:
    """Check what every rule card must carry; return its wire JSON."""
    body = card.wire()
    Card.model_validate(body)
    assert len(body["summary"]) < 140
    assert body["source"]["label"] == "MedGemma CDS rules"
    assert body["selectionBehavior"] == "at-most-one"
    assert len(body["suggestions"]) == 1
    suggestion = body["suggestions"][0]
    assert suggestion["isRecommended"] is True
    assert suggestion["actions"] == [
        {"type": "delete", "description": "Remove the draft order", "resourceId": order_ref}
    ]
    assert body["overrideReasons"]
    for reason in body["overrideReasons"]:
        assert reason["code"] and reason["system"] and reason["display"]
    return body


def test_allergy_conflict_by_rxnorm_code(bundle_of: Callable[..., Any]) -> None:
    # The allergy names the substance by code only, so only the code can match.
    coded = allergy("rx", {"coding": [{"system": RXNORM, "code": "1049630"}]})
    drafts = bundle_of([order("d1", "Diphenhydramine Hydrochloride 25 MG Oral Tablet", "1049630")])

    cards = checks(drafts, ["MedicationRequest/d1"], bundle_of([coded]), None)

    assert len(cards) == 1
    body = _assert_rule_card(cards[0], "MedicationRequest/d1")
    assert body["summary"].startswith("Allergy conflict: Diphenhydramine Hydrochloride 25 MG Oral Tablet")
    assert body["indicator"] == "warning"
    assert "criticality: low" in body["detail"]
    assert {r["code"] for r in body["overrideReasons"]} == {
        "tolerated-before",
        "benefit-outweighs-risk",
        "allergy-recorded-in-error",
    }


def test_allergy_conflict_by_substance_name(bundle_of: Callable[..., Any]) -> None:
    by_name = allergy(
        "ibu", {"coding": [{"system": SNOMED, "code": "293619005", "display": "Allergy to ibuprofen"}]}
    )
    drafts = bundle_of([order("d2", "Ibuprofen 400 MG Oral Tablet", "197806")])

    cards = checks(drafts, ["MedicationRequest/d2"], bundle_of([by_name]), None)

    assert [c.summary for c in cards] == [
        "Allergy conflict: Ibuprofen 400 MG Oral Tablet vs recorded allergy to Allergy to ibuprofen"
    ]
    _assert_rule_card(cards[0], "MedicationRequest/d2")


def test_penicillin_allergy_flags_amoxicillin_by_class(bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of([order("amox", "Amoxicillin 500 MG Oral Capsule", "308191")])

    cards = checks(drafts, ["MedicationRequest/amox"], bundle_of([PENICILLIN_ALLERGY]), None)

    assert len(cards) == 1
    body = _assert_rule_card(cards[0], "MedicationRequest/amox")
    # A high-criticality allergy makes the card critical (AllergyIntolerance.criticality).
    assert body["indicator"] == "critical"
    assert "Allergy to penicillin" in body["summary"]
    assert "criticality: high" in body["detail"]


def test_cephalosporin_after_penicillin_allergy_is_a_cross_reactivity_warning(
    bundle_of: Callable[..., Any],
) -> None:
    drafts = bundle_of([order("cef", "Cefalexin 500 MG Oral Capsule", "309114")])

    (card,) = checks(drafts, ["MedicationRequest/cef"], bundle_of([PENICILLIN_ALLERGY]), None)

    body = _assert_rule_card(card, "MedicationRequest/cef")
    # Cross-reactivity is a warning to check the history, never critical, even for a high-criticality allergy.
    assert body["indicator"] == "warning"
    assert body["summary"].startswith("Possible cross-reactivity: Cefalexin")
    assert body["source"]["topic"]["code"] == "cross-reactivity"


def test_duplicate_therapy_by_code_on_kermits_chart(kermit: Any, bundle_of: Callable[..., Any]) -> None:
    # Same RxNorm code as Kermit's active hydrochlorothiazide, but a name sharing no word with it.
    drafts = bundle_of([order("hctz", "HCTZ 25mg tab", "316049")])

    cards = checks(
        drafts,
        ["MedicationRequest/hctz"],
        kermit.search("AllergyIntolerance"),
        kermit.search("MedicationRequest"),
    )

    assert len(cards) == 1
    body = _assert_rule_card(cards[0], "MedicationRequest/hctz")
    assert body["summary"] == "Duplicate therapy: HCTZ 25mg tab duplicates active Hydrochlorothiazide 25 MG"
    assert body["indicator"] == "warning"
    assert {r["code"] for r in body["overrideReasons"]} == {"intended-combination", "replacing-existing"}


def test_duplicate_therapy_by_ingredient_word_on_kermits_chart(
    kermit: Any, bundle_of: Callable[..., Any]
) -> None:
    # Another loratadine product: other code, other form; the ingredient word matches.
    drafts = bundle_of([order("lor", "Loratadine 10 MG Oral Tablet", "311372")])

    cards = checks(
        drafts,
        ["MedicationRequest/lor"],
        kermit.search("AllergyIntolerance"),
        kermit.search("MedicationRequest"),
    )

    assert [c.summary for c in cards] == [
        "Duplicate therapy: Loratadine 10 MG Oral Tablet duplicates active Loratadine 5 MG Chewable Tablet"
    ]
    _assert_rule_card(cards[0], "MedicationRequest/lor")


def test_clean_order_on_kermits_chart_gives_no_card(kermit: Any, bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of([order("amox", "Amoxicillin 500 MG Oral Capsule", "308191")])
    cards = checks(
        drafts,
        ["MedicationRequest/amox"],
        kermit.search("AllergyIntolerance"),
        kermit.search("MedicationRequest"),
    )
    assert cards == []


def test_only_selected_orders_are_checked(bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of(
        [
            order("amox", "Amoxicillin 500 MG Oral Capsule", "308191"),
            order("ampi", "Ampicillin 500 MG Oral Capsule", "789980"),
            order("para", "Acetaminophen 500 MG Oral Tablet", "198440"),
        ]
    )
    allergies = bundle_of([PENICILLIN_ALLERGY])

    cards = checks(drafts, ["MedicationRequest/para", "MedicationRequest/ampi"], allergies, None)

    assert len(cards) == 1
    _assert_rule_card(cards[0], "MedicationRequest/ampi")
    assert checks(drafts, ["MedicationRequest/para"], allergies, None) == []
    # A selection naming another resource type is not ours to check; one missing from draftOrders is said.
    assert checks(drafts, ["ServiceRequest/amox"], allergies, None) == []
    (missing,) = checks(drafts, ["MedicationRequest/gone"], allergies, None)
    assert missing.summary.startswith("Not checked: MedicationRequest/gone")


def test_selected_medication_orders_keeps_bundle_order(bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of([order("a", "A drug"), order("b", "B drug"), order("c", "C drug")])
    picked, missing = medication_orders(drafts, ["MedicationRequest/c", "MedicationRequest/a"])
    assert [o.id for o in picked] == ["a", "c"] and missing == []
    everything, _ = medication_orders(drafts, None)
    assert [o.id for o in everything] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("clinical", "verification"),
    [
        ("active", "refuted"),
        ("active", "entered-in-error"),
        ("inactive", "confirmed"),
        ("resolved", "confirmed"),
    ],
)
def test_refuted_or_inactive_allergy_is_ignored(
    bundle_of: Callable[..., Any], clinical: str, verification: str
) -> None:
    stale = allergy(
        "pen", PENICILLIN_ALLERGY["code"], clinical=clinical, verification=verification, criticality="high"
    )
    drafts = bundle_of([order("amox", "Amoxicillin 500 MG Oral Capsule", "308191")])
    assert checks(drafts, ["MedicationRequest/amox"], bundle_of([stale]), None) == []


def test_stopped_medication_is_no_duplicate(bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of([order("lor", "Loratadine 10 MG Oral Tablet", "311372")])
    stopped = bundle_of([order("old", "Loratadine 10 MG Oral Tablet", "311372", status="stopped")])
    assert checks(drafts, ["MedicationRequest/lor"], None, stopped) == []


def test_allergy_and_duplicate_on_one_order_give_two_cards(bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of([order("amox", "Amoxicillin 500 MG Oral Capsule", "308191")])
    active = bundle_of([order("amox-old", "Amoxicillin 250 MG Oral Capsule", "308182", status="active")])

    cards = checks(drafts, ["MedicationRequest/amox"], bundle_of([PENICILLIN_ALLERGY]), active)

    assert [c.summary.split(":")[0] for c in cards] == ["Allergy conflict", "Duplicate therapy"]
    for card in cards:
        _assert_rule_card(card, "MedicationRequest/amox")


def test_shared_salt_is_not_duplicate_therapy(bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of([order("dph", "Diphenhydramine Hydrochloride 25 MG Oral Tablet", "1049630")])
    active = bundle_of(
        [
            order(
                "met", "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet", "860975", "active"
            )
        ]
    )
    assert checks(drafts, ["MedicationRequest/dph"], None, active) == []


# --- Fail-safe: what can't be read is said, never silently passed --------------------------------------


def _topics(cards: list[Card]) -> list[str]:
    return [c.source.topic.code for c in cards if c.source.topic is not None]


def test_order_with_no_medication_yet_is_an_info_card_not_silence(bundle_of: Callable[..., Any]) -> None:
    # What Rx View sends as it opens: a draft with no medication chosen.
    empty = {"resourceType": "MedicationRequest", "id": "new", "status": "draft"}
    (card,) = checks(bundle_of([empty]), ["MedicationRequest/new"], bundle_of([PENICILLIN_ALLERGY]), None)
    assert card.indicator == "info"
    assert _topics([card]) == ["not-checked"]
    assert "names no medication" in card.detail


@pytest.mark.parametrize(
    ("medication", "why"),
    [
        ({"medicationCodeableConcept": {}}, "no text and no code"),
        ({"medicationCodeableConcept": {"coding": [{"system": "urn:local", "code": "X1"}]}}, "no text"),
        ({"medicationReference": {"reference": "Medication/elsewhere"}}, "could not be resolved"),
    ],
)
def test_unreadable_medication_is_a_warning_naming_why(
    bundle_of: Callable[..., Any], medication: dict[str, Any], why: str
) -> None:
    draft = {"resourceType": "MedicationRequest", "id": "d1", "status": "draft"} | medication
    (card,) = checks(bundle_of([draft]), ["MedicationRequest/d1"], bundle_of([PENICILLIN_ALLERGY]), None)
    assert card.indicator == "warning"
    assert _topics([card]) == ["not-checked"]
    assert why in card.detail


def test_medication_reference_to_contained_medication_is_checked(bundle_of: Callable[..., Any]) -> None:
    draft = {
        "resourceType": "MedicationRequest",
        "id": "d1",
        "status": "draft",
        "contained": [
            {
                "resourceType": "Medication",
                "id": "med",
                "code": {"text": "Augmentin 875 mg"},
                "ingredient": [{"itemCodeableConcept": {"coding": [{"system": RXNORM, "code": "723"}]}}],
            }
        ],
        "medicationReference": {"reference": "#med"},
    }
    (card,) = checks(bundle_of([draft]), ["MedicationRequest/d1"], bundle_of([PENICILLIN_ALLERGY]), None)
    assert card.indicator == "critical"
    assert card.summary.startswith("Allergy conflict: Augmentin 875 mg")


def test_medication_reference_to_a_draft_orders_entry_is_checked(bundle_of: Callable[..., Any]) -> None:
    draft = {
        "resourceType": "MedicationRequest",
        "id": "d1",
        "status": "draft",
        "medicationReference": {"reference": "urn:uuid:7f1c"},
    }
    medication = {"resourceType": "Medication", "id": "m1", "code": {"text": "Amoxicillin 500 mg capsule"}}
    drafts = read_bundle([(None, draft), ("urn:uuid:7f1c", medication)])
    (card,) = checks(drafts, ["MedicationRequest/d1"], bundle_of([PENICILLIN_ALLERGY]), None)
    assert _topics([card]) == ["allergy-conflict"]


def read_bundle(entries: list[tuple[str | None, dict[str, Any]]]) -> Any:
    from fhir_mappings.read_models import read_resource

    return read_resource(
        {
            "resourceType": "Bundle",
            "entry": [{"resource": r} | ({"fullUrl": url} if url else {}) for url, r in entries],
        }
    )


def test_allergy_with_no_substance_is_said(bundle_of: Callable[..., Any]) -> None:
    nameless = allergy("blank", {})
    drafts = bundle_of([order("amox", "Amoxicillin 500 MG Oral Capsule", "308191")])
    (card,) = checks(drafts, ["MedicationRequest/amox"], bundle_of([nameless]), None)
    assert _topics([card]) == ["not-checked"]
    assert "AllergyIntolerance/blank" in card.summary
    assert "names no substance" in card.detail


def test_allergy_named_in_its_reaction_substance_only_is_checked(bundle_of: Callable[..., Any]) -> None:
    by_reaction = allergy("r", {}) | {"reaction": [{"substance": {"text": "Penicillin V"}}]}
    drafts = bundle_of([order("amox", "Amoxicillin 500 MG Oral Capsule", "308191")])
    (card,) = checks(drafts, ["MedicationRequest/amox"], bundle_of([by_reaction]), None)
    assert _topics([card]) == ["allergy-conflict"]


def test_allergy_with_a_local_status_coding_first_still_counts(bundle_of: Callable[..., Any]) -> None:
    local_first = PENICILLIN_ALLERGY | {
        "clinicalStatus": {
            "coding": [
                {"system": "urn:oid:1.2.840.114350", "code": "1"},
                {
                    "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                    "code": "active",
                },
            ]
        }
    }
    drafts = bundle_of([order("amox", "Amoxicillin 500 MG Oral Capsule", "308191")])
    assert _topics(checks(drafts, ["MedicationRequest/amox"], bundle_of([local_first]), None)) == [
        "allergy-conflict"
    ]


def test_lists_that_could_not_be_read_are_named_with_the_reason(bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of([order("amox", "Amoxicillin 500 MG Oral Capsule", "308191")])
    unavailable = {"allergies": "FHIR server answered 503", "medications": "not prefetched"}

    cards = order_check_cards(drafts, ["MedicationRequest/amox"], None, None, unavailable)

    assert _topics(cards) == ["not-checked", "not-checked"]
    assert [c.summary for c in cards] == [
        "Not checked: Amoxicillin 500 MG Oral Capsule against allergies",
        "Not checked: Amoxicillin 500 MG Oral Capsule against active medications",
    ]
    assert "FHIR server answered 503" in cards[0].detail


def test_order_sign_checks_every_medication_order(bundle_of: Callable[..., Any]) -> None:
    drafts = bundle_of(
        [
            order("para", "Acetaminophen 500 MG Oral Tablet", "198440"),
            order("amox", "Amoxicillin 500 MG Oral Capsule", "308191"),
        ]
    )
    (card,) = checks(drafts, None, bundle_of([PENICILLIN_ALLERGY]), None)
    _assert_rule_card(card, "MedicationRequest/amox")


def test_record_text_in_cards_stays_text(bundle_of: Callable[..., Any]) -> None:
    hostile = "Amoxicillin [update your password](http://evil.test) <img src=x>"
    drafts = bundle_of([order("amox", hostile, "308191")])
    (card,) = checks(drafts, ["MedicationRequest/amox"], bundle_of([PENICILLIN_ALLERGY]), None)
    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark", {"html": True}).render(card.detail)
    assert "<a " not in html and "<img" not in html
    assert "[update your password](http" in html
