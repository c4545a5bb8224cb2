"""Medication rules that depend on the patient: kidney function, potassium, conditions, pregnancy, dose, age.

Each rule (``fhir_mappings/data/patient_rules.json``) names a drug set, the patient fact it needs, a severity,
what it means and its source. A rule whose fact the record does not hold stays quiet (nothing is guessed);
only drugs that act systemically are checked, except where a rule says any route counts (timolol eye drops
in asthma). Per order and kind, the most severe matching rule gives the finding.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fhir_mappings.drugs import DATA
from fhir_mappings.drugs import DrugIdentity
from fhir_mappings.drugs import normalise
from fhir_mappings.interactions import SEVERITY_RANK
from fhir_mappings.interactions import DrugSet
from fhir_mappings.interactions import Severity
from fhir_mappings.interactions import acts_systemically
from fhir_mappings.interactions import drug_set
from fhir_mappings.interactions import interaction_rules
from fhir_mappings.labs import PatientFacts
from fhir_mappings.labs import condition_matches

#: Topics (card kinds) of the findings, as cards carry them in Source.topic.
TOPICS = {
    "renal": "Kidney function",
    "potassium": "Potassium",
    "drug-condition": "Drug-condition",
    "pregnancy": "Pregnancy",
    "dose": "Dose limit",
    "age": "Older adults",
}
_MG_PER_UNIT = {
    "mg": 1.0,
    "milligram": 1.0,
    "g": 1000.0,
    "gm": 1000.0,
    "gram": 1000.0,
    "mcg": 0.001,
    "ug": 0.001,
    "microgram": 0.001,
    "meq": 1.0,
    "mmol": 1.0,
}
_DAYS_PER = {"s": 1 / 86400, "min": 1 / 1440, "h": 1 / 24, "d": 1.0, "wk": 7.0, "mo": 30.0, "a": 365.0}
# Timing.code (HL7 TimingAbbreviation): doses per day.
_PER_DAY = {"QD": 1, "AM": 1, "PM": 1, "BED": 1, "BID": 2, "TID": 3, "QID": 4, "Q4H": 6, "Q6H": 4, "Q8H": 3}
_STRENGTH = re.compile(r"(\d+(?:\.\d+)?)\s*(mg|mcg|ug|µg|g|meq)\b(?!\s*/)")
# Two strengths of a combination product ("5/325 MG", "5-325 mg", "10 MG / 325 MG").
_PAIRED_STRENGTH = re.compile(r"(\d+(?:\.\d+)?)\s*(?:mg)?\s*[-/]\s*(\d+(?:\.\d+)?)\s*mg\b")
#: An ingredient whose daily limit holds inside combination products, and the rule for its strength there:
#: acetaminophen is always the larger strength of its US combinations (325-750 mg with 2.5-60 mg partners).
COMBINED_LIMITS = ("acetaminophen",)
_EXTENDED_RELEASE = {
    "er",
    "xl",
    "xr",
    "sr",
    "cr",
    "cc",
    "la",
    "extended",
    "sustained",
    "controlled",
    "osmotic",
}


@dataclass(frozen=True)
class Finding:
    """Why an order needs attention for this patient: its kind (topic), severity, text and source."""

    topic: str
    severity: Severity
    summary: str
    detail: str
    source: str


@dataclass(frozen=True)
class DoseAmount:
    """How much of an order is given: each time and per day (mg, or mEq), and days between doses."""

    single: float | None
    daily: float | None
    period_days: float | None
    per_day: float | None = None


@dataclass(frozen=True)
class _Rule:
    drugs: DrugSet
    data: dict[str, Any]


@lru_cache(maxsize=1)
def _rules() -> dict[str, Any]:
    data = json.loads((DATA / "patient_rules.json").read_text(encoding="utf-8"))
    groups = json.loads((DATA / "interactions.json").read_text(encoding="utf-8"))["groups"]

    def load(section: list[dict[str, Any]]) -> tuple[_Rule, ...]:
        return tuple(_Rule(drug_set(rule["drugs"], groups), rule) for rule in section)

    return {
        "renal": load(data["renal"]),
        "potassium": load(data["potassium"]),
        "conditions": data["conditions"],
        "condition_rules": load(data["condition_rules"]),
        "pregnancy": load(data["pregnancy"]),
        "dose": data["dose"],
        "age": load(data["age"]),
    }


def preload() -> None:
    """Load the interaction and patient rules now (once per process), so no hook call pays for it."""
    _rules()
    interaction_rules()


def _to_mg(value: float, unit: str) -> float | None:
    key = unit.strip().lower().replace("µ", "u").strip("[]{}")
    key = key[:-1] if key.endswith("s") and key[:-1] in _MG_PER_UNIT else key
    factor = _MG_PER_UNIT.get(key)
    return value * factor if factor is not None else None


def _strength(texts: Iterable[str]) -> float | None:
    """Return the one strength a product's text names ("Acetaminophen 500 MG Oral Tablet"), or None."""
    found = {_to_mg(float(v), u) for text in texts for v, u in _STRENGTH.findall(text.lower())}
    found.discard(None)
    return found.pop() if len(found) == 1 else None  # type: ignore[return-value]


