"""Services declared on their handlers, collected into a frozen registry that discovery is generated from."""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from types import ModuleType
from typing import Literal

from cds_service.wire import HOOK_CONTEXTS
from cds_service.wire import HookCall
from cds_service.wire import HookResponse
from cds_service.wire import ServiceDescriptor

Handler = Callable[[HookCall], HookResponse]

#: Prefetch tokens the spec defines outside ``context`` (§Prefetch tokens).
USER_TOKENS = ("userPractitionerId", "userPractitionerRoleId", "userPatientId", "userRelatedPersonId")
_TOKEN = re.compile(r"\{\{\s*([A-Za-z.]+)\s*\}\}")
_SERVICE_ID = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
# Context fields usable in templates: simple strings only (§Prefetch tokens: "only ... simple types").
_NON_TOKEN_FIELDS = {"selections", "draft_orders", "appointments"}


@dataclass(frozen=True)
class Prefetch:
    """One prefetch key: a FHIR query template and what to do when its data can't be had.

    ``failure_mode`` follows HAPI's CdsPrefetchFailureMode: ``fail`` answers 412, ``omit`` hands the handler
    ``None`` so it can still answer from what it has.

    ``first_page_only`` marks a search whose first page is the whole answer, such as the newest N
    (``_sort=-date&_count=N``): its next pages are neither read from ``fhirServer`` nor taken from a sent
    ``next`` link, so the service reads what the EHR prefetches, and a call built from the FHIR server (the
    precompute sweep) reads the same record. Other searches are lists that must be read whole.
    """

    query: str
    failure_mode: Literal["fail", "omit"] = "fail"
    first_page_only: bool = False


@dataclass(frozen=True)
class ServiceDefinition:
    """A CDS service as declared by ``@service`` on its handler."""

    id: str
    hook: str
    title: str
    description: str
    handler: Handler
    prefetch: Mapping[str, Prefetch] = field(default_factory=dict)
    usage_requirements: str | None = None
    potentially_long_running: bool = False
    #: A service that only precomputes what a later chart open will ask for, and where its model work runs:
    #: ``background`` on the lower-priority precompute queues, ``interactive`` ahead of them (the patient is
    #: here). Such a service never waits for the model.
    precomputes: Literal["background", "interactive"] | None = None

    def descriptor(self) -> ServiceDescriptor:
        """Return this service's discovery entry (internal fields such as failure modes stay off the wire)."""
        return ServiceDescriptor(
            hook=self.hook,
            title=self.title,
            description=self.description,
            id=self.id,
            prefetch={key: p.query for key, p in self.prefetch.items()},
            usage_requirements=self.usage_requirements,
            potentially_long_running=True if self.potentially_long_running else None,
        )


def service(
    *,
    id: str,
    hook: str,
    title: str,
    description: str,
    prefetch: Mapping[str, str | Prefetch] | None = None,
    usage_requirements: str | None = None,
    potentially_long_running: bool = False,
    precomputes: Literal["background", "interactive"] | None = None,
) -> Callable[[Handler], Handler]:
    """Declare the decorated function as the handler of a CDS service; checked when the registry loads."""

    def decorate(handler: Handler) -> Handler:
        definition = ServiceDefinition(
            id=id,
            hook=hook,
            title=title,
            description=description,
            handler=handler,
            prefetch={k: v if isinstance(v, Prefetch) else Prefetch(v) for k, v in (prefetch or {}).items()},
            usage_requirements=usage_requirements,
            potentially_long_running=potentially_long_running,
            precomputes=precomputes,
        )
        handler.cds_service = definition  # type: ignore[attr-defined]
        return handler

    return decorate


class RegistryError(Exception):
    """A service declaration is invalid; raised at startup so a bad service never serves."""


def check_definition(definition: ServiceDefinition) -> None:
    """Raise RegistryError unless the id, hook and every prefetch token are valid for that hook."""
    if not _SERVICE_ID.match(definition.id):
        raise RegistryError(f"service id {definition.id!r} must be kebab-case")
    context_model = HOOK_CONTEXTS.get(definition.hook)
    if context_model is None:
        raise RegistryError(f"service {definition.id!r}: unknown hook {definition.hook!r}")
    offered = {
        f"context.{f.alias or name}"
        for name, f in context_model.model_fields.items()
        if name not in _NON_TOKEN_FIELDS
    } | set(USER_TOKENS)
    for key, prefetch in definition.prefetch.items():
        for token in _TOKEN.findall(prefetch.query):
            if token not in offered:
                raise RegistryError(
                    f"service {definition.id!r}: prefetch {key!r} uses {{{{{token}}}}}, "
                    f"which hook {definition.hook!r} does not offer"
                )


@dataclass(frozen=True)
class Registry:
    """The services this process serves, keyed by id; immutable once built."""

    services: Mapping[str, ServiceDefinition]

    def get(self, service_id: str) -> ServiceDefinition | None:
        """Return the service with this id, or None."""
        return self.services.get(service_id)

    def descriptors(self) -> list[ServiceDescriptor]:
        """Return discovery entries sorted by id, so ``GET /cds-services`` is repeatable."""
        return [self.services[key].descriptor() for key in sorted(self.services)]


def definitions_in(module: ModuleType) -> list[ServiceDefinition]:
    """Return the service definitions declared in a module."""
    return [obj.cds_service for obj in vars(module).values() if hasattr(obj, "cds_service")]


def load_registry(package: str = "hooks") -> Registry:
    """Import every module of ``package``, check each declared service, and return the frozen registry."""
    root = importlib.import_module(package)
    found: dict[str, ServiceDefinition] = {}
    for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package}.{info.name}")
        for definition in definitions_in(module):
            check_definition(definition)
            if definition.id in found:
                raise RegistryError(f"service id {definition.id!r} is declared twice")
            found[definition.id] = definition
    if not found:
        raise RegistryError(f"no CDS service is declared in package {package!r}")
    return Registry(services=dict(found))
