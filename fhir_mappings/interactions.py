"""Drug–drug interactions between an ordered drug and another (an active medication or another draft order).

Rules come from ``fhir_mappings/data/interactions.json``: each names two drug sets (ingredients, classes of
``drug_classes.json`` and named groups of both), a severity, the mechanism, what to do and its source. Only
drugs that act systemically interact: eye drops, creams and inhalers are not checked. Two orders of the same
ingredient are duplicate therapy, not an interaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from typing import Literal

from fhir_mappings.drugs import DATA
from fhir_mappings.drugs import DrugIdentity

Severity = Literal["info", "warning", "critical"]
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}


@dataclass(frozen=True)
class DrugSet:
    """Ingredients and drug classes a rule names (a class matches every ingredient in it)."""

    label: str
    ingredients: frozenset[str]
    classes: frozenset[str]

    def matches(self, identity: DrugIdentity) -> bool:
        """Return whether a drug belongs to the set, by one of its ingredients or classes."""
        return bool(identity.ingredients & self.ingredients or identity.classes & self.classes)


def drug_set(spec: Mapping[str, Any], groups: Mapping[str, Mapping[str, Any]], label: str = "") -> DrugSet:
    """Return the DrugSet of a rule side: its ``ingredients`` and ``classes`` plus those of its ``groups``."""
    ingredients = set(spec.get("ingredients", ()))
    classes = set(spec.get("classes", ()))
    labels = [spec["label"]] if spec.get("label") else []
    for name in spec.get("groups", ()):
        member = drug_set(groups[name], groups)
        ingredients |= member.ingredients
        classes |= member.classes
        labels.append(member.label)
    return DrugSet(
        label=label or " or ".join(labels) or ", ".join(sorted(ingredients | classes)),
        ingredients=frozenset(ingredients),
        classes=frozenset(classes),
    )


def acts_systemically(identity: DrugIdentity) -> bool:
    """Return whether a drug may act systemically (no route words count as systemic)."""
    return not identity.routes or "systemic" in identity.routes


@dataclass(frozen=True)
class InteractionRule:
    """One curated interaction between two drug sets."""

    a: DrugSet
    b: DrugSet
    severity: Severity
    what: str
    mechanism: str
    management: str
    source: str


@dataclass(frozen=True)
class Interaction:
    """An interaction found between two drugs: the rule and which side each drug matched."""

    rule: InteractionRule
    order_set: str
    other_set: str


def _strongest(rules: Iterable[InteractionRule]) -> InteractionRule | None:
    # The most severe rule wins; among equals, the first in the file (the more specific rules come first).
    best: InteractionRule | None = None
    for rule in rules:
        if best is None or SEVERITY_RANK[rule.severity] > SEVERITY_RANK[best.severity]:
            best = rule
    return best


@lru_cache(maxsize=1)
def interaction_rules() -> tuple[InteractionRule, ...]:
    """Load the interaction rules once per process."""
    data = json.loads((DATA / "interactions.json").read_text(encoding="utf-8"))
    groups = data["groups"]
    return tuple(
        InteractionRule(
            a=drug_set(rule["a"], groups),
            b=drug_set(rule["b"], groups),
            severity=rule["severity"],
            what=rule["what"],
            mechanism=rule["mechanism"],
            management=rule["management"],
            source=rule["source"],
        )
        for rule in data["rules"]
    )


def find_interaction(order: DrugIdentity, other: DrugIdentity) -> Interaction | None:
    """Return the most severe interaction between an ordered drug and another drug, or None."""
    if not (acts_systemically(order) and acts_systemically(other)):
        return None
    if order.ingredients and order.ingredients == other.ingredients:
        return None
    found: list[tuple[InteractionRule, str, str]] = []
    for rule in interaction_rules():
        if rule.a.matches(order) and rule.b.matches(other):
            found.append((rule, rule.a.label, rule.b.label))
        elif rule.b.matches(order) and rule.a.matches(other):
            found.append((rule, rule.b.label, rule.a.label))
    best = _strongest(rule for rule, _, _ in found)
    if best is None:
        return None
    _, order_set, other_set = next(item for item in found if item[0] is best)
    return Interaction(rule=best, order_set=order_set, other_set=other_set)