def combination_strength(texts: Iterable[str]) -> float | None:
    """Return the larger strength a two-ingredient product's text names ("Norco 5/325 MG"), or None."""
    found = {max(float(a), float(b)) for text in texts for a, b in _PAIRED_STRENGTH.findall(text.lower())}
    return found.pop() if len(found) == 1 else None


def dose_amount(dosages: Iterable[Any], texts: Iterable[str], strength: float | None = None) -> DoseAmount:
    """Return the largest amount per dose and per day the dosage instructions give (None where unknown).

    The amount is ``doseQuantity`` in mass units; a dose in tablets or capsules is multiplied by the one
    strength the product's text names, or by ``strength`` (one ingredient's, in a combination product: then
    a dose in mass units can't be split and is not counted). Doses per day come from ``timing.repeat``
    (frequency, its maximum, per period) or ``timing.code`` (BID, TID, Q6H, ...).
    """
    texts = list(texts)
    single = daily = period_days = doses_per_day = None
    for dosage in dosages:
        quantity = next((d.doseQuantity for d in dosage.doseAndRate if d.doseQuantity is not None), None)
        if quantity is None or quantity.value is None:
            continue
        unit = str(quantity.unit or quantity.code or "")
        mass = _to_mg(float(quantity.value), unit)
        each = strength if strength is not None or mass is not None else _strength(texts)
        if strength is not None and mass is not None:
            continue
        amount = mass if mass is not None else float(quantity.value) * each if each is not None else None
        if amount is None:
            continue
        single = max(single or 0.0, amount)
        per_day, days = _per_day(dosage.timing)
        if per_day is not None:
            daily = max(daily or 0.0, amount * per_day)
            doses_per_day = max(doses_per_day or 0.0, per_day)
            period_days = days if period_days is None else min(period_days, days)
    return DoseAmount(single, daily, period_days, doses_per_day)


def _per_day(timing: Any) -> tuple[float | None, float]:
    """Return the doses per day and the days between dosing periods, from a Timing."""
    if timing is None:
        return None, 1.0
    repeat = timing.repeat
    if repeat is not None and repeat.periodUnit in _DAYS_PER and repeat.period:
        days = float(repeat.period) * _DAYS_PER[repeat.periodUnit]
        frequency = repeat.frequencyMax or repeat.frequency or 1
        return frequency / days, days
    if timing.code is not None:
        for coding in timing.code.coding:
            if coding.code and coding.code.upper() in _PER_DAY:
                return float(_PER_DAY[coding.code.upper()]), 1.0
    return None, 1.0


def _most_severe(findings: Iterable[Finding]) -> list[Finding]:
    best: dict[str, Finding] = {}
    for finding in findings:
        kept = best.get(finding.topic)
        if kept is None or SEVERITY_RANK[finding.severity] > SEVERITY_RANK[kept.severity]:
            best[finding.topic] = finding
    return list(best.values())


