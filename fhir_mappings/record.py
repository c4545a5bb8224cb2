"""Small readers over fhir.resources objects: entries of a Bundle, text of a concept, clinical status."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC
from datetime import date
from datetime import datetime
from typing import Any

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
EPOCH = datetime(1, 1, 1, tzinfo=UTC)
ACTIVE_CLINICAL_STATUSES = {"active", "recurrence", "relapse"}


def bundle_resources(bundle: Any, resource_type: str) -> list[Any]:
    """Return the resources of ``resource_type`` in a Bundle (or the resource itself); [] for None."""
    if bundle is None:
        return []
    if bundle.get_resource_type() == resource_type:
        return [bundle]
    if bundle.get_resource_type() != "Bundle":
        return []
    return [
        entry.resource
        for entry in bundle.entry or []
        if entry.resource is not None and entry.resource.get_resource_type() == resource_type
    ]


def concept_text(concept: Any) -> str:
    """Return the human text of a CodeableConcept: its text, else the first coding's display or code."""
    if concept is None:
        return ""
    if concept.text:
        return str(concept.text)
    for coding in concept.coding or []:
        if coding.display or coding.code:
            return str(coding.display or coding.code)
    return ""


def concept_codes(concept: Any, system: str | None = None) -> set[str]:
    """Return the codes of a CodeableConcept, optionally only those of one code system."""
    if concept is None:
        return set()
    return {c.code for c in concept.coding or [] if c.code and (system is None or c.system == system)}


def status_code(concept: Any) -> str | None:
    """Return the first code of a status CodeableConcept (clinicalStatus, verificationStatus)."""
    codes = [c.code for c in (concept.coding or [])] if concept is not None else []
    return codes[0] if codes else None


def active_conditions(bundle: Any) -> list[Any]:
    """Return Conditions whose clinicalStatus is active, recurrence or relapse."""
    return [
        c
        for c in bundle_resources(bundle, "Condition")
        if status_code(c.clinicalStatus) in ACTIVE_CLINICAL_STATUSES
    ]


def active_medication_requests(bundle: Any) -> list[Any]:
    """Return MedicationRequests with status active."""
    return [m for m in bundle_resources(bundle, "MedicationRequest") if m.status == "active"]


def active_allergies(bundle: Any) -> list[Any]:
    """Return AllergyIntolerances that are active (no clinicalStatus counts as active) and not refuted."""
    return [
        a
        for a in bundle_resources(bundle, "AllergyIntolerance")
        if status_code(a.clinicalStatus) in (None, "active")
        and status_code(a.verificationStatus) not in ("refuted", "entered-in-error")
    ]


def medication_concept(request: Any) -> Any:
    """Return the CodeableConcept a MedicationRequest orders (a contained Medication is not read)."""
    return request.medicationCodeableConcept


def reference(resource: Any) -> str:
    """Return ``Type/id`` for a resource."""
    return f"{resource.get_resource_type()}/{resource.id}"


def markdown_list(items: Iterable[str]) -> str:
    """Return a markdown bullet list, or ``_none_``."""
    lines = [f"- {item}" for item in items]
    return "\n".join(lines) if lines else "_none_"


def as_instant(value: Any) -> datetime | None:
    """Return a FHIR date/dateTime/instant as an aware datetime (a date is its midnight UTC), or None.

    Comparing instants, not their text, keeps "04:00-05:00" after "01:00Z".
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
