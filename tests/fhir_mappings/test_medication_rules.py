"""The medication rule data and the patient facts the rules read: names, classes, labs, dose, tiers."""

from __future__ import annotations

import json
from datetime import date
from datetime import timedelta
from typing import Any

import pytest

from fhir_mappings.drugs import DATA
from fhir_mappings.drugs import DrugConcept
from fhir_mappings.drugs import _lexicon
from fhir_mappings.drugs import allergy_conflict
from fhir_mappings.drugs import identify
from fhir_mappings.interactions import find_interaction
from fhir_mappings.labs import ckd_epi_2021
from fhir_mappings.labs import patient_facts
from fhir_mappings.order_conflicts import allergy_indicator
from fhir_mappings.patient_rules import dose_amount
from fhir_mappings.read_models import read_resource

TODAY = date(2026, 6, 1)


def named(data: Any) -> tuple[set[str], set[str]]:
    """Every ingredient and class a rule file names."""
    ingredients: set[str] = set()
    classes: set[str] = set()
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ingredients.update(
                node.get("ingredients", []) if isinstance(node.get("ingredients"), list) else []
            )
            classes.update(node.get("classes", []) if isinstance(node.get("classes"), list) else [])
            stack += [v for k, v in node.items() if k not in ("ingredients", "classes")]
        elif isinstance(node, list):
            stack += node
    return ingredients, classes


@pytest.mark.parametrize("name", ["interactions.json", "patient_rules.json"])
def test_every_ingredient_and_class_a_rule_names_is_known(name: str) -> None:
    data = json.loads((DATA / name).read_text(encoding="utf-8"))
    ingredients, classes = named(data)
    if name == "patient_rules.json":
        ingredients |= set(data["dose"])
    unknown = sorted(i for i in ingredients if identify(DrugConcept(texts=(i,))).ingredients != {i})
    assert unknown == []
    assert sorted(classes - set(_lexicon().labels)) == []


def test_every_interaction_rule_names_known_groups_a_severity_and_a_source() -> None:
    data = json.loads((DATA / "interactions.json").read_text(encoding="utf-8"))
    for rule in data["rules"]:
        assert set(rule["a"].get("groups", [])) | set(rule["b"].get("groups", [])) <= set(data["groups"])
        assert rule["severity"] in ("info", "warning", "critical")
        assert rule["mechanism"] and rule["management"] and rule["source"]


def concept(text: str) -> DrugConcept:
    return DrugConcept(texts=(text,))


@pytest.mark.parametrize(
    ("ordered", "other", "severity"),
    [
        ("Clarithromycin 500 mg", "Simvastatin 40 mg", "critical"),
        ("Sertraline 50 mg", "Phenelzine 15 mg", "critical"),
        ("Tizanidine 4 mg", "Cipro 500 mg", "critical"),
        ("Eliquis 5 mg", "Naproxen 500 mg", "warning"),
        ("Oxycodone 5 mg", "Lorazepam 1 mg", "warning"),
        ("Levofloxacin 500 mg", "Calcium carbonate 500 mg", "info"),
        ("Pravastatin 40 mg", "Clarithromycin 500 mg", None),
        ("Clopidogrel 75 mg", "Pantoprazole 40 mg", None),
        ("Timolol 0.5% eye drops", "Verapamil 80 mg", None),
        ("Azithromycin 250 mg", "Simvastatin 40 mg", None),
    ],
)
def test_interactions_by_ingredient_class_and_route(ordered: str, other: str, severity: str | None) -> None:
    found = find_interaction(identify(concept(ordered)), identify(concept(other)))
    assert (found.rule.severity if found else None) == severity
    backwards = find_interaction(identify(concept(other)), identify(concept(ordered)))
    assert (backwards.rule.severity if backwards else None) == severity


def test_ckd_epi_2021_matches_the_published_equation() -> None:
    assert round(ckd_epi_2021(1.0, 50, "male")) == 92
    assert round(ckd_epi_2021(0.7, 50, "female")) == 105
    assert round(ckd_epi_2021(2.0, 70, "female")) == 26


def observation(code: str, value: Any, days_ago: int, unit: str = "") -> dict[str, Any]:
    data: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "effectiveDateTime": (TODAY - timedelta(days=days_ago)).isoformat(),
    }
    if isinstance(value, str):
        data["valueCodeableConcept"] = {"text": value}
    else:
        data["valueQuantity"] = {"value": value, "unit": unit}
    return data


def facts(*observations: dict[str, Any], gender: str = "female", born: str = "1950-01-15", conditions=()):
    patient = read_resource({"resourceType": "Patient", "gender": gender, "birthDate": born})
    labs = read_resource({"resourceType": "Bundle", "entry": [{"resource": o} for o in observations]})
    problems = read_resource(
        {
            "resourceType": "Bundle",
            "entry": [
                {"resource": {"resourceType": "Condition", "clinicalStatus": {"text": "active"}, "code": c}}
                for c in conditions
            ],
        }
    )
    return patient_facts(patient, problems, [labs], TODAY)