def patient_findings(
    drug: str, identity: DrugIdentity, facts: PatientFacts, dosages: Iterable[Any], texts: Iterable[str]
) -> list[Finding]:
    """Return the most severe finding per kind for an ordered drug (named ``drug`` in the text), given its
    dosage instructions and the texts that name it."""
    rules = _rules()
    dosages, texts = list(dosages), list(texts)
    dose = dose_amount(dosages, texts)
    systemic = acts_systemically(identity)
    findings: list[Finding] = []
    if systemic and facts.egfr is not None:
        for rule in rules["renal"]:
            if "below" not in rule.data:
                continue
            if (
                facts.egfr.value < rule.data["below"]
                and rule.drugs.matches(identity)
                and not _adjusted(rule, dose)
            ):
                findings.append(
                    Finding(
                        "renal",
                        rule.data["severity"],
                        f"Kidney function: {drug}, eGFR {facts.egfr.value:g} (below {rule.data['below']})",
                        f"{rule.data['what']} Latest value: {facts.egfr.describe()}; threshold: below "
                        f"{rule.data['below']} mL/min/1.73m2 (labels give creatinine clearance; eGFR stands "
                        "in for it here).",
                        rule.data["source"],
                    )
                )
    if systemic:
        findings += _dose_criteria_findings(drug, identity, facts, dose)
    if systemic and facts.potassium is not None:
        value = facts.potassium.value
        for rule in rules["potassium"]:
            above, below = rule.data.get("above"), rule.data.get("below")
            if ((above is not None and value > above) or (below is not None and value < below)) and (
                rule.drugs.matches(identity)
            ):
                limit = f"above {above}" if above is not None else f"below {below}"
                findings.append(
                    Finding(
                        "potassium",
                        rule.data["severity"],
                        f"Potassium {value:g}: {drug} (alert {limit} mmol/L)",
                        f"{rule.data['what']} Latest value: {facts.potassium.describe()}; threshold: {limit} "
                        "mmol/L.",
                        rule.data["source"],
                    )
                )
    for rule in rules["condition_rules"]:
        if not (systemic or rule.data.get("any_route")) or not rule.drugs.matches(identity):
            continue
        group = rules["conditions"][rule.data["condition"]]
        for condition in facts.conditions:
            if condition_matches(
                condition,
                group["snomed"],
                group["icd10"],
                group["words"],
                group.get("exclude_icd10", ()),
                group.get("exclude_words", ()),
            ):
                findings.append(
                    Finding(
                        rule.data["topic"],
                        rule.data["severity"],
                        f"{drug} with {group['label']} ({condition.display})",
                        f"{rule.data['what']} Active problem: {condition.display}.",
                        rule.data["source"],
                    )
                )
                break
    if systemic and facts.pregnancy is not None:
        for rule in rules["pregnancy"]:
            if rule.drugs.matches(identity):
                findings.append(
                    Finding(
                        "pregnancy",
                        rule.data["severity"],
                        f"Pregnancy: {drug} ({rule.drugs.label})",
                        f"{rule.data['what']} Pregnancy recorded: {facts.pregnancy}.",
                        rule.data["source"],
                    )
                )
    if systemic:
        findings += _dose_findings(drug, identity, dose)
        findings += _combination_dose_findings(drug, identity, dosages, texts)
    if systemic and facts.age is not None:
        findings += _age_findings(drug, identity, facts.age, dose, texts)
    return _most_severe(findings)


def _adjusted(rule: _Rule, dose: DoseAmount) -> bool:
    """Return whether the order already has the label's dose for this kidney function (not an alert)."""
    daily_max = rule.data.get("adjusted_daily_max")
    if daily_max is not None and dose.daily is not None and dose.daily <= daily_max * 1.0001:
        return True
    per_day = rule.data.get("adjusted_doses_per_day")
    return per_day is not None and dose.per_day is not None and dose.per_day <= per_day


