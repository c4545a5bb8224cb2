"""Lean, tolerant read models of inbound FHIR R4: only the elements our handlers read.

Inbound FHIR (prefetch, ``draftOrders``, reads from ``fhirServer``) is read the way HAPI's lenient parser
reads it: unknown elements are ignored, a single value where a list belongs is wrapped, a list where a single
value belongs gives its first item, and an element that can't be read (wrong JSON type, a code that is not a
string) is dropped as if absent. Every such repair is counted by kind in the ``tolerated`` Counter passed to
:func:`read_resource`, so ``/metrics`` can show how far clients stray from R4 without logging any content.
Dates stay strings: a partial date such as ``"1970"`` is valid FHIR and must never crash a reader.

What we write (DiagnosticReport, Provenance) is built strictly with fhir.resources in ``reports.py``.
"""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from typing import Annotated
from typing import Any
from typing import TypeVar

from pydantic import BaseModel
from pydantic import BeforeValidator
from pydantic import ConfigDict
from pydantic import ValidationError
from pydantic import ValidationInfo
from pydantic import ValidatorFunctionWrapHandler
from pydantic import WrapValidator
from pydantic import model_validator
from typing_extensions import TypeAliasType

#: Kinds of repair counted while reading (the ``kind`` label of the metric).
SINGLE_AS_LIST = "single-value-as-list"
LIST_AS_SINGLE = "list-as-single-value"
INVALID_DROPPED = "invalid-element-dropped"
NUMBER_AS_STRING = "number-as-string"
UNKNOWN_RESOURCE_TYPE = "unknown-resource-type"

T = TypeVar("T")


def _note(info: ValidationInfo, kind: str) -> None:
    if isinstance(info.context, dict) and isinstance(info.context.get("tolerated"), Counter):
        info.context["tolerated"][kind] += 1


