"""The hook pipeline after authentication: request → context → prefetch → handler → response."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import date
from typing import Any
from typing import TypeVar

import httpx
from pydantic import BaseModel
from pydantic import ValidationError

from cds_service.drafts import DraftOwner
from cds_service.drafts import DraftService
from cds_service.errors import BadRequest
from cds_service.fhir_client import FhirReader
from cds_service.hook_io import RecordImages
from cds_service.hook_io import StoreDraftRecorder
from cds_service.image_reads import ImageReads
from cds_service.prefetch import ParsedPrefetchCache
from cds_service.prefetch import resolve_prefetch
from cds_service.registry import ServiceDefinition
from cds_service.settings import Settings
from cds_service.wire import HOOK_CONTEXTS
from cds_service.wire import Card
from cds_service.wire import HookCall
from cds_service.wire import HookRequest
from cds_service.wire import HookResponse
from cds_service.wire import ModelJobs
from cds_service.wire import Source
from fhir_mappings.read_models import read_resource

Model = TypeVar("Model", bound=BaseModel)


def validate(model: type[Model], data: Any, prefix: str = "") -> Model:
    """Return ``data`` validated as ``model``; a 400 naming each failing field (no input values echoed)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = [
            {"field": prefix + ".".join(str(p) for p in error["loc"]), "problem": error["msg"]}
            for error in exc.errors(include_input=False, include_url=False)
        ]
        fields = ", ".join(d["field"] or "(body)" for d in details[:5])
        raise BadRequest(f"invalid request: {fields}", details=details) from None


def json_problem(raw: bytes, value: Any, max_depth: int) -> str | None:
    """Return what makes parsed JSON unacceptable (too deep, a NUL in a string), or None.

    ``raw`` is the JSON as received, ``value`` what it parsed to. Walked iteratively, so hostile nesting
    can't blow the stack; only containers are visited for the depth. NUL (U+0000) is refused because FHIR
    strings forbid control characters and PostgreSQL text can't hold it: JSON can only carry it escaped
    (``\\u0000``; a raw control character doesn't parse), so strings are searched only when the text has one.
    """
    search_strings = b"\\u0000" in raw
    if type(value) is str:
        return "JSON strings must not contain NUL (U+0000)" if "\x00" in value else None
    stack = [(value, 1)] if type(value) is dict or type(value) is list else []
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return f"JSON nests deeper than {max_depth} levels"
        children = node.values() if type(node) is dict else node
        if search_strings and type(node) is dict and any("\x00" in key for key in node):
            return "JSON strings must not contain NUL (U+0000)"
        for child in children:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
            elif search_strings and type(child) is str and "\x00" in child:
                return "JSON strings must not contain NUL (U+0000)"
    return None


def parse_hook_call(
    definition: ServiceDefinition, body: Any, settings: Settings, tolerated: Counter[str]
) -> tuple[HookRequest, Any, Any | None, Any | None, int]:
    """Validate a hook body for this service; return the request, its context, the read draftOrders and
    appointments (None where the hook has none), and how many medication orders were over the limit.

    Both Bundles are read tolerantly (counted in ``tolerated``): clients send Bundles that strict R4
    rejects, and a 400 there would silence the order's safety checks.
    """
    hook_request = validate(HookRequest, body)
    if hook_request.hook != definition.hook:
        raise BadRequest(
            f"service '{definition.id}' answers hook '{definition.hook}', not '{hook_request.hook}'"
        )
    context = validate(HOOK_CONTEXTS[definition.hook], hook_request.context, prefix="context.")
    if len(hook_request.prefetch or {}) > settings.max_prefetch_keys:
        raise BadRequest(f"too many prefetch keys (limit {settings.max_prefetch_keys})")
    draft_orders = None
    unchecked = 0
    raw_orders = getattr(context, "draft_orders", None)
    if raw_orders is not None:
        raw_orders, unchecked = limit_draft_orders(raw_orders, settings.max_draft_orders)
        draft_orders = read_resource(raw_orders, tolerated)
    raw_appointments = getattr(context, "appointments", None)
    appointments = read_resource(raw_appointments, tolerated) if raw_appointments is not None else None
    return hook_request, context, draft_orders, appointments, unchecked


def limit_draft_orders(bundle: dict[str, Any], limit: int) -> tuple[dict[str, Any], int]:
    """Return draftOrders cut to what is read (within ``limit``) and how many medication orders were cut.

    Over the limit, the first ``limit`` MedicationRequests are kept with the Medications they may reference;
    other orders (labs, imaging) are dropped, as no medication check reads them. The cut never costs the
    checks of the orders kept: the handler says how many were not checked.
    """
    entries = bundle.get("entry")
    if not isinstance(entries, list) or len(entries) <= limit:
        return bundle, 0

    def kind(entry: Any) -> Any:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        return resource.get("resourceType") if isinstance(resource, dict) else None

    orders = [e for e in entries if kind(e) == "MedicationRequest"]
    medications = [e for e in entries if kind(e) == "Medication"][:limit]
    return {**bundle, "entry": orders[:limit] + medications}, max(0, len(orders) - limit)


