"""pydantic models of the CDS Hooks 2.0 wire format (https://cds-hooks.hl7.org/2.0/).

Inbound models ignore unknown fields (a new optional context field is a minor hook change, §Hooks versioning)
but keep required fields required. Outbound models enforce the card rules and serialise without null or
empty values (§CDS Service Response: "no null or empty values"), except the top-level ``cards`` list.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from dataclasses import dataclass
from dataclasses import field
from datetime import date
from datetime import datetime
from typing import TYPE_CHECKING
from typing import Any
from typing import Literal
from typing import Protocol

from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import SecretStr
from pydantic import field_serializer
from pydantic import field_validator
from pydantic import model_validator
from pydantic.alias_generators import to_camel

if TYPE_CHECKING:
    from fhir_mappings.images import ImageSource

FHIR_REFERENCE = r"^(Practitioner|PractitionerRole|Patient|RelatedPerson)/[A-Za-z0-9\-\.]{1,64}$"
FHIR_ID = r"^[A-Za-z0-9\-\.]{1,64}$"


def strip_empty(value: Any) -> Any:
    """Return ``value`` with None, empty lists and empty dicts removed at every depth."""
    if isinstance(value, dict):
        cleaned = {k: strip_empty(v) for k, v in value.items()}
        return {k: v for k, v in cleaned.items() if v is not None and v != [] and v != {}}
    if isinstance(value, list):
        return [strip_empty(v) for v in value if v is not None]
    return value


class WireModel(BaseModel):
    """Base of every wire model: camelCase aliases, population by field name, unknown fields ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def wire(self) -> dict[str, Any]:
        """Return the JSON-ready dict as the spec spells it, with no null or empty values."""
        return strip_empty(self.model_dump(mode="json", by_alias=True, exclude_none=True))


# --- Request (§HTTP Request) -----------------------------------------------------------------------


class FhirAuthorization(BaseModel):
    """OAuth 2.0 access token the EHR grants for ``fhirServer`` (§FHIR Resource Access), snake_case."""

    model_config = ConfigDict(extra="ignore")

    access_token: SecretStr
    # Read tolerantly (only the token is used): the type in any case ("bearer" as RFC 6749 examples write
    # it), and subject, scope and expiry optional, so a grant an EHR words differently never costs a check.
    token_type: str = "Bearer"
    expires_in: int | None = Field(default=None, ge=0)
    scope: str | None = None
    subject: str | None = None
    patient: str | None = None

    @field_validator("token_type")
    @classmethod
    def _bearer_in_any_case(cls, value: str) -> str:
        if value.strip().lower() != "bearer":
            raise ValueError("token_type must be Bearer")
        return "Bearer"


class PatientViewContext(WireModel):
    """Context of ``patient-view`` 1.0 (https://cds-hooks.org/hooks/patient-view/)."""

    user_id: str = Field(pattern=FHIR_REFERENCE)
    patient_id: str = Field(pattern=FHIR_ID)
    encounter_id: str | None = Field(default=None, pattern=FHIR_ID)