def _text(value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
    # The common case first, with no further call: this runs for every string element of every resource.
    if type(value) is str or value is None:
        return value
    if isinstance(value, list):
        _note(info, LIST_AS_SINGLE)
        return _text(value[0] if value else None, handler, info)
    if isinstance(value, int | float) and not isinstance(value, bool):
        _note(info, NUMBER_AS_STRING)
        return str(value)
    _note(info, INVALID_DROPPED)
    return None


def _one(value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
    if isinstance(value, list):
        _note(info, LIST_AS_SINGLE)
        value = value[0] if value else None
    if value is None:
        return None
    # An unreadable element is dropped, not fatal: the reader sees it as absent (HAPI's lenient parsing).
    try:
        return handler(value)
    except ValidationError:
        _note(info, INVALID_DROPPED)
        return None


def _many(value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
    if value is None:
        return []
    if not isinstance(value, list):
        _note(info, SINGLE_AS_LIST)
        value = [value]
    try:
        # A contained resource or Bundle entry that isn't a resource is read as None: leave it out.
        return [item for item in handler(value) if item is not None]
    except ValidationError:
        pass
    # Only when some item can't be read: keep the items that can, one by one.
    kept = []
    for item in value:
        try:
            kept += [read for read in handler([item]) if read is not None]
        except ValidationError:
            _note(info, INVALID_DROPPED)
    return kept


#: Zero or more values: a single value is wrapped, unreadable items are dropped, absent is ``[]``.
Many = TypeAliasType("Many", Annotated[list[T], WrapValidator(_many)], type_params=(T,))
#: At most one value: a list gives its first item, an unreadable value is None.
One = TypeAliasType("One", Annotated[T | None, WrapValidator(_one)], type_params=(T,))
#: A FHIR string-like primitive (string, code, uri, id, date, dateTime, instant): a number is read as text.
Text = Annotated[str | None, WrapValidator(_text)]


class Element(BaseModel):
    """Base of every read model: unknown elements ignored, missing ones None."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=False)


class Coding(Element):
    """A FHIR Coding."""

    system: Text = None
    code: Text = None
    display: Text = None


class CodeableConcept(Element):
    """A FHIR CodeableConcept: every coding and the text."""

    coding: Many[Coding] = []
    text: Text = None


class Reference(Element):
    """A FHIR Reference (literal reference and display)."""

    reference: Text = None
    display: Text = None


class Period(Element):
    """A FHIR Period."""

    start: Text = None
    end: Text = None


class Quantity(Element):
    """A FHIR Quantity."""

    value: One[Decimal] = None
    comparator: Text = None
    unit: Text = None
    code: Text = None


class Attachment(Element):
    """A FHIR Attachment: inline base64 ``data`` or a ``url``."""

    contentType: Text = None
    data: Text = None
    url: Text = None
    title: Text = None


class HumanName(Element):
    """A FHIR HumanName."""

    text: Text = None
    family: Text = None
    given: Many[str] = []


class TimingRepeat(Element):
    """Timing.repeat: how often (``frequency`` times per ``period`` ``periodUnit``)."""

    frequency: One[int] = None
    frequencyMax: One[int] = None
    period: One[Decimal] = None
    periodMax: One[Decimal] = None
    periodUnit: Text = None


class Timing(Element):
    """A FHIR Timing: its repeat rule and its code (BID, TID, ...)."""

    repeat: One[TimingRepeat] = None
    code: One[CodeableConcept] = None


class DoseAndRate(Element):
    """Dosage.doseAndRate: the amount given each time."""

    doseQuantity: One[Quantity] = None


class Dosage(Element):
    """A FHIR Dosage (its text is what a reviewer and the model read; dose and timing for dose limits)."""

    text: Text = None
    timing: One[Timing] = None
    doseAndRate: Many[DoseAndRate] = []
    route: One[CodeableConcept] = None


def _resource_or_none(value: Any, info: ValidationInfo) -> Any:
    context = info.context if isinstance(info.context, dict) else {}
    try:
        return read_resource(value, context.get("tolerated"))
    except ValueError:
        _note(info, INVALID_DROPPED)
        return None


class Resource(Element):
    """Any FHIR resource: its type and id (types we don't read are kept as this)."""

    resourceType: str
    id: Text = None
    # Contained resources are read by their own type (a MedicationRequest's contained Medication).
    contained: Many[Annotated[Any, BeforeValidator(_resource_or_none)]] = []

    def get_resource_type(self) -> str:
        """Return the resourceType (the name fhir.resources uses too)."""
        return self.resourceType


class Patient(Resource):
    """Patient: what a card, a prompt and the review page show (sex, birth date, name)."""

    gender: Text = None
    birthDate: Text = None
    name: Many[HumanName] = []


class Condition(Resource):
    """Condition: an active problem."""

    clinicalStatus: One[CodeableConcept] = None
    verificationStatus: One[CodeableConcept] = None
    code: One[CodeableConcept] = None
    onsetDateTime: Text = None
    recordedDate: Text = None


class MedicationIngredient(Element):
    """Medication.ingredient: what a product contains."""

    itemCodeableConcept: One[CodeableConcept] = None
    itemReference: One[Reference] = None


class Medication(Resource):
    """Medication: the product a request may reference instead of naming a concept."""

    code: One[CodeableConcept] = None
    ingredient: Many[MedicationIngredient] = []


class MedicationRequest(Resource):
    """MedicationRequest: a draft order or an active prescription."""

    status: Text = None
    intent: Text = None
    medicationCodeableConcept: One[CodeableConcept] = None
    medicationReference: One[Reference] = None
    authoredOn: Text = None
    dosageInstruction: Many[Dosage] = []


class AllergyReaction(Element):
    """AllergyIntolerance.reaction: a substance may be named here rather than in ``code``."""

    substance: One[CodeableConcept] = None
    manifestation: Many[CodeableConcept] = []
    severity: Text = None


class AllergyIntolerance(Resource):
    """AllergyIntolerance: the substance, how critical, whether active."""

    clinicalStatus: One[CodeableConcept] = None
    verificationStatus: One[CodeableConcept] = None
    type: Text = None
    criticality: Text = None
    category: Many[str] = []
    code: One[CodeableConcept] = None
    reaction: Many[AllergyReaction] = []


class ObservationComponent(Element):
    """Observation.component (blood pressure's systolic and diastolic)."""

    code: One[CodeableConcept] = None
    valueQuantity: One[Quantity] = None


class Observation(Resource):
    """Observation: a lab or a vital sign."""

    status: Text = None
    code: One[CodeableConcept] = None
    effectiveDateTime: Text = None
    effectiveInstant: Text = None
    effectivePeriod: One[Period] = None
    issued: Text = None
    valueQuantity: One[Quantity] = None
    valueCodeableConcept: One[CodeableConcept] = None
    valueString: Text = None
    component: Many[ObservationComponent] = []


class Meta(Element):
    """Resource.meta: the version a change of content shows in."""

    versionId: Text = None
    lastUpdated: Text = None


class Identifier(Element):
    """A FHIR Identifier."""

    system: Text = None
    value: Text = None


class ImagingInstance(Element):
    """ImagingStudy.series.instance: its SOP Instance UID, number and SOP class."""

    uid: Text = None
    number: One[int] = None
    sopClass: One[Coding] = None


class ImagingSeries(Element):
    """ImagingStudy.series: UID, modality, body site, the PACS endpoint that holds it, its instances."""

    uid: Text = None
    number: One[int] = None
    modality: One[Coding] = None
    bodySite: One[Coding] = None
    description: Text = None
    endpoint: Many[Reference] = []
    instance: Many[ImagingInstance] = []


class ImagingStudy(Resource):
    """ImagingStudy: a study that may need a report, and where its images are (``endpoint``)."""

    meta: One[Meta] = None
    identifier: Many[Identifier] = []
    status: Text = None
    subject: One[Reference] = None
    started: Text = None
    endpoint: Many[Reference] = []
    series: Many[ImagingSeries] = []


class Endpoint(Resource):
    """Endpoint: a PACS's DICOMweb root (``connectionType`` dicom-wado-rs, ``address``)."""

    status: Text = None
    connectionType: One[Coding] = None
    address: Text = None


class Media(Resource):
    """Media (R4): an image attachment, possibly part of an ImagingStudy."""

    meta: One[Meta] = None
    status: Text = None
    subject: One[Reference] = None
    content: One[Attachment] = None
    partOf: Many[Reference] = []
    createdDateTime: Text = None
    issued: Text = None


class DocumentContent(Element):
    """DocumentReference.content."""

    attachment: One[Attachment] = None


class DocumentContext(Element):
    """DocumentReference.context: ``related`` may name the ImagingStudy."""

    related: Many[Reference] = []


class DocumentReference(Resource):
    """DocumentReference: a document whose attachment may be an image."""

    meta: One[Meta] = None
    status: Text = None
    subject: One[Reference] = None
    date: Text = None
    content: Many[DocumentContent] = []
    context: One[DocumentContext] = None


class DiagnosticReportMedia(Element):
    """DiagnosticReport.media."""

    link: One[Reference] = None


class DiagnosticReport(Resource):
    """DiagnosticReport: a report covering studies and images."""

    status: Text = None
    subject: One[Reference] = None
    code: One[CodeableConcept] = None
    imagingStudy: Many[Reference] = []
    media: Many[DiagnosticReportMedia] = []


class AppointmentParticipant(Element):
    """Appointment.participant: who takes part (a Patient, a Practitioner, a Location) and their answer."""

    actor: One[Reference] = None
    status: Text = None


class Appointment(Resource):
    """Appointment: a booked visit (``appointment-book`` context, the day's schedule swept for precompute)."""

    status: Text = None
    start: Text = None
    participant: Many[AppointmentParticipant] = []


class OperationOutcomeIssue(Element):
    """OperationOutcome.issue: how bad, and what."""

    severity: Text = None
    code: Text = None


class OperationOutcome(Resource):
    """OperationOutcome: in a search Bundle (search mode ``outcome``) it can say the answer is incomplete."""

    issue: Many[OperationOutcomeIssue] = []


class BundleSearch(Element):
    """Bundle.entry.search: ``mode`` tells a match from an included resource or an outcome."""

    mode: Text = None


class BundleEntry(Element):
    """Bundle.entry: the resource, read by its own type.

    ``unreadable`` marks an entry whose resource is there but is not a FHIR resource at all, so a safety
    check can say that part of a list could not be read.
    """

    fullUrl: Text = None
    resource: Annotated[Any, BeforeValidator(_resource_or_none)] = None
    search: One[BundleSearch] = None
    unreadable: bool = False

    @model_validator(mode="before")
    @classmethod
    def _mark_unreadable(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("resource") is not None and not is_resource(data["resource"]):
            return {**data, "unreadable": True}
        return data


class BundleLink(Element):
    """Bundle.link: a search answer's ``next`` page, if the server paged it."""

    relation: Text = None
    url: Text = None


class Bundle(Resource):
    """Bundle: a search answer or the ``draftOrders`` of an order hook (whose ``type`` clients omit)."""

    type: Text = None
    total: One[int] = None
    link: Many[BundleLink] = []
    entry: Many[BundleEntry] = []


READ_MODELS: dict[str, type[Resource]] = {
    model.__name__: model
    for model in (
        Patient,
        Condition,
        Medication,
        MedicationRequest,
        AllergyIntolerance,
        Observation,
        ImagingStudy,
        Endpoint,
        Media,
        DocumentReference,
        DiagnosticReport,
        Appointment,
        OperationOutcome,
        Bundle,
    )
}


def is_resource(data: Any) -> bool:
    """Return True when JSON is a FHIR resource at all: an object with a type name as resourceType."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("resourceType"), str)
        and data["resourceType"].isalpha()
    )


def read_resource(data: Any, tolerated: Counter[str] | None = None) -> Resource:
    """Return the read model of a resource's JSON; ValueError only when it is not a FHIR resource at all.

    ``tolerated`` (if given) counts each repair made while reading, by kind.
    """
    if isinstance(data, Resource):
        return data
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("resourceType"), str)
        or not data["resourceType"]
    ):
        raise ValueError("not a FHIR resource (no resourceType)")
    if not data["resourceType"].isalpha():
        raise ValueError("not a FHIR resource (resourceType is not a type name)")
    model = READ_MODELS.get(data["resourceType"])
    if model is None:
        if tolerated is not None:
            tolerated[UNKNOWN_RESOURCE_TYPE] += 1
        model = Resource
    return model.model_validate(data, context={"tolerated": tolerated})
