"""The parsed-prefetch cache: the same JSON is read once, anything else is read anew."""

from __future__ import annotations

import json

import pytest
from support import SAMPLE

from cds_service.prefetch import ParsedPrefetchCache


def allergies_bundle() -> dict:
    bundle = json.loads((SAMPLE / "Kermit_Trantow_f1a650a5-737e-4fd7-828e-03c3348b9524.json").read_text())
    entries = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "AllergyIntolerance"]
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": e["resource"]} for e in entries],
    }


def test_same_json_is_parsed_once_and_shared() -> None:
    cache = ParsedPrefetchCache(8)
    first = cache.parse(allergies_bundle())
    again = cache.parse(allergies_bundle())  # an equal dict, not the same object
    assert again is first
    hashes = first.content_hashes
    assert len(hashes) == 3 and all(ref.startswith("AllergyIntolerance/") for ref in hashes)


def test_changed_json_is_parsed_again_even_if_only_meta_changed() -> None:
    cache = ParsedPrefetchCache(8)
    first = cache.parse(allergies_bundle())
    changed = allergies_bundle() | {"meta": {"versionId": "2"}}
    second = cache.parse(changed)
    assert second is not first
    # Other JSON is read anew; the content hashes ignore meta.
    assert second.content_hashes == first.content_hashes


def test_least_recently_used_is_dropped_and_zero_disables() -> None:
    cache = ParsedPrefetchCache(1)
    a = cache.parse(allergies_bundle())
    cache.parse(allergies_bundle() | {"id": "other"})
    assert cache.parse(allergies_bundle()) is not a
    disabled = ParsedPrefetchCache(0)
    assert disabled.parse(allergies_bundle()) is not disabled.parse(allergies_bundle())


def test_what_is_not_a_resource_is_a_value_error_and_not_cached() -> None:
    cache = ParsedPrefetchCache(8)
    for _ in range(2):
        with pytest.raises(ValueError):
            cache.parse({"gender": "female"})


def test_repairs_are_kept_with_the_cached_value() -> None:
    cache = ParsedPrefetchCache(8)
    for _ in range(2):
        assert cache.parse({"resourceType": "Patient", "gender": 7}).tolerated == {"number-as-string": 1}
