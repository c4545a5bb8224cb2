"""Medication identity for rule checks: the ingredients, classes and routes an order or an allergy names.

An order or allergy is read as a `DrugConcept` (its texts and codings). `identify` resolves it to canonical
ingredient names and drug classes, from RxNorm or SNOMED CT codes where known and from names otherwise: INN
and USAN names, brands, salts, abbreviations (PCN, ASA, APAP, HCTZ, "sulfa") and combination products, which
contribute every ingredient. Words that name a form, salt, route or unit ("DR", "ophthalmic", "transdermal",
"hydrochloride", "MG") are never an identity, so two drugs sharing one are not matched.

`allergy_conflict` and `duplicate_therapy` apply the pharmacology on top: class allergies, allergy groups
(amoxicillin allergy → every penicillin), cross-reactivity warnings (cephalosporin after penicillin allergy),
and therapeutic classes where duplication is a classic alert (two NSAIDs, ACE inhibitor + ARB, two statins).

The data is loaded once per process from ``fhir_mappings/data``: ``drug_classes.json`` (curated: classes,
ingredients, products, codes, cross-reactivity, and the decisions taken, with sources) and ``drug_names.json``
(more names for ingredients, derived from the MIT-licensed drug-named-entity-recognition dictionary).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from typing import Literal
from typing import NamedTuple

from rapidfuzz import fuzz
from rapidfuzz import process

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
DATA = Path(__file__).resolve().parent / "data"
_TOKEN = re.compile(r"[a-z0-9]+")
_DIGIT = re.compile(r"\d")
_EMPTY: frozenset[str] = frozenset()
# A near misspelling is read as a known name only when it is long enough, starts with the same letter and is
# this similar (RapidFuzz's normalised Indel ratio, 0-100): "amoxicilin" → amoxicillin (95), "penicilin" → 95.
_FUZZY_MIN_LENGTH = 6
_FUZZY_CUTOFF = 88


@dataclass(frozen=True)
class DrugConcept:
    """What an order or allergy names: every text (CodeableConcept.text, each coding's display, Medication
    ingredient names) and every coding as (system, code); RxNorm and SNOMED CT codes are read, others ignored.
    """

    texts: tuple[str, ...]
    codings: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DrugIdentity:
    """The identity of a `DrugConcept`.

    ``classes`` holds every class of every ingredient with its parent classes, plus the classes the concept
    names itself (``named_classes``: "penicillins", "PCN", "sulfa drugs", SNOMED "Allergy to penicillin").
    ``names`` holds the normalised texts nothing was recognised in, compared as whole names only.
    ``routes`` is where the drug acts ("systemic", "ophthalmic", "nasal", ...); empty when unknown.
    """

    ingredients: frozenset[str]
    classes: frozenset[str]
    # True when something (a code or a name) was recognised; False means only raw words are known
    recognised: bool
    named_classes: frozenset[str] = frozenset()
    routes: frozenset[str] = frozenset()
    names: frozenset[str] = frozenset()
    codes: frozenset[tuple[str, str]] = frozenset()
    # Misspelled words read as a known name, as (word as written, name read): the cards say so.
    read_as: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AllergyMatch:
    """Why an ordered drug conflicts with a recorded allergy or intolerance."""

    kind: Literal["ingredient", "class", "cross-reactivity"]
    what: str
    severe: bool
    # Cross-reactivity through an identical R1 side chain (ceftazidime → aztreonam): higher risk.
    side_chain: bool = False
    # Manifestations that make this cross-reactivity a warning (ACE inhibitor → ARB: angioedema); else info.
    warn_if: tuple[str, ...] = ()


@dataclass(frozen=True)
class DuplicateMatch:
    """Why an ordered drug duplicates an active one."""

    kind: Literal["same-ingredient", "same-class"]
    what: str


class _Entry(NamedTuple):
    """What a name or code stands for (a tuple: tens of thousands are built at load)."""

    ingredients: frozenset[str]
    classes: frozenset[str]


@dataclass(frozen=True)
class _Lexicon:
    phrases: dict[str, _Entry]
    # The longest phrase starting with each word, so a text is scanned with few dictionary probes.
    phrase_length: dict[str, int]
    ignore: frozenset[str]
    route_of: dict[str, str]
    labels: dict[str, str]
    depth: dict[str, int]
    duplicate_classes: frozenset[str]
    allergy_groups: dict[str, frozenset[str]]
    expanded: dict[str, frozenset[str]]
    ingredient_classes: dict[str, frozenset[str]]
    ingredient_duplicates: dict[str, frozenset[str]]
    ingredient_routes: dict[str, frozenset[str]]
    diluents: frozenset[str]
    codes: dict[tuple[str, str], _Entry]
    cross: tuple[tuple[str, str, str, tuple[str, ...]], ...]
    side_chains: tuple[tuple[str, frozenset[str]], ...]
    allergy_history: dict[str, list[str]]


def normalise(text: str) -> list[str]:
    """Return the lowercase ASCII words and numbers of a text ("Paracétamol 500 mg" → paracetamol 500 mg)."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return _TOKEN.findall(folded)


