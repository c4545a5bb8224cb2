"""Build drug_names.json, the name table of fhir_mappings/drugs.py derived from drug-named-entity-recognition.

Development tool, not used at run time. The PyPI package drug-named-entity-recognition 2.0.9 (MIT, Fast Data
Science) ships a dictionary of drug names and synonyms (from the DrugBank open vocabulary, CC0; MeSH and
MedlinePlus, NLM; the NHS website; Wikipedia). Loading it takes about 0.7 s and imports ``requests``, and the
package reads a cache file in the home folder on import, so the API process ships this filtered table instead:

- every synonym of an ingredient or product already in drug_classes.json, mapped to the curated name(s);
- for other single-ingredient drugs with a MedlinePlus or NHS page, their names mapped to one canonical name;
- never a name that drug_classes.json already has, that is a form, salt or unit word, that names more than one
  drug, or that is one short word, so a bare word cannot make two unrelated drugs look the same.

Run: ``pip download --no-deps drug-named-entity-recognition==2.0.9`` and unpack the wheel, then
``python scripts/build_drug_names.py PATH/drug_ner_dictionary.pkl.bz2``.
"""

from __future__ import annotations

import bz2
import json
import pickle
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from fhir_mappings.drugs import normalise  # noqa: E402

# Synonyms in the source that name something broader or different from its drug.
REJECTED = {
    "vitamin b",
    "vitamin b complex",
    "b complex",
    "sone",
    "omep",
    "chain insulin b",
    "insulin a chain",
    "insulin b chain",
    "sodium insulin",
    "insulin sodium",
    "actrapid",
    # Brand families and class words: the brand names several unrelated products.
    "vicks",
    "maalox",
    "isopto",
    "penem",
    "mytab",
}
_ODD = set("=<>{}|[];&")


def _key(text: str) -> str:
    return " ".join(normalise(text))


def _curated_names(curated: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """Return every curated name (normalised) with the ingredients it names; classes map to ()."""
    names: dict[str, tuple[str, ...]] = {}
    for product in curated["products"]:
        for name in product["names"]:
            names.setdefault(_key(name), tuple(product["ingredients"]))
    for ingredient, data in curated["ingredients"].items():
        for name in [ingredient, *data["names"]]:
            names.setdefault(_key(name), (ingredient,))
    for data in curated["classes"].values():
        for name in data["names"]:
            names.setdefault(_key(name), ())
    return names


def _curated_target(
    canonical: str, curated_names: dict[str, tuple[str, ...]], ignore: set[str]
) -> tuple[str, ...] | None:
    """Return the curated ingredients a source drug name means ("estradiol patch" → estradiol), if any."""
    words = _key(canonical).split(" ")
    found: set[tuple[str, ...]] = set()
    i = 0
    while i < len(words):
        for length in range(len(words) - i, 0, -1):
            target = curated_names.get(" ".join(words[i : i + length]))
            if target is not None:
                found.add(target)
                i += length
                break
        else:
            if words[i] not in ignore:
                return None
            i += 1
    return found.pop() if len(found) == 1 else None


def _usable(key: str, ignore: set[str]) -> bool:
    words = key.split(" ")
    if not key or len(words) > 5 or key in REJECTED:
        return False
    meaningful = [w for w in words if w not in ignore and not any(ch.isdigit() for ch in w)]
    # Chemical names ("2 acetoxybenzoic acid") and letter codes ("a m k") are not how orders name drugs.
    if not meaningful or any(w.isdigit() for w in words) or sum(len(w) == 1 for w in words) > 1:
        return False
    # One short word ("amox", "cotrim") is too easily an abbreviation of something else.
    return len(words) > 1 or len(words[0]) >= 5


def build(dictionary: dict[str, Any], curated: dict[str, Any]) -> dict[str, list[str]]:
    """Return the derived names: normalised name → ingredients, sorted by name."""
    curated_names = _curated_names(curated)
    ignore = set(curated["ignore_words"])
    canonical_data: dict[str, Any] = dictionary["drug_canonical_to_data"]
    found: dict[str, set[tuple[str, ...]]] = {}
    for variant, canonicals in dictionary["drug_variant_to_canonical"].items():
        if _ODD & set(variant) or len(canonicals) != 1:
            continue
        canonical = canonicals[0]
        target = _curated_target(canonical, curated_names, ignore)
        if target is None:
            data = canonical_data.get(canonical, {})
            single = not any(sep in canonical for sep in ("/", ",", " and ", " with "))
            # Drugs with a MedlinePlus or NHS page are the ones prescribed or sold; the rest of the source is
            # mostly chemicals and botanicals that no order names.
            if not single or not (data.get("medline_plus_id") or data.get("nhs_url")):
                continue
            target = (_key(canonical),)
        if not target:
            continue
        key = _key(variant)
        if key in curated_names or not _usable(key, ignore):
            continue
        found.setdefault(key, set()).add(target)
    return {key: list(targets.pop()) for key, targets in sorted(found.items()) if len(targets) == 1}


def main(argv: list[str]) -> None:
    """Read the dictionary file named on the command line; write drug_names.json beside this file."""
    with bz2.open(argv[1], "rb") as source:
        # The pinned package's own data file, read at build time only; never at run time.
        dictionary = pickle.load(source)
    curated = json.loads((HERE / "drug_classes.json").read_text(encoding="utf-8"))
    names = build(dictionary, curated)
    about = {
        "what": "Drug names and synonyms for fhir_mappings/drugs.py: normalised name → ingredient(s).",
        "source": "Derived from drug-named-entity-recognition 2.0.9 (https://pypi.org/project/"
        "drug-named-entity-recognition/), MIT License, Copyright (c) 2023 Fast Data Science Ltd; its data "
        "comes from the DrugBank open vocabulary (CC0), MeSH and MedlinePlus (U.S. National Library of "
        "Medicine), the NHS website and Wikipedia.",
        "built_by": "scripts/build_drug_names.py",
    }
    lines = ["{", f'  "about": {json.dumps(about, ensure_ascii=False)},', '  "names": {']
    items = list(names.items())
    for i, (key, targets) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        lines.append(f"    {json.dumps(key)}: {json.dumps(targets)}{comma}")
    lines += ["  }", "}"]
    (HERE / "drug_names.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(names)} names")


if __name__ == "__main__":
    main(sys.argv)
