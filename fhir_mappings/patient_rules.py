"""Medication rules that depend on the patient: kidney function, potassium, conditions, pregnancy, dose, age.

Each rule (``fhir_mappings/data/patient_rules.json``) names a drug set, the patient fact it needs, a severity,
what it means and its source. A rule whose fact the record does not hold stays quiet (nothing is guessed);
only drugs that act systemically are checked, except where a rule says any route counts (timolol eye drops
in asthma, promethazine suppositories under 2). Per order and kind, the most severe matching rule gives the
finding. Doses are read in mg (mEq); a dose per kg counts with the recorded body weight, and international
units only for drugs whose units have a mass (vitamin D).
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
    "age": "Age",
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
#: International units (UCUM "[iU]", "[IU]", RxNorm "UNT"): a mass only where the drug's unit has one.
_INTERNATIONAL_UNITS = {"iu", "unit", "unt", "u", "international unit"}
_PER_KG = re.compile(r"\s*/\s*kg\b.*$", re.IGNORECASE)
_DAYS_PER = {"s": 1 / 86400, "min": 1 / 1440, "h": 1 / 24, "d": 1.0, "wk": 7.0, "mo": 30.0, "a": 365.0}
# Timing.code (HL7 TimingAbbreviation): doses per day; "Q<n>H" (Q12H, Q48H) is read as every n hours.
_PER_DAY = {
    "QD": 1,
    "AM": 1,
    "PM": 1,
    "BED": 1,
    "BID": 2,
    "TID": 3,
    "QID": 4,
    "QOD": 1 / 2,
    "WK": 1 / 7,
    "MO": 1 / 30,
}
_EVERY_HOURS = re.compile(r"Q(\d{1,4})H")
_STRENGTH = re.compile(r"(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)\s*(mg|mcg|ug|µg|g|meq|iu|units?|unt)\b(?!\s*/)")
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
    """How much of an order is given: each time and per day (mg, or mEq), the days between dosing periods,
    doses per day, and mg per kg of body weight per day (a dose per kg, or mg with the recorded weight)."""

    single: float | None
    daily: float | None
    period_days: float | None
    per_day: float | None = None
    daily_per_kg: float | None = None


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
        "schedules": load(data["schedules"]),
        "international_units": load(data["international_units"]),
    }


def preload() -> None:
    """Load the interaction and patient rules now (once per process), so no hook call pays for it."""
    _rules()
    interaction_rules()


def _unit_key(unit: str) -> str:
    key = unit.strip().lower().replace("µ", "u").strip("[]{}")
    singular = key[:-1] if key.endswith("s") else key
    return singular if singular in _MG_PER_UNIT or singular in _INTERNATIONAL_UNITS else key


def _international_unit(unit: str) -> bool:
    return _unit_key(unit) in _INTERNATIONAL_UNITS


def _to_mg(value: float, unit: str, mg_per_unit: float | None = None) -> float | None:
    """Return an amount in mg (mEq as is); international units only with the drug's mg per unit."""
    key = _unit_key(unit)
    if key in _INTERNATIONAL_UNITS:
        return value * mg_per_unit if mg_per_unit is not None else None
    factor = _MG_PER_UNIT.get(key)
    return value * factor if factor is not None else None


def _strength(texts: Iterable[str], mg_per_unit: float | None = None) -> float | None:
    """Return the one strength a product's text names ("Acetaminophen 500 MG Oral Tablet"), or None.

    "Ergocalciferol 1.25 MG (50,000 UNT)" names one strength twice when a unit is worth 0.000025 mg.
    """
    found = {
        _to_mg(float(v.replace(",", "")), u, mg_per_unit)
        for text in texts
        for v, u in _STRENGTH.findall(text.lower())
    }
    found.discard(None)
    rounded = {round(mg, 6) for mg in found if mg is not None}
    return rounded.pop() if len(rounded) == 1 else None