def _key(text: str) -> str:
    return " ".join(normalise(text))


def _scan(lexicon: _Lexicon, text: str) -> tuple[list[_Entry], list[str], set[str]]:
    """Return the phrases recognised in a text (longest first), its leftover words and its route words."""
    tokens = normalise(text)
    entries: list[_Entry] = []
    leftover: list[str] = []
    # Routes come from every word, including words inside a recognised name ("timolol eye drops").
    routes = {lexicon.route_of[token] for token in tokens if token in lexicon.route_of}
    i, n = 0, len(tokens)
    while i < n:
        token = tokens[i]
        longest = min(lexicon.phrase_length.get(token, 0), n - i)
        for length in range(longest, 0, -1):
            entry = lexicon.phrases.get(token if length == 1 else " ".join(tokens[i : i + length]))
            if entry is not None:
                entries.append(entry)
                i += length
                break
        else:
            # Doses, strengths and NDA numbers carry digits; forms, salts and units are listed words.
            if token not in lexicon.ignore and len(token) > 1 and not _DIGIT.search(token):
                leftover.append(token)
            i += 1
    return entries, leftover, routes


def _expand(classes: dict[str, Any], key: str) -> frozenset[str]:
    seen = {key}
    stack = [key]
    while stack:
        for parent in classes[stack.pop()]["parents"]:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return frozenset(seen)


def _depth(classes: dict[str, Any], key: str) -> int:
    parents = classes[key]["parents"]
    return 1 + max((_depth(classes, parent) for parent in parents), default=0)


@lru_cache(maxsize=1)
def _lexicon() -> _Lexicon:
    """Load the curated and derived data once per process and index every name by its normalised words."""
    curated = json.loads((DATA / "drug_classes.json").read_text(encoding="utf-8"))
    derived = json.loads((DATA / "drug_names.json").read_text(encoding="utf-8"))
    classes: dict[str, Any] = curated["classes"]
    ingredients: dict[str, Any] = curated["ingredients"]
    phrases: dict[str, _Entry] = {}

    def add(name: str, entry: _Entry) -> None:
        key = _key(name)
        if key and key not in phrases:
            phrases[key] = entry

    # Curated names first: products before ingredients before class names, so a brand or a combination
    # ("tylenol with codeine") wins over the shorter names inside it; derived names only fill gaps.
    for product in curated["products"]:
        entry = _Entry(frozenset(product["ingredients"]), frozenset())
        for name in product["names"]:
            add(name, entry)
    for name, data in ingredients.items():
        entry = _Entry(frozenset([name]), frozenset())
        add(name, entry)
        for synonym in data["names"]:
            add(synonym, entry)
    for key, data in classes.items():
        for name in data["names"]:
            add(name, _Entry(frozenset(), frozenset([key])))
    # Derived names are stored normalised by the builder; one shared entry per ingredient keeps loading fast.
    shared: dict[tuple[str, ...], _Entry] = {}
    for key, named in derived["names"].items():
        if key not in phrases:
            target = tuple(named)
            entry = shared.get(target)
            if entry is None:
                entry = shared[target] = _Entry(frozenset(named), _EMPTY)
            phrases[key] = entry

    phrase_length: dict[str, int] = {}
    for key in phrases:
        first, _, rest = key.partition(" ")
        length = rest.count(" ") + 2 if rest else 1
        if length > phrase_length.get(first, 0):
            phrase_length[first] = length
    expanded = {key: _expand(classes, key) for key in classes}
    duplicate_classes = frozenset(key for key, data in classes.items() if data["duplicate"])
    ingredient_classes = {
        name: frozenset(c for direct in data["classes"] for c in expanded[direct])
        for name, data in ingredients.items()
    }
    lexicon = _Lexicon(
        phrases=phrases,
        phrase_length=phrase_length,
        ignore=frozenset(curated["ignore_words"]),
        route_of={word: route for route, words in curated["route_words"].items() for word in words},
        labels={key: data["label"] for key, data in classes.items()},
        depth={key: _depth(classes, key) for key in classes},
        duplicate_classes=duplicate_classes,
        allergy_groups={
            name: frozenset(c for c in data["classes"] if classes[c]["allergy_group"])
            for name, data in ingredients.items()
        },
        expanded=expanded,
        ingredient_classes=ingredient_classes,
        ingredient_duplicates={
            name: (ingredient_classes[name] & duplicate_classes) - set(data.get("no_duplicate_classes", ()))
            for name, data in ingredients.items()
        },
        ingredient_routes={
            name: frozenset(data.get("routes", ["systemic"])) for name, data in ingredients.items()
        },
        diluents=frozenset(name for name, data in ingredients.items() if "diluent" in data["classes"]),
        codes={},
        cross=tuple(
            (rule["allergy"], rule["order"], rule["what"], tuple(rule.get("warn_if", ())))
            for rule in curated["cross_reactivity"]
        ),
        side_chains=tuple(
            (group["what"], frozenset(group["ingredients"])) for group in curated["side_chains"]
        ),
        allergy_history=curated["allergy_history"],
    )
    codes = lexicon.codes
    for name, data in ingredients.items():
        for cui in data.get("rxnorm", ()):
            codes[(RXNORM, cui)] = _Entry(frozenset([name]), frozenset())
    # Product and SNOMED entries are stored as names and read like any text: a code means what its name says.
    for system, table in ((RXNORM, curated["rxnorm"]), (SNOMED, curated["snomed"])):
        for code, name in table.items():
            found, _, _ = _scan(lexicon, name)
            codes[(system, code)] = _Entry(
                frozenset(i for e in found for i in e.ingredients),
                frozenset(c for e in found for c in e.classes),
            )
    return lexicon