def _dose_criteria_findings(
    drug: str, identity: DrugIdentity, facts: PatientFacts, dose: DoseAmount
) -> list[Finding]:
    """Return findings of label dose-reduction criteria (apixaban: two of age, creatinine and weight)."""
    findings = []
    for rule in _rules()["renal"]:
        criteria = rule.data.get("criteria")
        if criteria is None or not rule.drugs.matches(identity):
            continue
        met = []
        if facts.age is not None and facts.age >= criteria["age_at_least"]:
            met.append(f"age {facts.age}")
        creatinine = facts.creatinine_mg_dl
        if creatinine is not None and creatinine.value >= criteria["creatinine_at_least"]:
            met.append(creatinine.describe())
        if facts.weight_kg is not None and facts.weight_kg.value <= criteria["weight_at_most"]:
            met.append(facts.weight_kg.describe())
        if len(met) < criteria["needed"] or dose.single is None or dose.single <= criteria["reduced_dose"]:
            continue
        findings.append(
            Finding(
                "renal",
                rule.data["severity"],
                f"Dose reduction due: {drug} {dose.single:g} mg with {', '.join(met)}",
                f"{rule.data['what']} Criteria met: {', '.join(met)}.",
                rule.data["source"],
            )
        )
    return findings


def _combination_dose_findings(
    drug: str, identity: DrugIdentity, dosages: list[Any], texts: list[str]
) -> list[Finding]:
    """Return the dose findings of acetaminophen inside a two-ingredient product (tablets × its strength)."""
    if len(identity.ingredients) != 2:
        return []
    findings = []
    for ingredient in sorted(identity.ingredients & set(COMBINED_LIMITS)):
        strength = combination_strength(texts)
        if strength is not None:
            dose = dose_amount(dosages, texts, strength)
            findings += _dose_findings(drug, DrugIdentity(frozenset([ingredient]), frozenset(), True), dose)
    return findings


def _dose_findings(drug: str, identity: DrugIdentity, dose: DoseAmount) -> list[Finding]:
    findings = []
    limits = _rules()["dose"]
    # A dose split over several ingredients (a combination product) is told per ingredient only where its
    # strength can be read (acetaminophen combinations, above).
    for ingredient in sorted(identity.ingredients) if len(identity.ingredients) == 1 else ():
        limit = limits.get(ingredient)
        if limit is None:
            continue
        unit = limit.get("unit", "mg")
        if ingredient == "methotrexate" and dose.period_days is not None and dose.period_days < 7:
            findings.append(
                Finding(
                    "dose",
                    "critical",
                    f"Dose: {drug} ordered daily; oral methotrexate for non-cancer use is weekly",
                    "Methotrexate ordered more often than weekly: daily dosing of a weekly drug is a known "
                    "fatal error. Confirm the indication and the schedule.",
                    limit["source"],
                )
            )
            continue
        checks = [("per day", dose.daily, limit.get("daily")), ("per dose", dose.single, limit.get("single"))]
        if ingredient == "methotrexate" and dose.daily is not None and dose.period_days:
            checks = [("per week", dose.daily * 7, limit.get("daily"))]
        for what, amount, maximum in checks:
            if amount is None or maximum is None or amount <= maximum * 1.0001:
                continue
            severity: Severity = "critical" if amount >= 2 * maximum else "warning"
            findings.append(
                Finding(
                    "dose",
                    severity,
                    f"Dose: {drug} {amount:g} {unit} {what} exceeds {maximum:g} {unit}",
                    f"The order gives {amount:g} {unit} {what}; the usual maximum is {maximum:g} {unit}"
                    + (
                        " (twice the maximum or more: a possible 10-fold error)."
                        if severity == "critical"
                        else "."
                    ),
                    limit["source"],
                )
            )
    return findings


def _age_findings(
    drug: str, identity: DrugIdentity, age: int, dose: DoseAmount, texts: Iterable[str]
) -> list[Finding]:
    findings = []
    words = {w for text in texts for w in normalise(text)}
    for rule in _rules()["age"]:
        data = rule.data
        if age < data["min_age"] or not rule.drugs.matches(identity):
            continue
        if "min_daily_mg" in data:
            if dose.daily is None and not data.get("unknown_dose"):
                continue
            if dose.daily is not None and dose.daily < data["min_daily_mg"]:
                continue
        if data.get("immediate_release_only") and words & _EXTENDED_RELEASE:
            continue
        findings.append(
            Finding(
                "age",
                data["severity"],
                f"Older adult ({age}): {drug} ({rule.drugs.label})",
                f"{data['what']} Patient age: {age}.",
                data["source"],
            )
        )
    return findings
