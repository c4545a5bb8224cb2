"""Prefetch as CDS Hooks 2.0 §Providing FHIR Resources to a CDS Service defines it.

A key the EHR sent is used as sent (``null`` = "no data", never refetched); a key it left out is read from
``fhirServer``, all missing keys at once; data that can't be had answers 412 for ``fail`` keys.
"""

from __future__ import annotations

import copy
import hashlib
import re
import threading
from collections import Counter
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import orjson

from cds_service.errors import BadRequest
from cds_service.errors import PrefetchFailed
from cds_service.errors import UpstreamError
from cds_service.errors import UpstreamTimeout
from cds_service.fhir_client import FhirReader
from cds_service.fhir_client import FhirReadError
from cds_service.registry import Prefetch
from cds_service.wire import HookContext
from fhir_mappings.read_models import Bundle
from fhir_mappings.read_models import BundleEntry
from fhir_mappings.read_models import Resource
from fhir_mappings.read_models import read_resource
from fhir_mappings.record_context import raw_content_hashes

_TOKEN = re.compile(r"\{\{\s*([A-Za-z.]+)\s*\}\}")
_USER_TOKEN_TYPES = {
    "userPractitionerId": "Practitioner",
    "userPractitionerRoleId": "PractitionerRole",
    "userPatientId": "Patient",
    "userRelatedPersonId": "RelatedPerson",
}


def token_values(context: HookContext) -> dict[str, str]:
    """Return the value of every prefetch token this context can fill (§Prefetch tokens)."""
    values = {
        f"context.{key}": value
        for key, value in context.model_dump(by_alias=True, exclude_none=True).items()
        if isinstance(value, str)
    }
    # userId is "Practitioner/123" etc.; the user tokens carry only the id of the matching type.
    resource_type, _, resource_id = context.user_id.partition("/")
    for token, wanted in _USER_TOKEN_TYPES.items():
        if resource_type == wanted:
            values[token] = resource_id
    return values


def render_template(query: str, values: Mapping[str, str]) -> str | None:
    """Return the query with its tokens replaced, or None when a token has no value in this call."""
    missing = [t for t in _TOKEN.findall(query) if t not in values]
    if missing:
        return None
    return _TOKEN.sub(lambda m: values[m.group(1)], query)


def answer_type(query: str) -> str | None:
    """Return the resourceType a prefetch query answers with: its type for a read, Bundle for a search.

    None for anything else (an operation such as ``$everything``, a history read), which this doesn't judge.
    """
    path, question, _ = query.partition("?")
    segments = path.strip("/").split("/")
    if any(segment.startswith("$") for segment in segments):
        return None
    if question or len(segments) == 1:
        return "Bundle"
    return segments[0] if len(segments) == 2 else None


@dataclass(frozen=True)
class ParsedValue:
    """A prefetch value read into its read model, its content hashes and the repairs reading it took."""

    resource: Resource
    content_hashes: dict[str, str]
    tolerated: Counter[str]


