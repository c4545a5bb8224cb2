"""Small readers over the read models: entries of a Bundle, text of a concept, status, medication."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC
from datetime import date
from datetime import datetime
from typing import Any

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
EPOCH = datetime(1, 1, 1, tzinfo=UTC)
_PARTIAL_DATE = re.compile(r"\d{4}(-\d{2})?")
HL7_TERMINOLOGY = "http://terminology.hl7.org/CodeSystem/"
ACTIVE_CLINICAL_STATUSES = {"active", "recurrence", "relapse"}
CONDITION_CLINICAL_STATUSES = ACTIVE_CLINICAL_STATUSES | {"inactive", "remission", "resolved"}
ALLERGY_CLINICAL_STATUSES = {"active", "inactive", "resolved"}
VERIFICATION_STATUSES = {
    "unconfirmed",
    "confirmed",
    "refuted",
    "entered-in-error",
    "provisional",
    "differential",
}


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
        for entry in bundle.entry
        if entry.resource is not None and entry.resource.get_resource_type() == resource_type
    ]


def incomplete_list(bundle: Any) -> str | None:
    """Return why a search Bundle can't be taken as the whole list, or None when nothing says so.

    Entries that are not FHIR resources were lost in reading; an OperationOutcome with an error or fatal
    issue is the server saying the search failed (a warning, such as Epic's "may not contain the entire
    record", is not taken as a failure); a ``next`` link or a ``total`` above the matches sent means the
    list came in pages and only the first is here.
    """
    if bundle is None or bundle.get_resource_type() != "Bundle":
        return None
    unreadable = sum(1 for entry in bundle.entry if entry.unreadable)
    if unreadable:
        return f"{unreadable} entr{'y' if unreadable == 1 else 'ies'} of it could not be read"
    for outcome in bundle_resources(bundle, "OperationOutcome"):
        if any((issue.severity or "").lower() in ("error", "fatal") for issue in outcome.issue):
            return "the FHIR server answered the search with an error"
    matches = sum(
        1
        for entry in bundle.entry
        if entry.resource is not None
        and entry.resource.get_resource_type() != "OperationOutcome"
        and (entry.search is None or (entry.search.mode or "match") == "match")
    )
    if any((link.relation or "").lower() == "next" and link.url for link in bundle.link):
        return f"it came in pages and only the first ({matches} entries) was read"
    if bundle.total is not None and bundle.total > matches:
        return f"it holds {matches} of {bundle.total} entries (the rest are on other pages)"
    return None


def concept_text(concept: Any) -> str:
    """Return the human text of a CodeableConcept: its text, else the first coding's display or code."""
    if concept is None:
        return ""
    if concept.text:
        return str(concept.text)
    for coding in concept.coding:
        if coding.display or coding.code:
            return str(coding.display or coding.code)
    return ""


def concept_codes(concept: Any, system: str | None = None) -> set[str]:
    """Return the codes of a CodeableConcept, optionally only those of one code system."""
    if concept is None:
        return set()
    return {c.code for c in concept.coding if c.code and (system is None or c.system == system)}


def status_code(concept: Any, known: Iterable[str] = ()) -> str | None:
    """Return the status code of a status CodeableConcept (clinicalStatus, verificationStatus).

    Clients put a local coding first and HL7's second: the coding in an HL7 terminology system wins, then
    the first code among ``known``, then the text when it is a known code, then the first code.
    """
    if concept is None:
        return None
    codings = [c for c in concept.coding if c.code]
    for coding in codings:
        if (coding.system or "").startswith(HL7_TERMINOLOGY):
            return coding.code.strip().lower()
    wanted = set(known)
    for coding in codings:
        if coding.code.strip().lower() in wanted:
            return coding.code.strip().lower()
    if concept.text and concept.text.strip().lower() in wanted:
        return concept.text.strip().lower()
    return codings[0].code.strip().lower() if codings else None


def active_conditions(bundle: Any) -> list[Any]:
    """Return Conditions whose clinicalStatus is active, recurrence or relapse."""
    return [
        c
        for c in bundle_resources(bundle, "Condition")
        if status_code(c.clinicalStatus, CONDITION_CLINICAL_STATUSES) in ACTIVE_CLINICAL_STATUSES
    ]


def active_medication_requests(bundle: Any) -> list[Any]:
    """Return MedicationRequests with status active."""
    return [m for m in bundle_resources(bundle, "MedicationRequest") if (m.status or "").lower() == "active"]


def active_allergies(bundle: Any) -> list[Any]:
    """Return AllergyIntolerances that are active and not refuted.

    No clinicalStatus, or one this service can't read, counts as active: a safety check must not drop an
    allergy because of how its status was coded.
    """
    return [
        a
        for a in bundle_resources(bundle, "AllergyIntolerance")
        if status_code(a.clinicalStatus, ALLERGY_CLINICAL_STATUSES) not in ("inactive", "resolved")
        and status_code(a.verificationStatus, VERIFICATION_STATUSES) not in ("refuted", "entered-in-error")
    ]


def resolve_medication(request: Any, bundle: Any = None) -> Any | None:
    """Return the Medication a MedicationRequest's ``medicationReference`` points at, or None.

    Looked up among the request's contained resources (``#id``), then the entries of ``bundle`` (by
    ``Medication/id``, or by an entry's ``fullUrl`` such as ``urn:uuid:...``).
    """
    target = request.medicationReference.reference if request.medicationReference else None
    if not target:
        return None
    if target.startswith("#"):
        return next(
            (r for r in request.contained if r.get_resource_type() == "Medication" and r.id == target[1:]),
            None,
        )
    for entry in bundle.entry if bundle is not None and bundle.get_resource_type() == "Bundle" else []:
        resource = entry.resource
        if resource is None or resource.get_resource_type() != "Medication":
            continue
        if (
            target == entry.fullUrl
            or target == reference(resource)
            or target.endswith("/" + reference(resource))
        ):
            return resource
    return None


def medication_concept(request: Any, bundle: Any = None) -> Any:
    """Return the CodeableConcept a MedicationRequest orders: its own, else its resolved Medication's code."""
    if request.medicationCodeableConcept is not None:
        return request.medicationCodeableConcept
    medication = resolve_medication(request, bundle)
    return medication.code if medication is not None else None


def medication_text(request: Any, bundle: Any = None) -> str:
    """Return the name of what a MedicationRequest orders (concept, Medication, or reference display)."""
    name = concept_text(medication_concept(request, bundle))
    if not name and request.medicationReference is not None:
        name = request.medicationReference.display or ""
    return name


def reference(resource: Any) -> str:
    """Return ``Type/id`` for a resource."""
    return f"{resource.get_resource_type()}/{resource.id}"


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
    text = str(value).strip()
    # FHIR date and dateTime allow a year or a year-month alone: read them as their first day.
    if _PARTIAL_DATE.fullmatch(text):
        text = (text + "-01-01")[:10]
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