def combination_strength(texts: Iterable[str]) -> float | None:
    """Return the larger strength a two-ingredient product's text names ("Norco 5/325 MG"), or None."""
    found = {max(float(a), float(b)) for text in texts for a, b in _PAIRED_STRENGTH.findall(text.lower())}
    return found.pop() if len(found) == 1 else None


def dose_amount(
    dosages: Iterable[Any],
    texts: Iterable[str],
    strength: float | None = None,
    *,
    weight_kg: float | None = None,
    mg_per_unit: float | None = None,
) -> DoseAmount:
    """Return the largest amount per dose and per day the dosage instructions give (None where unknown).

    The amount is ``doseQuantity`` in mass units (international units with ``mg_per_unit``); a dose per kg
    ("mg/kg") counts with ``weight_kg``; a dose in tablets or capsules is multiplied by the one strength the
    product's text names, or by ``strength`` (one ingredient's, in a combination product: then a dose in
    mass units can't be split and is not counted). Doses per day come from ``timing.repeat`` (frequency, its
    maximum, per period of any length: every 48 h is half a dose a day) or ``timing.code`` (BID, Q6H, QOD,
    WK, ...).
    """
    texts = list(texts)
    single = daily = period_days = doses_per_day = daily_per_kg = None
    for dosage in dosages:
        quantity = next((d.doseQuantity for d in dosage.doseAndRate if d.doseQuantity is not None), None)
        if quantity is None or quantity.value is None:
            continue
        value, unit = float(quantity.value), str(quantity.unit or quantity.code or "")
        per_day, days = _per_day(dosage.timing)
        base = _PER_KG.sub("", unit)
        mass = _to_mg(value, base, mg_per_unit)
        per_kg: float | None = None
        if base != unit:
            # A dose per kg: mg per kg as ordered, and mg with the patient's weight (else unknown).
            if mass is None or strength is not None:
                continue
            per_kg = mass
            amount = mass * weight_kg if weight_kg else None
        elif mass is not None:
            if strength is not None:
                continue
            amount = mass
        elif _international_unit(base):
            continue  # units of a drug whose unit has no mass here (insulin, heparin): not a count
        else:
            each = strength if strength is not None else _strength(texts, mg_per_unit)
            amount = value * each if each is not None else None
        if per_kg is None and amount is not None and weight_kg:
            per_kg = amount / weight_kg
        if per_kg is not None and per_day is not None:
            daily_per_kg = max(daily_per_kg or 0.0, per_kg * per_day)
        if amount is None:
            continue
        single = max(single or 0.0, amount)
        if per_day is not None:
            daily = max(daily or 0.0, amount * per_day)
            doses_per_day = max(doses_per_day or 0.0, per_day)
            period_days = days if period_days is None else min(period_days, days)
    return DoseAmount(single, daily, period_days, doses_per_day, daily_per_kg)


def _per_day(timing: Any) -> tuple[float | None, float]:
    """Return the doses per day and the days between dosing periods, from a Timing.

    A frequency without a period is per one ``periodUnit``; a code gives at least a day between periods
    (QOD 2, WK 7, Q48H 2).
    """
    if timing is None:
        return None, 1.0
    repeat = timing.repeat
    if repeat is not None and repeat.periodUnit in _DAYS_PER and (repeat.period or repeat.frequency):
        days = float(repeat.period or 1) * _DAYS_PER[repeat.periodUnit]
        frequency = repeat.frequencyMax or repeat.frequency or 1
        return frequency / days, days
    if timing.code is not None:
        for coding in timing.code.coding:
            code = (coding.code or "").upper()
            every = _EVERY_HOURS.fullmatch(code)
            per_day = 24 / int(every.group(1)) if every and int(every.group(1)) else _PER_DAY.get(code)
            if per_day is not None:
                return float(per_day), max(1.0, 1 / per_day)
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
    mg_per_unit = _mg_per_unit(identity)
    weight = facts.weight_kg.value if facts.weight_kg is not None else None
    dose = dose_amount(dosages, texts, weight_kg=weight, mg_per_unit=mg_per_unit)
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
        findings += _schedule_findings(drug, identity, dose, mg_per_unit)
        findings += _dose_findings(drug, identity, dose)
        findings += _combination_dose_findings(drug, identity, dosages, texts)
    if facts.age is not None:
        findings += _age_findings(drug, identity, facts.age, dose, texts, systemic)
    return _most_severe(findings)