def test_latest_lab_wins_and_one_older_than_a_year_is_not_used() -> None:
    known = facts(
        observation("98979-8", 25, 400), observation("98979-8", 55, 30), observation("2823-3", 6.1, 366)
    )
    assert known.egfr is not None and known.egfr.value == 55
    assert known.potassium is None
    assert facts(observation("98979-8", 25, 400)).egfr is None


def test_egfr_is_computed_from_creatinine_with_age_and_sex_when_newer() -> None:
    known = facts(observation("98979-8", 80, 200), observation("14682-9", 176.8, 5, "umol/L"))
    assert known.age == 76
    assert known.egfr is not None and known.egfr.value == round(ckd_epi_2021(176.8 / 88.42, 76, "female"))
    assert "CKD-EPI 2021" in known.egfr.label
    assert facts(observation("2160-0", 2.0, 5), born="1950").egfr is None  # no age: not guessed


def test_pregnancy_from_condition_or_latest_test_never_for_men_or_family_history() -> None:
    assert facts(observation("2106-3", "Positive", 10)).pregnancy
    assert (
        facts(observation("2106-3", "Positive", 60), observation("2106-3", "negative", 2)).pregnancy is None
    )
    assert facts(observation("2106-3", "Positive", 400)).pregnancy is None
    assert facts(observation("2106-3", "Positive", 10), gender="male").pregnancy is None
    assert facts(
        conditions=[{"coding": [{"system": "http://snomed.info/sct", "code": "77386006"}]}]
    ).pregnancy


def test_dose_from_quantity_and_timing_or_product_strength() -> None:
    order = read_resource(
        {
            "resourceType": "MedicationRequest",
            "dosageInstruction": [
                {
                    "doseAndRate": [{"doseQuantity": {"value": 2, "unit": "tablet"}}],
                    "timing": {"code": {"coding": [{"code": "QID"}]}},
                },
            ],
        }
    )
    dose = dose_amount(order.dosageInstruction, ["Acetaminophen 500 MG Oral Tablet"])
    assert (dose.single, dose.daily) == (1000, 4000)
    weekly = read_resource(
        {
            "resourceType": "MedicationRequest",
            "dosageInstruction": [
                {
                    "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "g"}}],
                    "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "wk"}},
                }
            ],
        }
    )
    dose = dose_amount(weekly.dosageInstruction, [])
    assert dose.single == 1000 and dose.period_days == 7 and round(dose.daily or 0, 1) == 142.9


@pytest.mark.parametrize(
    ("allergy", "ordered", "indicator"),
    [
        (
            {"criticality": "low", "reaction": [{"manifestation": [{"text": "rash"}], "severity": "mild"}]},
            "Cefazolin",
            "info",
        ),
        ({"reaction": [{"manifestation": [{"text": "Anaphylaxis"}]}]}, "Cefazolin", "warning"),
        ({"criticality": "low"}, "Cephalexin", "warning"),  # shared aminobenzyl side chain with amoxicillin
        ({"reaction": [{"manifestation": [{"text": "Anaphylaxis"}]}]}, "Amoxicillin", "critical"),
        (
            {"type": "intolerance", "reaction": [{"manifestation": [{"text": "nausea"}]}]},
            "Amoxicillin",
            "warning",
        ),
        (
            {"type": "intolerance", "reaction": [{"manifestation": [{"text": "nausea"}]}]},
            "Penicillin V",
            None,
        ),
    ],
)
def test_allergy_severity_follows_the_practice_parameter(
    allergy: dict[str, Any], ordered: str, indicator
) -> None:
    record = read_resource({"resourceType": "AllergyIntolerance", "code": {"text": "Amoxicillin"}} | allergy)
    match = allergy_conflict(concept(ordered), concept("Amoxicillin"))
    assert match is not None
    assert allergy_indicator(record, match) == indicator


def test_ace_inhibitor_reaction_on_an_arb_warns_only_after_angioedema() -> None:
    match = allergy_conflict(concept("Losartan 50 mg"), concept("Lisinopril"))
    assert match is not None and match.kind == "cross-reactivity"

    def record(manifestation: str, **extra: Any) -> Any:
        reaction = [{"manifestation": [{"text": manifestation}]}]
        return read_resource({"resourceType": "AllergyIntolerance", "reaction": reaction} | extra)

    assert allergy_indicator(record("Angioedema"), match) == "warning"
    assert allergy_indicator(record("Cough"), match) is None
    assert allergy_indicator(record("Cough", type="intolerance"), match) is None


def test_ai_review_gets_the_rule_findings_and_the_labs_they_used() -> None:
    from fhir_mappings.order_ai import rule_findings_text
    from fhir_mappings.order_conflicts import order_check_cards

    drafts = read_resource(
        {
            "resourceType": "Bundle",
            "entry": [
                {
                    "resource": {
                        "resourceType": "MedicationRequest",
                        "id": "d1",
                        "medicationCodeableConcept": {"text": "Metformin 500 mg"},
                    }
                }
            ],
        }
    )
    known = facts(observation("98979-8", 22, 3))
    cards = order_check_cards(drafts, ["MedicationRequest/d1"], None, None, {}, known)
    text = rule_findings_text(cards, known)
    # Card summaries name drugs as the record wrote them: quoted, as all record text is for the model.
    assert '- critical: "Kidney function: Metformin 500 mg, eGFR 22 (below 30)"' in text
    assert f"eGFR 22 mL/min/1.73m2 on {(TODAY - timedelta(days=3)).isoformat()}" in text
    assert "age 76" in text


