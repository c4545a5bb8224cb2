"""Fixtures for the mapping tests: the shipped Synthea charts as read models, and builders.

The sample files are transaction Bundles whose entries already carry ids (their ``urn:uuid`` full URLs
name the same ids), so a chart's resources are read as they are and regrouped into searchset Bundles,
the shape a FHIR server answers a prefetch query with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fhir_mappings.read_models import read_resource

SAMPLE = Path(__file__).resolve().parents[2] / "cds_service" / "data" / "sample"


def parse(data: dict[str, Any]) -> Any:
    """Return the read model of a resource dict (read as prefetch is)."""
    return read_resource(data)


def searchset(resources: Iterable[Any]) -> Any:
    """Return a searchset Bundle of resources (objects or dicts), each entry with a server-style fullUrl."""
    entries = []
    for resource in resources:
        data = (
            resource
            if isinstance(resource, dict)
            else resource.model_dump(mode="json", exclude_defaults=True)
        )
        entries.append(
            {"fullUrl": f"http://fhir.test/fhir/{data['resourceType']}/{data['id']}", "resource": data}
        )
    return parse({"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries})


@dataclass(frozen=True)
class Chart:
    """One sample patient: the raw resource dicts of its transaction Bundle, grouped by type."""

    resources: dict[str, list[dict[str, Any]]]

    def raw(self, resource_type: str) -> list[dict[str, Any]]:
        """Return copies of the resource dicts of one type, in Bundle order."""
        return [json.loads(json.dumps(data)) for data in self.resources.get(resource_type, [])]

    def patient(self) -> Any:
        """Return the Patient resource."""
        return parse(self.raw("Patient")[0])

    def search(self, resource_type: str) -> Any:
        """Return a searchset Bundle of every resource of a type, as a prefetch would answer it."""
        return searchset(self.raw(resource_type))


def _load(name: str) -> Chart:
    (path,) = SAMPLE.glob(f"{name}_*.json")
    bundle = json.loads(path.read_text())
    grouped: dict[str, list[dict[str, Any]]] = {}
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert entry["fullUrl"] == f"urn:uuid:{resource['id']}"
        grouped.setdefault(resource["resourceType"], []).append(resource)
    return Chart(resources=grouped)


@pytest.fixture(scope="session")
def kermit() -> Chart:
    """Kermit Trantow: hypertension, three active medications, three active allergies."""
    return _load("Kermit_Trantow")


@pytest.fixture(scope="session")
def louis() -> Chart:
    """Louis Erdman: one allergy and a chest radiograph ImagingStudy."""
    return _load("Louis_Erdman")


@pytest.fixture(scope="session")
def fhir() -> Callable[[dict[str, Any]], Any]:
    """Read a resource dict into its read model."""
    return parse


@pytest.fixture(scope="session")
def bundle_of() -> Callable[[Iterable[Any]], Any]:
    """Build a searchset Bundle from resources or resource dicts."""
    return searchset