def _mg_per_unit(identity: DrugIdentity) -> float | None:
    """Return the mg in one international unit of a one-ingredient drug (vitamin D), or None."""
    if len(identity.ingredients) > 1:
        return None
    units = _rules()["international_units"]
    return next((rule.data["mg_per_unit"] for rule in units if rule.drugs.matches(identity)), None)


def _adjusted(rule: _Rule, dose: DoseAmount) -> bool:
    """Return whether the order already has the label's dose for this kidney function (not an alert): a
    daily total, doses per day, or mg per kg per day (within syringe rounding, ``per_kg_tolerance``)."""
    daily_max = rule.data.get("adjusted_daily_max")
    if daily_max is not None and dose.daily is not None and dose.daily <= daily_max * 1.0001:
        return True
    per_kg = rule.data.get("adjusted_mg_per_kg_daily")
    if per_kg is not None and dose.daily_per_kg is not None:
        if dose.daily_per_kg <= per_kg * (1 + rule.data.get("per_kg_tolerance", 0.0)) + 1e-9:
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
        checks = [("per day", dose.daily, limit.get("daily")), ("per dose", dose.single, limit.get("single"))]
        if limit.get("weekly_drug"):
            # The limit of a weekly drug is per week; ordered more often, the schedule finding says so.
            checks = [("per week", dose.daily * 7 if dose.daily is not None else None, limit.get("daily"))]
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


def _ordered_how_often(dose: DoseAmount) -> str:
    per_day, days = dose.per_day or 0.0, dose.period_days or 0.0
    if days > 1.0001:
        return f"every {days:g} days"
    return "daily" if per_day <= 1.0001 else f"{per_day:g} times a day"


def _schedule_findings(
    drug: str, identity: DrugIdentity, dose: DoseAmount, mg_per_unit: float | None
) -> list[Finding]:
    """Return findings of a weekly or monthly drug ordered more often, at the strength given that way
    (ISMP: alendronate 70 mg or methotrexate ordered daily instead of weekly)."""
    if len(identity.ingredients) > 1 or dose.period_days is None or dose.single is None:
        return []
    findings = []
    for rule in _rules()["schedules"]:
        data = rule.data
        if dose.period_days >= data["every_days"] or not rule.drugs.matches(identity):
            continue
        unit = data.get("unit", "mg")
        per_mg = 1.0 if unit == "mg" else mg_per_unit
        if per_mg is None:
            continue
        amount = round(dose.single / per_mg, 6)
        if amount < data.get("min_dose", 0) or amount > data.get("max_dose", amount):
            continue
        findings.append(
            Finding(
                "dose",
                data["severity"],
                f"Dose: {drug} {amount:,g} {unit} ordered {_ordered_how_often(dose)}; "
                f"{rule.drugs.label} is taken {data['schedule']}",
                f"{data['what']} The order gives {amount:,g} {unit} {_ordered_how_often(dose)}.",
                data["source"],
            )
        )
    return findings


def _age_findings(
    drug: str, identity: DrugIdentity, age: int, dose: DoseAmount, texts: Iterable[str], systemic: bool
) -> list[Finding]:
    """Return the age findings: label age limits in children ("under_age") and Beers criteria in older
    adults ("min_age")."""
    findings = []
    words = {w for text in texts for w in normalise(text)}
    for rule in _rules()["age"]:
        data = rule.data
        if not (systemic or data.get("any_route")) or not rule.drugs.matches(identity):
            continue
        if "under_age" in data:
            if age < data["under_age"]:
                findings.append(
                    Finding(
                        "age",
                        data["severity"],
                        f"Age {age} (under {data['under_age']}): {drug} ({rule.drugs.label})",
                        f"{data['what']} Patient age: {age}.",
                        data["source"],
                    )
                )
            continue
        if age < data["min_age"]:
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