class OrderSignContext(WireModel):
    """Context of ``order-sign`` 1.0 (https://cds-hooks.org/hooks/order-sign/): orders about to be signed."""

    user_id: str = Field(pattern=FHIR_REFERENCE)
    patient_id: str = Field(pattern=FHIR_ID)
    encounter_id: str | None = Field(default=None, pattern=FHIR_ID)
    draft_orders: dict[str, Any]

    @field_validator("draft_orders")
    @classmethod
    def _draft_orders_is_bundle(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("resourceType") != "Bundle":
            raise ValueError("draftOrders must be a FHIR Bundle")
        return value


class OrderSelectContext(OrderSignContext):
    """Context of ``order-select`` 1.0 (https://cds-hooks.org/hooks/order-select/): order-sign's plus the
    orders the clinician just selected."""

    selections: list[str] = Field(min_length=1)


class AppointmentBookContext(WireModel):
    """Context of ``appointment-book`` 1.0 (https://cds-hooks.org/hooks/appointment-book/): the appointments
    being booked, as a Bundle read tolerantly like ``draftOrders``."""

    user_id: str = Field(pattern=FHIR_REFERENCE)
    patient_id: str = Field(pattern=FHIR_ID)
    encounter_id: str | None = Field(default=None, pattern=FHIR_ID)
    appointments: dict[str, Any]

    @field_validator("appointments")
    @classmethod
    def _appointments_is_bundle(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("resourceType") != "Bundle":
            raise ValueError("appointments must be a FHIR Bundle")
        return value


class EncounterStartContext(WireModel):
    """Context of ``encounter-start`` 1.0 (https://cds-hooks.org/hooks/encounter-start/): a check-in."""

    user_id: str = Field(pattern=FHIR_REFERENCE)
    patient_id: str = Field(pattern=FHIR_ID)
    encounter_id: str = Field(pattern=FHIR_ID)


HookContext = (
    PatientViewContext
    | OrderSelectContext
    | OrderSignContext
    | AppointmentBookContext
    | EncounterStartContext
)

#: Hooks this service understands, with the context model each one carries.
HOOK_CONTEXTS: dict[str, type[HookContext]] = {
    "patient-view": PatientViewContext,
    "order-select": OrderSelectContext,
    "order-sign": OrderSignContext,
    "appointment-book": AppointmentBookContext,
    "encounter-start": EncounterStartContext,
}


class HookRequest(WireModel):
    """Body of ``POST {base}/cds-services/{id}``; ``context`` is validated per hook afterwards."""

    hook: str = Field(min_length=1, max_length=64)
    hook_instance: uuid.UUID
    fhir_server: str | None = Field(default=None, max_length=2048)
    fhir_authorization: FhirAuthorization | None = None
    context: dict[str, Any]
    prefetch: dict[str, dict[str, Any] | None] | None = None

    @model_validator(mode="after")
    def _authorization_needs_server(self) -> HookRequest:
        # §HTTP Request: fhirServer is "Conditional: MUST be present if fhirAuthorization is present".
        if self.fhir_authorization is not None and not self.fhir_server:
            raise ValueError("fhirServer is required when fhirAuthorization is sent")
        return self


# --- Response (§CDS Service Response) --------------------------------------------------------------


class Coding(WireModel):
    """A FHIR Coding as cards use it (topic, overrideReasons): ``code`` required."""

    code: str = Field(min_length=1)
    system: str | None = None
    display: str | None = None


class OverrideReason(Coding):
    """A reason a clinician may pick to override a card; the spec asks for a human-readable ``display``."""

    display: str = Field(min_length=1)


class Source(WireModel):
    """Who produced the card (§Source); ``label`` is what the clinician sees."""

    label: str = Field(min_length=1)
    url: str | None = None
    icon: str | None = None
    topic: Coding | None = None


class Action(WireModel):
    """A change to the record (§Action): create/update carry a resource, delete a ``resourceId``."""

    type: Literal["create", "update", "delete"]
    description: str = Field(min_length=1)
    resource: dict[str, Any] | None = None
    resource_id: str | None = None

    @model_validator(mode="after")
    def _payload_matches_type(self) -> Action:
        if self.type in ("create", "update") and not self.resource:
            raise ValueError(f"a {self.type} action needs a resource")
        if self.type == "delete" and not self.resource_id:
            raise ValueError("a delete action needs a resourceId")
        return self


class Suggestion(WireModel):
    """A set of actions a clinician can accept in one click (§Suggestion)."""

    label: str = Field(min_length=1)
    uuid: str = Field(default_factory=lambda: str(uuid.uuid4()))
    is_recommended: bool | None = None
    actions: list[Action] = Field(default_factory=list)


class Link(WireModel):
    """A link to a reference page or a SMART app (§Link)."""

    label: str = Field(min_length=1)
    url: str = Field(min_length=1)
    type: Literal["absolute", "smart"]
    app_context: str | None = None
    autolaunchable: bool | None = None

    @model_validator(mode="after")
    def _app_context_only_for_smart(self) -> Link:
        # §Link: appContext "MUST only be used when the link type is smart".
        if self.app_context is not None and self.type != "smart":
            raise ValueError("appContext is only allowed on smart links")
        return self


class Card(WireModel):
    """One CDS card (§Card Attributes)."""

    uuid: str = Field(default_factory=lambda: str(uuid.uuid4()))
    # §Card: "summary ... SHOULD be less than 140 characters".
    summary: str = Field(min_length=1, max_length=139)
    detail: str | None = None
    indicator: Literal["info", "warning", "critical"]
    source: Source
    suggestions: list[Suggestion] = Field(default_factory=list)
    selection_behavior: Literal["at-most-one", "any"] | None = None
    override_reasons: list[OverrideReason] = Field(default_factory=list)
    links: list[Link] = Field(default_factory=list)

    @model_validator(mode="after")
    def _selection_behavior_with_suggestions(self) -> Card:
        # §Card: selectionBehavior "MUST be provided if a card contains suggestions".
        if self.suggestions and self.selection_behavior is None:
            raise ValueError("selectionBehavior is required when suggestions are present")
        if not self.suggestions and self.selection_behavior is not None:
            raise ValueError("selectionBehavior is only meaningful with suggestions")
        return self


class HookResponse(WireModel):
    """Body of a hook answer: cards (possibly empty) and optional systemActions."""

    cards: list[Card] = Field(default_factory=list)
    system_actions: list[Action] = Field(default_factory=list)

    def wire(self) -> dict[str, Any]:
        """Return the JSON body; ``cards`` stays even when empty (the spec's "nothing to say")."""
        body = super().wire()
        body["cards"] = body.get("cards", [])
        return body


# --- Discovery (§Discovery) ------------------------------------------------------------------------


class ServiceDescriptor(WireModel):
    """One entry of ``GET /cds-services``."""

    hook: str
    title: str | None = None
    description: str
    id: str
    prefetch: dict[str, str] = Field(default_factory=dict)
    usage_requirements: str | None = None
    potentially_long_running: bool | None = None


class DiscoveryResponse(WireModel):
    """Body of ``GET /cds-services``."""

    services: list[ServiceDescriptor]

    def wire(self) -> dict[str, Any]:
        """Return the JSON body; ``services`` stays even when empty."""
        body = super().wire()
        body["services"] = body.get("services", [])
        return body


# --- Feedback (§Feedback) --------------------------------------------------------------------------


class AcceptedSuggestion(WireModel):
    """The ``id`` of a suggestion the clinician accepted (its ``uuid`` in the card)."""

    id: str = Field(min_length=1, max_length=128)


class OverrideReasonFeedback(WireModel):
    """Why a card was overridden: one of the card's overrideReasons and/or a free-text comment."""

    reason: Coding | None = None
    user_comment: str | None = Field(default=None, max_length=2000)


class FeedbackItem(WireModel):
    """What happened to one card (§Feedback)."""

    card: str = Field(min_length=1, max_length=128)
    outcome: Literal["accepted", "overridden"]
    accepted_suggestions: list[AcceptedSuggestion] = Field(default_factory=list)
    override_reason: OverrideReasonFeedback | None = None
    outcome_timestamp: datetime

    @model_validator(mode="after")
    def _consistent_outcome(self) -> FeedbackItem:
        if self.outcome == "overridden" and self.accepted_suggestions:
            raise ValueError("acceptedSuggestions is only allowed when outcome is accepted")
        if self.outcome == "accepted" and self.override_reason is not None:
            raise ValueError("overrideReason is only allowed when outcome is overridden")
        return self


class FeedbackRequest(WireModel):
    """Body of ``POST {base}/cds-services/{id}/feedback``."""

    feedback: list[FeedbackItem] = Field(min_length=1, max_length=100)


# --- Model jobs (API ↔ worker) -------------------------------------------------------------------

JobState = Literal["queued", "running", "done", "failed"]
ModelTask = Literal["patient-summary", "imaging-read", "order-review"]
ModelRole = Literal["text", "image"]


class DicomInstanceRef(BaseModel):
    """An instance an ImagingStudy lists: SOP Instance UID, number, SOP class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uid: str = Field(max_length=64)
    number: int | None = None
    sop_class: str | None = Field(default=None, max_length=64)


class DicomSeriesRef(BaseModel):
    """A series an ImagingStudy lists: UID, modality, body part, and its instances (may be none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uid: str = Field(max_length=64)
    number: int | None = None
    modality: str | None = Field(default=None, max_length=16)
    body_site: str | None = Field(default=None, max_length=128)
    instances: list[DicomInstanceRef] = Field(default_factory=list, max_length=10_000)


class ImageReference(BaseModel):
    """Where the image of a model job is, for the worker to fetch and decode (the API decodes nothing).

    One of: ``data_b64`` (an attachment's inline data as received), ``url`` (an attachment URL, absolute),
    or ``study_uid`` with a DICOMweb endpoint (``endpoint_address`` when the record held the Endpoint,
    else ``endpoint_ref`` for the worker to read from ``fhir_server``). ``content_hash`` names the image's
    content (the data as received; the URL and its resource's version; the study UID and its instance
    list) and is what the job id hashes. ``access_token`` is the EHR's bearer token, sent only to
    ``fhir_server``'s own origin; it reaches the worker only inside the encrypted job request (see
    ``jobs.JobStore``), is never hashed into the job id, and goes when the request is deleted.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    content_hash: str = Field(max_length=64)
    resource: str = Field(max_length=128)
    content_type: str = Field(default="", max_length=128)
    data_b64: str | None = None
    url: str | None = Field(default=None, max_length=4096)
    study_uid: str | None = Field(default=None, max_length=64)
    endpoint_address: str | None = Field(default=None, max_length=4096)
    endpoint_ref: str | None = Field(default=None, max_length=256)
    series: list[DicomSeriesRef] = Field(default_factory=list, max_length=1000)
    fhir_server: str | None = Field(default=None, max_length=4096)
    access_token: SecretStr | None = None

    @field_serializer("access_token", when_used="json")
    def _reveal_token(self, token: SecretStr | None) -> str | None:
        # Serialised only into the job request, which JobStore encrypts before it reaches Redis.
        return token.get_secret_value() if token else None


class ModelJobRequest(BaseModel):
    """What a worker needs to run one model task: the prompts, and references to images it fetches itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service_id: str
    task: ModelTask
    role: ModelRole
    model: str
    revision: str | None = None
    system_prompt: str = Field(max_length=8_000)
    user_prompt: str = Field(max_length=64_000)
    images: list[ImageReference] = Field(default_factory=list, max_length=4)
    evidence: list[str] = Field(default_factory=list, max_length=256)
    input_hashes: list[str] = Field(default_factory=list, max_length=256)
    max_new_tokens: int = Field(ge=16, le=8192)

    def job_id(self) -> str:
        """Return the idempotency key: a hash of service, task, model, prompts and input content hashes."""
        material = {
            "service": self.service_id,
            "task": self.task,
            "model": self.model,
            "revision": self.revision,
            "system": self.system_prompt,
            "user": self.user_prompt,
            "images": [image.content_hash for image in self.images],
            "inputs": sorted(self.input_hashes),
            "max_new_tokens": self.max_new_tokens,
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:40]


class JobRecord(BaseModel):
    """A job's public state, as ``GET /jobs/{id}`` shows it (the request's data stays internal)."""

    id: str
    service_id: str
    task: str
    state: JobState
    attempts: int = 0
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    model: str | None = None
    model_version: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    generated_tokens: int | None = None
    seconds: float | None = None
    # Read live while the job waits (``job_progress.with_progress``), never stored: how many live workers
    # serve its queue (0: the AI is unavailable), how many jobs are ahead of it, and the expected wait.
    workers: int | None = None
    ahead: int | None = None
    expected_wait_s: float | None = None
    #: What was cut: free-text fields that fill their length limit (done), or ``max_new_tokens`` (failed).
    truncated: list[str] | None = None

    def wire(self) -> dict[str, Any]:
        """Return the JSON body without null fields."""
        return self.model_dump(mode="json", exclude_none=True)


# --- What a handler receives -----------------------------------------------------------------------


class ModelJobs(Protocol):
    """What a handler uses to ask for model work without knowing about queues (``jobs.JobQueue``)."""

    def request(
        self,
        task: ModelTask,
        role: ModelRole,
        system_prompt: str,
        user_prompt: str,
        *,
        evidence: list[str],
        input_hashes: list[str],
        images: list[ImageReference] | None = None,
    ) -> JobRecord | None:
        """Enqueue (or find) a model job; return its record at the hook's deadline (None: no Redis)."""
        ...

    def job_url(self, job_id: str) -> str:
        """Return the public URL of a job's status."""
        ...

    def for_service(self, service_id: str) -> ModelJobs:
        """Return the same handle asking on behalf of another service: a trigger that precomputes what
        that service's chart open will ask for gets the very same job ids."""
        ...


class ImageRead(BaseModel):
    """What a worker read for an imaging job: where the picture the model saw came from, and how.

    ``description`` says it in words for a card ("series 2 (CR) instance 3, view PA"); the UIDs name it in
    the report's Provenance and mark it in the viewer; ``endpoint`` is the DICOMweb root it came from.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    content_hash: str = Field(max_length=64)
    description: str = Field(max_length=500)
    study_uid: str | None = Field(default=None, max_length=64)
    series_uid: str | None = Field(default=None, max_length=64)
    instance_uid: str | None = Field(default=None, max_length=64)
    frame: int | None = None
    frames: int | None = None
    endpoint: str | None = Field(default=None, max_length=4096)


@dataclass(frozen=True)
class DraftRef:
    """What a card needs to know of a stored draft report."""

    id: str
    status: str
    report: dict[str, Any]
    review_url: str
    development_url: str | None = None
    image_read: ImageRead | None = None


class RecordImages(Protocol):
    """Turns an image in the record into a reference for the worker, within the configured limits."""

    def reference(self, source: ImageSource) -> ImageReference:
        """Return the image's reference (nothing decoded), or raise ``ImageRejected`` saying why not."""
        ...


class DraftRecorder(Protocol):
    """Stores AI report drafts (idempotent per image and study) for clinician sign-off."""

    def record(
        self, job: JobRecord, image_hash: str, study: str | None, image_ref: str, evidence: list[str]
    ) -> DraftRef:
        """Return the draft for this image, creating it from the finished job the first time."""
        ...


@dataclass(frozen=True)
class HookCall:
    """A validated hook invocation handed to a service's handler.

    ``prefetch`` holds every declared key: a read model (``fhir_mappings.read_models``), or ``None`` where
    the EHR sent ``null``, the template could not be rendered, or the key was optional and unreadable; such
    unreadable keys are in ``unavailable`` with the reason. ``tolerated`` counts the repairs made reading
    the inbound FHIR. ``jobs`` is None where the service runs without model workers (a unit test of rules).
    ``today`` is the day the call is made, from the app's clock: the model's context ages the patient by it,
    so a precomputed job and the chart open that day ask for the same job.
    """

    service_id: str
    request: HookRequest
    context: HookContext
    prefetch: dict[str, Any]
    public_url: str
    content_hashes: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    tolerated: Counter[str] = field(default_factory=Counter)
    draft_orders: Any | None = None
    # Medication orders of draftOrders past the service's limit, left unchecked (a card says so).
    unchecked_orders: int = 0
    appointments: Any | None = None
    today: date = field(default_factory=date.today)
    jobs: ModelJobs | None = None
    images: RecordImages | None = None
    drafts: DraftRecorder | None = None