def preload() -> None:
    """Load the medication data now (once per process), so the first hook call does not pay for it."""
    _lexicon()
    _fuzzy_choices()


@lru_cache(maxsize=1)
def _fuzzy_choices() -> dict[str, tuple[str, ...]]:
    """Return the one-word names of the lexicon by first letter, the candidates for a misspelled word."""
    by_letter: dict[str, list[str]] = {}
    for key in _lexicon().phrases:
        if " " not in key and len(key) >= _FUZZY_MIN_LENGTH - 1 and not _DIGIT.search(key):
            by_letter.setdefault(key[0], []).append(key)
    return {letter: tuple(keys) for letter, keys in by_letter.items()}


def _fuzzy_entries(lexicon: _Lexicon, words: list[str]) -> list[tuple[str, str, _Entry]]:
    """Return (word, name, entry) for each word that is a near misspelling of one known name."""
    found = []
    for word in words:
        if len(word) < _FUZZY_MIN_LENGTH:
            continue
        match = process.extractOne(
            word, _fuzzy_choices().get(word[0], ()), scorer=fuzz.ratio, score_cutoff=_FUZZY_CUTOFF
        )
        if match is not None:
            found.append((word, match[0], lexicon.phrases[match[0]]))
    return found


@lru_cache(maxsize=8192)
def identify(concept: DrugConcept) -> DrugIdentity:
    """Return the ingredients, classes and routes a concept names, from its known codes and its texts."""
    lexicon = _lexicon()
    ingredients: set[str] = set()
    named: set[str] = set()
    codes: set[tuple[str, str]] = set()
    for system, code in concept.codings:
        if system in (RXNORM, SNOMED) and code:
            codes.add((system, code))
            entry = lexicon.codes.get((system, code))
            if entry is not None:
                ingredients |= entry.ingredients
                named |= entry.classes
    names: set[str] = set()
    routes: set[str] = set()
    read_as: dict[str, str] = {}
    for text in concept.texts:
        if not text:
            continue
        entries, leftover, text_routes = _scan(lexicon, text)
        routes |= text_routes
        if not entries and leftover:
            names.add(" ".join(leftover))
            # Nothing recognised: a near misspelling of a known name is read as that name (and said so).
            for word, name, entry in _fuzzy_entries(lexicon, leftover):
                read_as[word] = name
                entries.append(entry)
        for entry in entries:
            ingredients |= entry.ingredients
            named |= entry.classes
    classes: set[str] = set()
    for name in ingredients:
        classes |= lexicon.ingredient_classes.get(name, _EMPTY)
    for key in named:
        classes |= lexicon.expanded[key]
    if not routes and ingredients:
        # A text without route words ("timolol") may mean any route the ingredient is made for.
        for name in ingredients:
            routes |= lexicon.ingredient_routes.get(name, {"systemic"})
    return DrugIdentity(
        ingredients=frozenset(ingredients),
        classes=frozenset(classes),
        recognised=bool(ingredients or named),
        named_classes=frozenset(named),
        routes=frozenset(routes),
        names=frozenset(names),
        codes=frozenset(codes),
        read_as=tuple(sorted(read_as.items())),
    )