def test_the_rules_page_tables_match_the_data() -> None:
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(
        "medication_rules_table", root / "scripts" / "medication_rules_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (root / "docs" / "medication-rules.md").read_text(encoding="utf-8")
    assert module.BEGIN in page and module.END in page
    assert module.page_with_tables(page) == page, "stale: run scripts/medication_rules_table.py --write"


def test_acetaminophen_inside_a_combination_counts_towards_its_daily_limit() -> None:
    from fhir_mappings.patient_rules import patient_findings

    def findings(text: str, tablets: int, every_hours: int) -> list[str]:
        order = read_resource(
            {
                "resourceType": "MedicationRequest",
                "dosageInstruction": [
                    {
                        "doseAndRate": [{"doseQuantity": {"value": tablets, "unit": "tablet"}}],
                        "timing": {"repeat": {"frequency": 1, "period": every_hours, "periodUnit": "h"}},
                    }
                ],
            }
        )
        found = patient_findings(text, identify(concept(text)), facts(), order.dosageInstruction, [text])
        return [f"{f.topic}:{f.severity}" for f in found]

    assert findings("Hydrocodone-acetaminophen 5-500 mg tablet", 2, 4) == ["dose:warning"]
    assert findings("Percocet 5/325 mg tablet", 1, 6) == []
    assert findings("Acetaminophen 500 mg tablet", 2, 3) == ["dose:critical"]


def dosages(dose: float, unit: str, timing: dict[str, Any]) -> list[Any]:
    order = {
        "resourceType": "MedicationRequest",
        "dosageInstruction": [
            {"doseAndRate": [{"doseQuantity": {"value": dose, "unit": unit}}], "timing": timing}
        ],
    }
    return read_resource(order).dosageInstruction


@pytest.mark.parametrize(
    ("timing", "daily", "period_days"),
    [
        ({"repeat": {"frequency": 1, "period": 48, "periodUnit": "h"}}, 375, 2),
        ({"repeat": {"frequency": 1, "period": 2, "periodUnit": "d"}}, 375, 2),
        ({"repeat": {"frequency": 2, "periodUnit": "d"}}, 1500, 1),  # no period: per one day
        ({"code": {"coding": [{"code": "Q48H"}]}}, 375, 2),
        ({"code": {"coding": [{"code": "QOD"}]}}, 375, 2),
        ({"code": {"coding": [{"code": "Q12H"}]}}, 1500, 1),
        ({"code": {"coding": [{"code": "WK"}]}}, 750 / 7, 7),
    ],
)
def test_daily_dose_over_periods_longer_than_a_day(timing: dict[str, Any], daily: float, period_days) -> None:
    dose = dose_amount(dosages(750, "mg", timing), ["Levofloxacin 750 MG Oral Tablet"])
    assert dose.single == 750
    assert dose.daily == pytest.approx(daily) and dose.period_days == period_days


def test_international_units_have_a_mass_only_for_vitamin_d_and_are_never_a_tablet_count() -> None:
    daily = {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}}
    vitamin_d = 0.000025  # mg per IU
    for unit in ("[iU]", "[IU]", "IU", "units", "UNT"):
        dose = dose_amount(
            dosages(50000, unit, daily), ["Ergocalciferol 50,000 unit capsule"], mg_per_unit=vitamin_d
        )
        assert dose.single == pytest.approx(1.25), unit
    # Without a mass per unit (heparin, insulin) units are unknown, not capsules of the text's strength.
    assert dose_amount(dosages(5000, "[iU]", daily), ["Heparin 5 mg capsule"]).single is None
    # A capsule counts by the strength its text names, thousands separators and RxNorm's "UNT" included.
    texts = ["Ergocalciferol 1.25 MG (50,000 UNT) Oral Capsule"]
    assert dose_amount(dosages(1, "capsule", daily), texts, mg_per_unit=vitamin_d).single == pytest.approx(
        1.25
    )


def test_a_dose_per_kg_counts_with_the_weight_and_never_as_a_count() -> None:
    daily = {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}}
    texts = ["Enoxaparin 40 mg syringe"]
    dose = dose_amount(dosages(1, "mg/kg", daily), texts, weight_kg=82)
    assert (dose.single, dose.daily, dose.daily_per_kg) == (82, 82, 1)
    unknown = dose_amount(dosages(1, "mg/kg", daily), texts)
    assert (unknown.single, unknown.daily, unknown.daily_per_kg) == (None, None, 1)
    twice = dose_amount(
        dosages(80, "mg", {"repeat": {"frequency": 2, "period": 1, "periodUnit": "d"}}), texts, weight_kg=80
    )
    assert twice.daily_per_kg == 2