class ParsedPrefetchCache:
    """Parsed prefetch values by the digest of their JSON, least recently used dropped first.

    An EHR sends the same chart to each service of a hook and again at every chart open. Handlers only
    read the resources (read models are frozen), so one parsed value can serve every call that sent it.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, ParsedValue] = OrderedDict()
        self._lock = threading.Lock()

    def parse(self, data: dict[str, Any]) -> ParsedValue:
        """Return the read value; ValueError when it is not a FHIR resource at all."""
        # Keys in the order received: the same JSON resent hits, the same content reordered just misses (a
        # sorted dump costs three times as much, on every new chart).
        digest = hashlib.sha256(orjson.dumps(data)).hexdigest()
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)
                return self._entries[digest]
        tolerated: Counter[str] = Counter()
        parsed = ParsedValue(read_resource(data, tolerated), raw_content_hashes(data), tolerated)
        if self.max_entries > 0:
            with self._lock:
                self._entries[digest] = parsed
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return parsed


def fit_to_type(resource: Resource, expected_type: str | None, tolerated: Counter[str]) -> Resource:
    """Return the value as the type its query answers with; ValueError when it holds something else.

    Clients answer a read with a one-match search Bundle, or a search with the bare resource; both are
    read as meant (and counted). A resource of another type is not the data asked for.
    """
    actual = resource.get_resource_type()
    if expected_type is None or actual == expected_type:
        return resource
    if expected_type == "Bundle":
        tolerated["resource-as-search-bundle"] += 1
        return Bundle(resourceType="Bundle", type="searchset", entry=[BundleEntry(resource=resource)])
    if isinstance(resource, Bundle):
        matches = [e.resource for e in resource.entry if e.resource is not None]
        matches = [r for r in matches if r.get_resource_type() == expected_type]
        if len(matches) == 1:
            tolerated["search-bundle-as-resource"] += 1
            return matches[0]
    raise ValueError(f"expected a {expected_type}, got a {actual}")


@dataclass(frozen=True)
class Prefetched:
    """Every declared key resolved (a read model or None), and what reading them found.

    ``unavailable`` names the keys whose data could not be had (failure mode ``omit``) with the reason, so
    a safety check can say what it could not check; a key the EHR sent as ``null`` ("no data") is not in it.
    """

    resources: dict[str, Any]
    content_hashes: dict[str, str]
    unavailable: dict[str, str]
    tolerated: Counter[str]


def resolve_prefetch(
    declared: Mapping[str, Prefetch],
    sent: Mapping[str, dict[str, Any] | None],
    context: HookContext,
    open_reader: Callable[[], FhirReader] | None,
    executor: Executor,
    cache: ParsedPrefetchCache,
    on_fetch: Callable[[float], None] = lambda seconds: None,
) -> Prefetched:
    """Return every declared key resolved to a resource or None, fetching the missing ones concurrently."""
    resolved: dict[str, Any] = {}
    hashes: dict[str, str] = {}
    unavailable: dict[str, str] = {}
    tolerated: Counter[str] = Counter()

    def accept(key: str, parsed: ParsedValue, fetched: bool) -> None:
        tolerated.update(parsed.tolerated)
        try:
            resolved[key] = fit_to_type(parsed.resource, answer_type(declared[key].query), tolerated)
        except ValueError as exc:
            tolerated["prefetch-of-wrong-type"] += 1
            if declared[key].failure_mode == "fail":
                # A server answering a read with something else is broken (502); an EHR that sent it
                # leaves data the service needs unavailable (412).
                if fetched:
                    raise UpstreamError(f"FHIR server failed reading prefetch '{key}': {exc}") from None
                raise PrefetchFailed(key, str(exc)) from None
            resolved[key] = None
            unavailable[key] = str(exc)
            return
        hashes.update(parsed.content_hashes)

    for key in declared:
        if key in sent:
            if sent[key] is None:
                resolved[key] = None
                continue
            value = sent[key]
            if not declared[key].first_page_only:
                value = _with_next_pages(value, open_reader)  # type: ignore[arg-type]
            try:
                parsed = cache.parse(value)
            except ValueError as exc:
                raise BadRequest(f"prefetch '{key}' is not a FHIR resource: {exc}") from None
            accept(key, parsed, fetched=False)
    values = token_values(context)
    to_fetch: dict[str, str] = {}
    for key, prefetch in declared.items():
        if key in resolved:
            continue
        query = render_template(prefetch.query, values)
        if query is None:
            # An optional context field (e.g. encounterId) is absent: there is nothing to ask for.
            resolved[key] = None
        elif open_reader is None:
            if prefetch.failure_mode == "fail":
                raise PrefetchFailed(key, "not prefetched and the request has no fhirServer")
            resolved[key] = None
            unavailable[key] = "not prefetched, and the request named no fhirServer to read it from"
        else:
            to_fetch[key] = query
    futures = {}
    if to_fetch and open_reader is not None:
        reader = open_reader()
        # A search's next pages on the same server are read too (bounded): a safety list is whole or says not.
        # A first-page-only search (the newest N) is read as the EHR prefetches it.
        futures = {
            key: executor.submit(
                reader.read
                if declared[key].first_page_only or answer_type(query) != "Bundle"
                else reader.read_search,
                query,
            )
            for key, query in to_fetch.items()
        }
    failures: list[tuple[str, FhirReadError]] = []
    for key, future in futures.items():
        try:
            data, seconds = future.result()
            on_fetch(seconds)
            try:
                parsed = cache.parse(data)
            except ValueError as exc:
                raise FhirReadError("invalid", f"FHIR server sent something else than FHIR: {exc}") from None
            accept(key, parsed, fetched=True)
        except FhirReadError as exc:
            if declared[key].failure_mode == "omit":
                resolved[key] = None
                unavailable[key] = f"reading it from the FHIR server failed: {exc.detail}"
            else:
                failures.append((key, exc))
    if failures:
        raise _failure_to_error(*failures[0])
    return Prefetched(resolved, hashes, unavailable, tolerated)


def _with_next_pages(value: dict[str, Any], open_reader: Callable[[], FhirReader] | None) -> dict[str, Any]:
    """Return a prefetched search Bundle with its next pages on ``fhirServer`` joined (bounded), when the EHR
    sent only the first; as sent when there is none, no server, or a page can't be read (the checks then
    say the list is partial)."""
    links = value.get("link") if isinstance(value, dict) else None
    if open_reader is None or not isinstance(links, list):
        return value
    if not any(isinstance(link, dict) and link.get("relation") == "next" for link in links):
        return value
    try:
        joined, _ = open_reader().follow_pages(copy.deepcopy(value))
    except (FhirReadError, BadRequest):
        return value
    return joined


def _failure_to_error(key: str, error: FhirReadError) -> Exception:
    # Data that exists but cannot be had (unreachable, refused, not found) is the spec's 412; a server that
    # breaks or stalls mid-answer is a gateway problem (502/504) the EHR should see as such.
    if error.kind == "timeout":
        return UpstreamTimeout(f"FHIR server timed out reading prefetch '{key}'")
    if error.kind == "invalid" or (error.status is not None and error.status >= 500):
        return UpstreamError(f"FHIR server failed reading prefetch '{key}': {error.detail}")
    return PrefetchFailed(key, error.detail)
