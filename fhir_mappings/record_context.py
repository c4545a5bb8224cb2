"""Record → model context: compact dated lines, each citing the resource it came from, under a budget."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date
from datetime import datetime
from typing import Any

from fhir_mappings.record import EPOCH
from fhir_mappings.record import active_allergies
from fhir_mappings.record import active_conditions
from fhir_mappings.record import active_medication_requests
from fhir_mappings.record import as_instant
from fhir_mappings.record import bundle_resources
from fhir_mappings.record import concept_text
from fhir_mappings.record import medication_concept
from fhir_mappings.record import reference

# Gemma's tokenizer spends about 4 characters a token on clinical English; the budget is in tokens.
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class RecordContext:
    """The text a model reads, the resources it cites, and the content hashes of those resources."""

    text: str
    evidence: list[str]
    input_hashes: list[str]


def content_hash(resource: Any) -> str:
    """Return a hash of a resource's content, ignoring ``meta`` (it changes when content doesn't)."""
    # fhir.resources' model_dump ignores ``exclude``, so meta is dropped from the dumped dict instead.
    data = resource.model_dump(mode="json", exclude_none=True)
    data.pop("meta", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]


def observation_time(observation: Any) -> datetime | None:
    """Return when an Observation applies: effective[x] (a period's start)."""
    period = observation.effectivePeriod
    value = (
        observation.effectiveDateTime or observation.effectiveInstant or (period.start if period else None)
    )
    return as_instant(value)


def _day(value: Any) -> str:
    text = str(value) if value is not None else ""
    return text[:10] if text else "undated"


def _observation_value(observation: Any) -> str:
    if observation.valueQuantity is not None:
        quantity = observation.valueQuantity
        return f"{quantity.value} {quantity.unit or quantity.code or ''}".strip()
    if observation.valueCodeableConcept is not None:
        return concept_text(observation.valueCodeableConcept)
    if observation.valueString:
        return str(observation.valueString)
    parts = [
        f"{concept_text(c.code)} {c.valueQuantity.value} {c.valueQuantity.unit or ''}".strip()
        for c in observation.component or []
        if c.valueQuantity is not None
    ]
    return "; ".join(parts)


def patient_line(patient: Any, today: date) -> str:
    """Return the patient's sex and age, nothing that identifies them."""
    age = ""
    if patient.birthDate:
        born = patient.birthDate
        age = f", {today.year - born.year - ((today.month, today.day) < (born.month, born.day))} years old"
    return f"Patient: {patient.gender or 'unknown sex'}{age}"


def record_context(
    patient: Any,
    conditions: Any,
    medications: Any,
    allergies: Any,
    observations: Any,
    *,
    token_budget: int,
    today: date,
) -> RecordContext:
    """Return the record as lines "[Type/id] date kind: text", most important first, cut at the budget.

    Order of importance: allergies, active problems, active medications, then observations newest first.
    """
    candidates: list[tuple[Any, str]] = []
    for allergy in active_allergies(allergies):
        criticality = f" ({allergy.criticality} criticality)" if allergy.criticality else ""
        candidates.append((allergy, f"allergy{criticality}: {concept_text(allergy.code)}"))
    for condition in active_conditions(conditions):
        candidates.append(
            (condition, f"{_day(condition.onsetDateTime)} problem: {concept_text(condition.code)}")
        )
    for request in active_medication_requests(medications):
        text = concept_text(medication_concept(request))
        candidates.append((request, f"{_day(request.authoredOn)} medication: {text}"))
    dated = [(o, observation_time(o)) for o in bundle_resources(observations, "Observation")]
    # Newest first; undated observations go last rather than ahead of every dated one.
    for observation, when in sorted(dated, key=lambda pair: pair[1] or EPOCH, reverse=True):
        day = when.date().isoformat() if when else "undated"
        value = _observation_value(observation)
        if value:
            candidates.append((observation, f"{day} {concept_text(observation.code)}: {value}"))

    lines = [patient_line(patient, today)] if patient is not None else []
    budget = token_budget * CHARS_PER_TOKEN - sum(len(line) + 1 for line in lines)
    evidence: list[str] = []
    hashes: list[str] = []
    for resource, text in candidates:
        line = f"[{reference(resource)}] {text}"
        if len(line) + 1 > budget:
            break
        budget -= len(line) + 1
        lines.append(line)
        evidence.append(reference(resource))
        hashes.append(content_hash(resource))
    if patient is not None:
        hashes.append(content_hash(patient))
    return RecordContext(text="\n".join(lines), evidence=evidence, input_hashes=hashes)
