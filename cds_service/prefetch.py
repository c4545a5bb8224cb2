"""Prefetch as CDS Hooks 2.0 §Providing FHIR Resources to a CDS Service defines it.

A key the EHR sent is used as sent (``null`` = "no data", never refetched); a key it left out is read from
``fhirServer``, all missing keys at once; data that can't be had answers 412 for ``fail`` keys.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from cds_service.errors import BadRequest
from cds_service.errors import PrefetchFailed
from cds_service.errors import UpstreamError
from cds_service.errors import UpstreamTimeout
from cds_service.fhir_client import FhirReader
from cds_service.fhir_client import FhirReadError
from cds_service.fhir_client import parse_resource
from cds_service.registry import Prefetch
from cds_service.wire import HookContext
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


class ParsedPrefetchCache:
    """Parsed prefetch values by the digest of their JSON, least recently used dropped first.

    An EHR sends the same chart to each service of a hook and again at every chart open; validating it with
    fhir.resources is most of a hook's CPU. Digesting the JSON is a tenth of that. Handlers only read the
    resources, so one parsed object can serve every call that sent the same JSON.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[Any, dict[str, str]]] = OrderedDict()
        self._lock = threading.Lock()

    def parse(self, data: dict[str, Any]) -> tuple[Any, dict[str, str]]:
        """Return the parsed resource and its content hashes; ValueError when it is not valid FHIR."""
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(text.encode()).hexdigest()
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)
                return self._entries[digest]
        parsed = (parse_resource(data), raw_content_hashes(data))
        if self.max_entries > 0:
            with self._lock:
                self._entries[digest] = parsed
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return parsed


def parse_sent_prefetch(
    key: str, data: dict[str, Any] | None, cache: ParsedPrefetchCache, expected_type: str | None = None
) -> tuple[Any, dict[str, str]]:
    """Return the parsed prefetch value the EHR sent and its content hashes; 400 naming a bad key."""
    if data is None:
        return None, {}
    try:
        resource, hashes = cache.parse(data)
    except ValueError as exc:
        raise BadRequest(f"prefetch '{key}' is not valid FHIR R4: {exc}") from None
    # Handlers read a key as the type its query answers with; a valid resource of another type crashes them.
    if expected_type is not None and data["resourceType"] != expected_type:
        raise BadRequest(f"prefetch '{key}' must be a {expected_type}, not a {data['resourceType']}")
    return resource, hashes


@dataclass(frozen=True)
class Prefetched:
    """Every declared key resolved (a resource or None), and content hashes of the JSON they came from."""

    resources: dict[str, Any]
    content_hashes: dict[str, str]


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
    for key, prefetch in declared.items():
        if key in sent:
            resolved[key], key_hashes = parse_sent_prefetch(
                key, sent[key], cache, answer_type(prefetch.query)
            )
            hashes.update(key_hashes)
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
        else:
            to_fetch[key] = query
    futures = {}
    if to_fetch and open_reader is not None:
        reader = open_reader()
        futures = {key: executor.submit(reader.read, query) for key, query in to_fetch.items()}
    failures: list[tuple[str, FhirReadError]] = []
    for key, future in futures.items():
        try:
            data, seconds = future.result()
            on_fetch(seconds)
            try:
                resource, key_hashes = cache.parse(data)
            except ValueError as exc:
                raise FhirReadError("invalid", f"FHIR server sent invalid FHIR: {exc}") from None
            expected_type = answer_type(declared[key].query)
            if expected_type is not None and resource.get_resource_type() != expected_type:
                raise FhirReadError("invalid", f"FHIR server answered a {resource.get_resource_type()}")
            resolved[key] = resource
            hashes.update(key_hashes)
        except FhirReadError as exc:
            if declared[key].failure_mode == "omit":
                resolved[key] = None
            else:
                failures.append((key, exc))
    if failures:
        raise _failure_to_error(*failures[0])
    return Prefetched(resources=resolved, content_hashes=hashes)


def _failure_to_error(key: str, error: FhirReadError) -> Exception:
    # Data that exists but cannot be had (unreachable, refused, not found) is the spec's 412; a server that
    # breaks or stalls mid-answer is a gateway problem (502/504) the EHR should see as such.
    if error.kind == "timeout":
        return UpstreamTimeout(f"FHIR server timed out reading prefetch '{key}'")
    if error.kind == "invalid" or (error.status is not None and error.status >= 500):
        return UpstreamError(f"FHIR server failed reading prefetch '{key}': {error.detail}")
    return PrefetchFailed(key, error.detail)