def run_service(
    definition: ServiceDefinition,
    body: Any,
    *,
    settings: Settings,
    http: httpx.Client,
    executor: Executor,
    cache: ParsedPrefetchCache,
    jobs: ModelJobs | None = None,
    drafts: DraftService | None = None,
    owner: DraftOwner | None = None,
    on_fetch: Callable[[float], None] = lambda seconds: None,
    today: date | None = None,
    image_reads: ImageReads | None = None,
    on_limit: Callable[[str], None] = lambda limit: None,
) -> tuple[HookCall, HookResponse]:
    """Run one hook call end to end (after auth) and return the call and the handler's response.

    ``today`` is the day of the call (default: the local date), which the model's context ages the patient by.
    ``image_reads`` is where workers leave the picture an imaging job read, for the draft it makes.
    ``owner`` is the caller the JWT named: drafts the call makes belong to it.
    ``on_limit`` hears of each limit the call met (``draft-orders``, ``prefetch-entries``, ``cards``), for
    /metrics.
    """
    tolerated: Counter[str] = Counter()
    hook_request, context, draft_orders, appointments, unchecked = parse_hook_call(
        definition, body, settings, tolerated
    )
    if unchecked:
        on_limit("draft-orders")

    token = hook_request.fhir_authorization.access_token if hook_request.fhir_authorization else None
    fhir_server = hook_request.fhir_server

    def open_reader() -> FhirReader:
        # Built only when a key must be fetched: a fully prefetched call never touches fhirServer.
        return FhirReader(
            http,
            fhir_server or "",
            token.get_secret_value() if token else None,
            allowlist=settings.fhir_server_allowlist,
            allow_http_loopback=settings.fhir_allow_http_loopback,
        )

    sent, cut = limit_prefetch_entries(hook_request.prefetch or {}, settings.max_prefetch_entries)
    prefetched = resolve_prefetch(
        definition.prefetch,
        sent,
        context,
        open_reader if fhir_server else None,
        executor,
        cache,
        on_fetch,
    )
    call = HookCall(
        service_id=definition.id,
        request=hook_request,
        context=context,
        prefetch=prefetched.resources,
        content_hashes=prefetched.content_hashes,
        unavailable=prefetched.unavailable,
        tolerated=tolerated + prefetched.tolerated,
        draft_orders=draft_orders,
        unchecked_orders=unchecked,
        appointments=appointments,
        today=today or date.today(),
        public_url=settings.public_url.rstrip("/"),
        jobs=jobs,
        images=RecordImages(settings, fhir_server, token.get_secret_value() if token else None),
        drafts=StoreDraftRecorder(
            drafts,
            settings,
            context.patient_id,
            fhir_server,
            context.encounter_id,
            context.user_id,
            image_reads,
            owner=owner,
        )
        if drafts is not None
        else None,
    )
    response = definition.handler(call)
    for key, count in cut.items():
        on_limit("prefetch-entries")
        response.cards.append(not_read_card(key, count, settings.max_prefetch_entries))
    if len(response.cards) > settings.max_cards:
        on_limit("cards")
        response.cards[:] = capped_cards(response.cards, settings.max_cards)
    return call, response


#: Severity order of card indicators, most urgent first.
_URGENCY = {"critical": 0, "warning": 1, "info": 2}
#: How many of the cards rolled into one are named in its detail.
ROLLED_UP_NAMED = 30


def limit_prefetch_entries(prefetch: dict[str, Any], limit: int) -> tuple[dict[str, Any], dict[str, int]]:
    """Return the prefetch with every Bundle cut to its first ``limit`` entries, and how many each lost.

    Checks run per order against each entry read: the cut bounds a call's rule work whatever the body holds.
    """
    cut: dict[str, int] = {}
    kept = dict(prefetch)
    for key, value in prefetch.items():
        entries = value.get("entry") if isinstance(value, dict) else None
        if isinstance(entries, list) and len(entries) > limit:
            kept[key] = {**value, "entry": entries[:limit]}
            cut[key] = len(entries) - limit
    return kept, cut


def not_read_card(key: str, count: int, limit: int) -> Card:
    """Return the card saying a prefetch Bundle was cut: its later entries were never checked."""
    return Card(
        summary=f"Not checked: {count} more '{key}' entries (too large: at most {limit} are read)"[:139],
        detail=(
            f"The record sent {limit + count} '{key}' entries in one call; only the first {limit} were read, "
            "so no check was made against the rest. Review them yourself."
        ),
        indicator="warning",
        source=Source(label="MedGemma CDS"),
    )


def capped_cards(cards: list[Card], limit: int) -> list[Card]:
    """Return at most ``limit`` cards: the most urgent ``limit - 1`` in their order, then one card counting
    (and naming the first of) the rest, as urgent as the most urgent of them."""
    ranked = sorted(range(len(cards)), key=lambda i: _URGENCY[cards[i].indicator])
    shown = sorted(ranked[: limit - 1])
    rest = [cards[i] for i in ranked[limit - 1 :]]
    named = "\n".join(f"- {card.summary}" for card in rest[:ROLLED_UP_NAMED])
    more = f"\n- and {len(rest) - ROLLED_UP_NAMED} more" if len(rest) > ROLLED_UP_NAMED else ""
    rolled_up = Card(
        summary=f"{len(rest)} more findings (too large to show: at most {limit} cards per call)",
        detail=f"Findings not shown as cards:\n\n{named}{more}",
        indicator=min((card.indicator for card in rest), key=_URGENCY.__getitem__),
        source=Source(label="MedGemma CDS"),
    )
    return [cards[i] for i in shown] + [rolled_up]