def _most_specific(lexicon: _Lexicon, classes: set[str] | frozenset[str]) -> str:
    return lexicon.labels[max(sorted(classes), key=lambda key: lexicon.depth[key])]


def allergy_conflict(ordered: DrugConcept, substance: DrugConcept) -> AllergyMatch | None:
    """Return why an ordered drug conflicts with an allergy's substance, or None when it does not.

    Checked in order: a shared ingredient or code; a class the allergy names ("penicillins", "sulfa drugs")
    or the allergy group of a named ingredient (amoxicillin → every penicillin), both severe; then a shared
    beta-lactam R1 side chain (ceftazidime → aztreonam) or a cross-reactivity rule (cephalosporin after
    penicillin allergy), which the caller tiers by the reaction history; and for names nothing was
    recognised in, the same whole name.
    """
    lexicon = _lexicon()
    order = identify(ordered)
    allergy = identify(substance)
    shared = (order.ingredients & allergy.ingredients) - lexicon.diluents
    if shared:
        return AllergyMatch(kind="ingredient", what=", ".join(sorted(shared)), severe=True)
    if order.codes & allergy.codes:
        return AllergyMatch(
            kind="ingredient", what=_code_text(ordered, order.codes & allergy.codes), severe=True
        )
    named = allergy.named_classes & order.classes
    if named:
        return AllergyMatch(kind="class", what=_most_specific(lexicon, named), severe=True)
    groups = {c for name in allergy.ingredients for c in lexicon.allergy_groups.get(name, ())} & order.classes
    if groups:
        return AllergyMatch(kind="class", what=_most_specific(lexicon, groups), severe=True)
    for what, members in lexicon.side_chains:
        if allergy.ingredients & members and order.ingredients & members:
            return AllergyMatch(kind="cross-reactivity", what=f"shared {what}", severe=False, side_chain=True)
    for allergy_class, order_class, what, warn_if in lexicon.cross:
        if allergy_class in allergy.classes and order_class in order.classes:
            return AllergyMatch(kind="cross-reactivity", what=what, severe=False, warn_if=warn_if)
    same_name = order.names & allergy.names
    if same_name:
        return AllergyMatch(kind="ingredient", what=sorted(same_name)[0], severe=True)
    return None


def allergy_history_terms() -> dict[str, list[str]]:
    """Return the words and SNOMED CT codes that mark a severe reaction or an intolerance."""
    return _lexicon().allergy_history


def duplicate_therapy(ordered: DrugConcept, active: DrugConcept) -> DuplicateMatch | None:
    """Return why an ordered drug duplicates an active one, or None when it does not.

    A duplicate shares an ingredient (under any name or code) or a class where duplication is a classic
    alert, and acts by a compatible route: timolol eye drops do not duplicate oral metoprolol, nor does a
    nasal steroid duplicate an inhaled one. Names nothing was recognised in match only as whole names.
    """
    lexicon = _lexicon()
    order = identify(ordered)
    other = identify(active)
    if order.routes and other.routes and not order.routes & other.routes:
        return None
    shared = (order.ingredients & other.ingredients) - lexicon.diluents
    if shared:
        return DuplicateMatch(kind="same-ingredient", what=", ".join(sorted(shared)))
    if order.codes & other.codes:
        return DuplicateMatch(kind="same-ingredient", what=_code_text(ordered, order.codes & other.codes))
    classes = _duplicate_classes(lexicon, order) & _duplicate_classes(lexicon, other)
    if classes:
        return DuplicateMatch(kind="same-class", what=_most_specific(lexicon, classes))
    same_name = order.names & other.names
    if same_name:
        return DuplicateMatch(kind="same-ingredient", what=sorted(same_name)[0])
    return None


def _duplicate_classes(lexicon: _Lexicon, identity: DrugIdentity) -> set[str]:
    classes: set[str] = set()
    for name in identity.ingredients:
        classes |= lexicon.ingredient_duplicates.get(name, _EMPTY)
    for key in identity.named_classes:
        classes |= lexicon.expanded[key] & lexicon.duplicate_classes
    return classes


def _code_text(concept: DrugConcept, codes: frozenset[tuple[str, str]]) -> str:
    return concept.texts[0] if concept.texts else sorted(code for _, code in codes)[0]
