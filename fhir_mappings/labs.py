"""What the medication rules know of the patient: age, sex, kidney function, potassium, pregnancy, problems.

Read from the Patient, the active Conditions and the Observations of the prefetch, never guessed: a value
the record does not hold is None and the rules that need it stay quiet. Of each lab the most recent value
is used, and one older than a year is not (``patient_rules.json`` ``labs``). eGFR is taken as reported
(CKD-EPI 2021, CKD-EPI 2009, MDRD) or computed with the race-free CKD-EPI 2021 equation (Inker et al., NEJM
2021;385:1737) from serum creatinine with the patient's age and sex, whichever is more recent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from datetime import timedelta
from functools import lru_cache
from typing import Any

from fhir_mappings.drugs import DATA
from fhir_mappings.drugs import SNOMED
from fhir_mappings.drugs import normalise
from fhir_mappings.record import active_conditions
from fhir_mappings.record import as_instant
from fhir_mappings.record import bundle_resources
from fhir_mappings.record import concept_text

LOINC = "http://loinc.org"
ICD10 = ("http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10")
UMOL_PER_MG_CREATININE = 88.42
_UNUSABLE_STATUSES = {"entered-in-error", "cancelled"}


@dataclass(frozen=True)
class LabValue:
    """One lab value as a rule uses it: the number, its unit, its day, and how it was had."""

    value: float
    unit: str
    day: date
    label: str

    def describe(self) -> str:
        """Return the value for a card: "eGFR 24 mL/min/1.73m2 on 2026-11-02 (...)"."""
        return f"{self.label} {self.value:g} {self.unit} on {self.day.isoformat()}"


@dataclass(frozen=True)
class ConditionFact:
    """An active problem: its codes by system and its normalised text."""

    snomed: frozenset[str]
    icd10: frozenset[str]
    text: str
    display: str


@dataclass(frozen=True)
class PatientFacts:
    """What the record says about the patient that a medication rule can use."""

    age: int | None = None
    sex: str | None = None
    egfr: LabValue | None = None
    creatinine_mg_dl: LabValue | None = None
    weight_kg: LabValue | None = None
    potassium: LabValue | None = None
    pregnancy: str | None = None
    conditions: tuple[ConditionFact, ...] = ()


@lru_cache(maxsize=1)
def _patient_rules_data() -> dict[str, Any]:
    return json.loads((DATA / "patient_rules.json").read_text(encoding="utf-8"))


def lab_codes() -> dict[str, Any]:
    """Return the ``labs`` section of patient_rules.json (LOINC codes, answers, limits)."""
    return _patient_rules_data()["labs"]


def lab_codes_exclusions() -> list[str]:
    """Return the words that make a problem's text not the patient's present problem."""
    return _patient_rules_data()["condition_exclude_words"]


def age_on(birth_date: str | None, today: date) -> int | None:
    """Return the age in whole years on ``today`` from a FHIR birthDate (a year alone is not enough)."""
    if not birth_date or len(birth_date) < 7:
        return None
    born = as_instant(birth_date)
    if born is None:
        return None
    born_day = born.date()
    return today.year - born_day.year - ((today.month, today.day) < (born_day.month, born_day.day))


def ckd_epi_2021(creatinine_mg_dl: float, age: int, sex: str) -> float:
    """Return eGFR (mL/min/1.73m²) by the race-free CKD-EPI 2021 creatinine equation."""
    female = sex == "female"
    kappa = 0.7 if female else 0.9
    alpha = -0.241 if female else -0.302
    ratio = creatinine_mg_dl / kappa
    egfr = 142 * min(ratio, 1) ** alpha * max(ratio, 1) ** -1.200 * 0.9938**age
    return egfr * 1.012 if female else egfr


def observation_day(observation: Any) -> date | None:
    """Return the day an Observation was taken (effective time, else the period start, else issued)."""
    for value in (
        observation.effectiveDateTime,
        observation.effectiveInstant,
        observation.effectivePeriod.start if observation.effectivePeriod else None,
        observation.issued,
    ):
        instant = as_instant(value)
        if instant is not None:
            return instant.date()
    return None


def _loinc_codes(observation: Any) -> set[str]:
    if observation.code is None:
        return set()
    return {c.code for c in observation.code.coding if c.code and (c.system or LOINC) == LOINC}


def _recent(
    observations: Iterable[Any], codes: set[str], today: date, max_days: int
) -> list[tuple[date, Any]]:
    """Return the usable Observations with one of ``codes`` from the last ``max_days``, newest first."""
    found = []
    for observation in observations:
        if (observation.status or "").lower() in _UNUSABLE_STATUSES or not _loinc_codes(observation) & codes:
            continue
        day = observation_day(observation)
        if day is None or day > today + timedelta(days=1) or (today - day).days > max_days:
            continue
        found.append((day, observation))
    found.sort(key=lambda item: item[0], reverse=True)
    return found


def _number(observation: Any) -> tuple[float, str] | None:
    quantity = observation.valueQuantity
    if quantity is not None and quantity.value is not None:
        return float(quantity.value), str(quantity.unit or quantity.code or "")
    if observation.valueString:
        words = observation.valueString.replace(">", " ").replace("<", " ").split()
        for word in words:
            try:
                return float(word), ""
            except ValueError:
                continue
    return None


def _egfr(
    observations: list[Any], creatinine: LabValue | None, age: int | None, sex: str | None, today: date
) -> LabValue | None:
    labs = lab_codes()
    candidates: list[LabValue] = []
    for day, observation in _recent(observations, set(labs["egfr"]["loinc"]), today, labs["max_age_days"]):
        number = _number(observation)
        if number is not None:
            candidates.append(LabValue(number[0], "mL/min/1.73m2", day, "eGFR"))
            break
    if creatinine is not None and age is not None and sex in ("female", "male"):
        egfr = ckd_epi_2021(creatinine.value, age, sex)
        label = f"eGFR (CKD-EPI 2021 from creatinine {creatinine.value:g} mg/dL, age {age}, {sex})"
        candidates.append(LabValue(round(egfr), "mL/min/1.73m2", creatinine.day, label))
    # The most recent wins; on the same day a reported eGFR wins over the computed one (listed first).
    return max(candidates, key=lambda lab: lab.day, default=None)


def _latest(observations: list[Any], key: str, today: date, unit: str, label: str) -> LabValue | None:
    labs = lab_codes()
    for day, observation in _recent(observations, set(labs[key]), today, labs["max_age_days"]):
        number = _number(observation)
        if number is not None:
            return LabValue(number[0], number[1] or unit, day, label)
    return None


def _creatinine(observations: list[Any], today: date) -> LabValue | None:
    """Return the latest serum creatinine in mg/dL (µmol/L converted)."""
    labs = lab_codes()
    codes = set(labs["creatinine_mg_dl"]) | set(labs["creatinine_umol_l"])
    for day, observation in _recent(observations, codes, today, labs["max_age_days"]):
        number = _number(observation)
        if number is None or number[0] <= 0:
            continue
        in_umol = "mol" in number[1].lower() or (
            not number[1] and _loinc_codes(observation) & set(labs["creatinine_umol_l"])
        )
        value = number[0] / UMOL_PER_MG_CREATININE if in_umol else number[0]
        return LabValue(round(value, 2), "mg/dL", day, "Creatinine")
    return None


def _weight(observations: list[Any], today: date) -> LabValue | None:
    """Return the latest body weight in kg (pounds converted)."""
    weight = _latest(observations, "body_weight", today, "kg", "Weight")
    if weight is not None and weight.unit.lower().startswith(("lb", "[lb")):
        return LabValue(round(weight.value * 0.4536, 1), "kg", weight.day, "Weight")
    return weight


def _answer(observation: Any, answers: dict[str, Any]) -> bool:
    concept = observation.valueCodeableConcept
    codes = {c.code for c in concept.coding if c.code} if concept is not None else set()
    if codes & (set(answers["snomed"]) | set(answers["loinc_answers"])):
        return True
    text = " ".join(
        normalise(concept_text(concept) if concept is not None else observation.valueString or "")
    )
    return text in answers["words"]


def _pregnancy(observations: list[Any], conditions: tuple[ConditionFact, ...], today: date) -> str | None:
    labs = lab_codes()
    wanted = labs["pregnancy_conditions"]
    for condition in conditions:
        if condition_matches(condition, wanted["snomed"], wanted["icd10_prefixes"], wanted["words"]):
            return f"active condition: {condition.display}"
    recent = _recent(observations, set(labs["pregnancy_status"]), today, labs["pregnancy_max_days"])
    if not recent:
        return None
    day, observation = recent[0]
    name = concept_text(observation.code) or "pregnancy test"
    if _answer(observation, labs["pregnancy_positive"]):
        return f"{name}: positive on {day.isoformat()}"
    number = _number(observation)
    if number is not None and not _answer(observation, labs["pregnancy_negative"]):
        if number[0] > labs["hcg_positive_above"]:
            return f"{name}: {number[0]:g} {number[1]} on {day.isoformat()}"
    return None


def _words_match(text: str, words: Iterable[str]) -> bool:
    padded = f" {text} "
    for word in words:
        phrase = " ".join(normalise(word))
        if word.endswith("*"):
            if f" {phrase}" in padded:
                return True
        elif f" {phrase} " in padded:
            return True
    return False


def condition_matches(
    condition: ConditionFact,
    snomed: Iterable[str],
    icd10: Iterable[str],
    words: Iterable[str],
    exclude_icd10: Iterable[str] = (),
    exclude_words: Iterable[str] = (),
) -> bool:
    """Return whether a problem is in a group: by SNOMED CT code, ICD-10 prefix, or words in its text.

    A problem whose text says it is not the patient's own or not present ("family history of", "ruled
    out") or that a group excludes (heart failure "with preserved ejection fraction") is not in it.
    """
    excluded = [p.replace(".", "").upper() for p in exclude_icd10]
    if any(code.startswith(prefix) for code in condition.icd10 for prefix in excluded):
        return False
    if _words_match(condition.text, [*exclude_words, *lab_codes_exclusions()]):
        return False
    if condition.snomed & set(snomed):
        return True
    prefixes = [p.replace(".", "").upper() for p in icd10]
    if any(code.startswith(prefix) for code in condition.icd10 for prefix in prefixes):
        return True
    return _words_match(condition.text, words)


def _condition_facts(conditions: Any) -> tuple[ConditionFact, ...]:
    facts = []
    for condition in active_conditions(conditions):
        verification = condition.verificationStatus
        status = {c.code for c in verification.coding if c.code} if verification is not None else set()
        if status & {"refuted", "entered-in-error"}:
            continue
        concept = condition.code
        codings = concept.coding if concept is not None else []
        texts = [concept.text or ""] + [c.display or "" for c in codings] if concept is not None else []
        facts.append(
            ConditionFact(
                snomed=frozenset(c.code for c in codings if c.code and c.system == SNOMED),
                icd10=frozenset(
                    c.code.replace(".", "").upper() for c in codings if c.code and c.system in ICD10
                ),
                text=" ".join(normalise(" ; ".join(t for t in texts if t))),
                display=concept_text(concept) or "a recorded condition",
            )
        )
    return tuple(facts)


def patient_facts(
    patient: Any, conditions: Any, observation_lists: Iterable[Any], today: date
) -> PatientFacts:
    """Return what the Patient, the active Conditions and the Observation lists say, as of ``today``."""
    age = age_on(patient.birthDate, today) if patient is not None else None
    sex = (patient.gender or "").lower() or None if patient is not None else None
    observations: list[Any] = []
    for observation_list in observation_lists:
        observations += bundle_resources(observation_list, "Observation")
    facts = _condition_facts(conditions)
    creatinine = _creatinine(observations, today)
    return PatientFacts(
        age=age,
        sex=sex,
        egfr=_egfr(observations, creatinine, age, sex, today),
        creatinine_mg_dl=creatinine,
        weight_kg=_weight(observations, today),
        potassium=_latest(observations, "potassium", today, "mmol/L", "Potassium"),
        pregnancy=None if sex == "male" else _pregnancy(observations, facts, today),
        conditions=facts,
    )
