"""Record → model context: compact dated lines, each citing the resource it came from, under a budget.

Chart text is data, never instructions: every free-text value (a problem's name, a note, a unit) is written
as a JSON string, so its newlines, quotes and brackets stay inside one quoted value on one line and cannot
forge another ``[Type/id]`` entry or a line of instructions. A line is ``[Type/id] date kind: "text"``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from datetime import datetime
from typing import Any

import orjson

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
# FHIR R4 id (2.24.0.1): what a citation may contain. Read tolerantly, an id can be any text.
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_FHIR_DATE = re.compile(r"\d{4}(-\d{2}(-\d{2})?)?")


@dataclass(frozen=True)
class RecordContext:
    """The text a model reads, the resources it cites, and the content hashes of those resources."""

    text: str
    evidence: list[str]
    input_hashes: list[str]


def raw_content_hash(data: dict[str, Any]) -> str:
    """Return a canonical hash of one resource's JSON: its content and ``meta.versionId``, keys sorted.

    The same resource hashes the same however it was sent (key order, whitespace, escapes, the Bundle it
    came in), so a job precomputed from the FHIR server is the one a chart open asks for. A new version
    (content or versionId) hashes differently, so an old result is never taken as current. The rest of
    ``meta`` is left out: servers rewrite ``lastUpdated``, and tags or profiles are not clinical content.
    """
    content = {k: v for k, v in data.items() if k != "meta"}
    meta = data.get("meta")
    if isinstance(meta, dict) and meta.get("versionId") is not None:
        content["meta"] = {"versionId": str(meta["versionId"])}
    try:
        canonical = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # an integer past 64 bits, which JSON allows and orjson does not write
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:32]


def raw_content_hashes(data: dict[str, Any]) -> dict[str, str]:
    """Return ``{"Type/id": hash}`` for a resource's JSON or every entry of a Bundle's JSON.

    Only the resources count: a Bundle's own id, meta, links, entry order, ``fullUrl`` and ``search`` differ
    between an EHR's prefetch and a FHIR server's answer without the record differing. Hashing the JSON as
    received is far cheaper than re-serialising parsed fhir.resources objects.
    """
    resources = (
        [e.get("resource") or {} for e in data.get("entry") or []]
        if data.get("resourceType") == "Bundle"
        else [data]
    )
    return {
        f"{r['resourceType']}/{r['id']}": raw_content_hash(r)
        for r in resources
        if isinstance(r.get("resourceType"), str) and isinstance(r.get("id"), str)
    }


def content_hash(resource: Any) -> str:
    """Return the content hash of a parsed resource, from its re-serialised JSON (slower; for resources
    that came without their JSON)."""
    # fhir.resources' model_dump ignores ``exclude``, so meta is dropped by raw_content_hash instead.
    return raw_content_hash(resource.model_dump(mode="json", exclude_none=True))


def observation_time(observation: Any) -> datetime | None:
    """Return when an Observation applies: effective[x] (a period's start)."""
    period = observation.effectivePeriod
    value = (
        observation.effectiveDateTime or observation.effectiveInstant or (period.start if period else None)
    )
    return as_instant(value)


# Line breaks that JSON leaves as they are but Python's splitlines, and some tokenizers, break lines on.
_UNICODE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def quoted(text: str) -> str:
    """Return chart text as one JSON string: quoted, on one line, its quotes and line breaks escaped."""
    return json.dumps(text, ensure_ascii=False).translate(_UNICODE_BREAKS)


def citation(resource: Any) -> str | None:
    """Return ``Type/id`` when the resource's id is a FHIR id (so a model can cite it), else None."""
    return reference(resource) if resource.id and _FHIR_ID.fullmatch(str(resource.id)) else None


def _day(value: Any) -> str:
    text = str(value)[:10] if value is not None else ""
    return text if _FHIR_DATE.fullmatch(text) else "undated"


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
    born = as_instant(patient.birthDate)
    if born is not None:
        years = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
        # A partial birth date ("1970", "1970-06") gives the age to within a year.
        about = "about " if len(str(patient.birthDate).strip()) < 10 else ""
        age = f", {about}{years} years old"
    # A tolerant read keeps any gender text; only the R4 codes are written as they are.
    gender = patient.gender if patient.gender in ("male", "female", "other", "unknown") else "unknown sex"
    return f"Patient: {gender}{age}"


def by_id(resources: list[Any]) -> list[Any]:
    """Return resources sorted by id: what the model reads must not depend on a Bundle's entry order."""
    return sorted(resources, key=lambda resource: resource.id or "")


def newest_first(resources: list[Any], when: Callable[[Any], datetime | None]) -> list[Any]:
    """Return resources newest first by ``when``, ties by id, undated last (not ahead of every dated one)."""
    return sorted(by_id(resources), key=lambda resource: when(resource) or EPOCH, reverse=True)


def record_context(
    patient: Any,
    conditions: Any,
    medications: Any,
    allergies: Any,
    observations: Any,
    *,
    token_budget: int,
    today: date,
    content_hashes: Mapping[str, str] | None = None,
) -> RecordContext:
    """Return the record as lines ``[Type/id] date kind: "text"``, most important first, cut at the budget.

    Order of importance: allergies (high criticality first), active problems, active medications, then
    observations, each newest first with ties by id, so the text is the same whatever order the record's
    Bundles list their entries in.
    ``content_hashes`` (from the JSON as received) saves re-serialising each resource to hash it.
    """
    known = content_hashes or {}

    def hash_of(resource: Any) -> str:
        return known.get(reference(resource)) or content_hash(resource)

    candidates: list[tuple[Any, str]] = []
    high_first = sorted(by_id(active_allergies(allergies)), key=lambda a: a.criticality != "high")
    for allergy in high_first:
        coded = allergy.criticality in ("low", "high", "unable-to-assess")
        criticality = f" ({allergy.criticality} criticality)" if coded else ""
        candidates.append((allergy, f"allergy{criticality}: {quoted(concept_text(allergy.code))}"))
    for condition in newest_first(active_conditions(conditions), lambda c: as_instant(c.onsetDateTime)):
        text = quoted(concept_text(condition.code))
        candidates.append((condition, f"{_day(condition.onsetDateTime)} problem: {text}"))
    for request in newest_first(active_medication_requests(medications), lambda m: as_instant(m.authoredOn)):
        text = quoted(concept_text(medication_concept(request)))
        candidates.append((request, f"{_day(request.authoredOn)} medication: {text}"))
    for observation in newest_first(bundle_resources(observations, "Observation"), observation_time):
        when = observation_time(observation)
        day = when.date().isoformat() if when else "undated"
        value = _observation_value(observation)
        if value:
            name = quoted(concept_text(observation.code))
            candidates.append((observation, f"{day} observation: {name} = {quoted(value)}"))

    lines = [patient_line(patient, today)] if patient is not None else []
    budget = token_budget * CHARS_PER_TOKEN - sum(len(line) + 1 for line in lines)
    evidence: list[str] = []
    hashes: list[str] = []
    for resource, text in candidates:
        cited = citation(resource)
        # An entry whose id can't be cited is still read, under its type alone.
        line = f"[{cited or resource.get_resource_type()}] {text}"
        if len(line) + 1 > budget:
            break
        budget -= len(line) + 1
        lines.append(line)
        if cited:
            evidence.append(cited)
        hashes.append(hash_of(resource))
    if patient is not None:
        hashes.append(hash_of(patient))
    return RecordContext(text="\n".join(lines), evidence=evidence, input_hashes=hashes)
