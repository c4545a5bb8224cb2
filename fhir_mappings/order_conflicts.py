"""Rule checks of draft medication orders: allergy conflicts, cross-reactivity, duplicate therapy.

Fail-safe, never fail-silent: an order, an allergy or a list that can't be read gives a card saying what
could not be checked against what, and why. No card means "checked, and nothing found".
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any
from typing import Literal

from cds_service.wire import Action
from cds_service.wire import Card
from cds_service.wire import Coding
from cds_service.wire import OverrideReason
from cds_service.wire import Source
from cds_service.wire import Suggestion
from fhir_mappings.drugs import AllergyMatch
from fhir_mappings.drugs import DrugConcept
from fhir_mappings.drugs import DuplicateMatch
from fhir_mappings.drugs import allergy_conflict
from fhir_mappings.drugs import duplicate_therapy
from fhir_mappings.drugs import identify
from fhir_mappings.markdown import md_text
from fhir_mappings.markdown import plain_text
from fhir_mappings.read_models import read_resource
from fhir_mappings.record import active_allergies
from fhir_mappings.record import active_medication_requests
from fhir_mappings.record import bundle_resources
from fhir_mappings.record import concept_text
from fhir_mappings.record import incomplete_list
from fhir_mappings.record import medication_text
from fhir_mappings.record import reference
from fhir_mappings.record import resolve_medication
from fhir_mappings.summary import RULES_SOURCE

OVERRIDE_SYSTEM = "https://github.com/medgemma-cds/medgemma-cds/override-reason"
#: Card topics (Source.topic) telling the kinds of rule card apart, for EHR analytics and tests.
TOPIC_SYSTEM = "https://github.com/medgemma-cds/medgemma-cds/card-topic"
ALLERGY_OVERRIDES = [
    OverrideReason(code="tolerated-before", system=OVERRIDE_SYSTEM, display="Patient tolerated this before"),
    OverrideReason(code="benefit-outweighs-risk", system=OVERRIDE_SYSTEM, display="Benefit outweighs risk"),
    OverrideReason(
        code="allergy-recorded-in-error", system=OVERRIDE_SYSTEM, display="Allergy recorded in error"
    ),
]
DUPLICATE_OVERRIDES = [
    OverrideReason(code="intended-combination", system=OVERRIDE_SYSTEM, display="Combination is intended"),
    OverrideReason(code="replacing-existing", system=OVERRIDE_SYSTEM, display="Replaces the existing order"),
]
NOT_CHECKED_OVERRIDES = [
    OverrideReason(code="checked-manually", system=OVERRIDE_SYSTEM, display="Checked manually"),
]


def _source(topic: str, display: str) -> Source:
    return Source(label=RULES_SOURCE.label, topic=Coding(system=TOPIC_SYSTEM, code=topic, display=display))


def drug_concept(concepts: Iterable[Any], names: Iterable[str | None] = ()) -> DrugConcept:
    """Return every text and coding of CodeableConcepts (and extra names) as one DrugConcept."""
    texts: list[str] = []
    codings: list[tuple[str, str]] = []
    for concept in concepts:
        if concept is None:
            continue
        texts += [concept.text or ""] + [c.display or "" for c in concept.coding]
        codings += [(c.system or "", c.code) for c in concept.coding if c.code]
    texts += [name or "" for name in names]
    return DrugConcept(
        texts=tuple(dict.fromkeys(t.strip() for t in texts if t.strip())), codings=tuple(codings)
    )


def _checkable(concept: DrugConcept) -> bool:
    return bool(concept.texts) or identify(concept).recognised


def ordered_drug(order: Any, draft_orders: Any) -> tuple[DrugConcept | None, str]:
    """Return what a MedicationRequest orders, or None and why it can't be told.

    Reads ``medicationCodeableConcept``, or the Medication a ``medicationReference`` resolves to (contained
    or a draftOrders entry) with its ingredients; an unresolved reference still names its ``display``.
    """
    if order.medicationCodeableConcept is not None:
        concept = drug_concept([order.medicationCodeableConcept])
    elif order.medicationReference is not None:
        medication = resolve_medication(order, draft_orders)
        target = order.medicationReference.reference or "a Medication"
        if medication is None and not order.medicationReference.display:
            return None, f"its medicationReference ({target}) could not be resolved"
        ingredients = medication.ingredient if medication is not None else []
        concept = drug_concept(
            [medication.code if medication is not None else None]
            + [i.itemCodeableConcept for i in ingredients],
            [order.medicationReference.display]
            + [i.itemReference.display for i in ingredients if i.itemReference],
        )
    else:
        return None, "it names no medication"
    if not _checkable(concept):
        return None, "its medication has no text and no code this service knows"
    return concept, ""


def allergy_substance(allergy: Any) -> DrugConcept | None:
    """Return the substance of an AllergyIntolerance (``code`` and each reaction's ``substance``), or None
    when it names none (no text and no coding)."""
    concept = drug_concept([allergy.code] + [r.substance for r in allergy.reaction])
    return concept if concept.texts or concept.codings else None


def medication_orders(draft_orders: Any, selections: list[str] | None) -> tuple[list[Any], list[str]]:
    """Return the MedicationRequests to check and the selected MedicationRequests draftOrders lacks.

    ``selections`` (order-select) picks the orders; None (order-sign) checks every draft medication order.
    """
    orders = bundle_resources(draft_orders, "MedicationRequest")
    if selections is None:
        return orders, []
    wanted = [s for s in selections if s.startswith("MedicationRequest/")]
    chosen = [o for o in orders if reference(o) in wanted]
    found = {reference(o) for o in chosen}
    return chosen, [s for s in wanted if s not in found]


def _order_name(order: Any, draft_orders: Any) -> str:
    return medication_text(order, draft_orders) or (order.id and reference(order)) or "a draft order"


def _remove_suggestion(order: Any) -> list[Suggestion]:
    if not order.id:
        return []
    return [
        Suggestion(
            label="Remove this draft order",
            is_recommended=True,
            actions=[
                Action(type="delete", description="Remove the draft order", resource_id=reference(order))
            ],
        )
    ]


def _allergy_card(drug: str, order: Any, allergy: Any, match: AllergyMatch) -> Card:
    substance = concept_text(allergy.code) or next(
        (concept_text(r.substance) for r in allergy.reaction if r.substance), "a recorded substance"
    )
    criticality = allergy.criticality or "unknown"
    suggestions = _remove_suggestion(order)
    if match.kind == "cross-reactivity":
        summary = f"Possible cross-reactivity: {drug} with recorded allergy to {substance}"
        detail = (
            f"The draft order for **{md_text(drug)}** may cross-react with the active allergy or intolerance "
            f"to **{md_text(substance)}** ({md_text(match.what)}; criticality: {md_text(criticality)}). "
            "Check the reaction history before ordering."
        )
        indicator = "warning"
    else:
        summary = f"Allergy conflict: {drug} vs recorded allergy to {substance}"
        detail = (
            f"The draft order for **{md_text(drug)}** matches the active allergy or intolerance to "
            f"**{md_text(substance)}** by {match.kind} ({md_text(match.what)}; criticality: "
            f"{md_text(criticality)})."
        )
        indicator = "critical" if criticality == "high" else "warning"
    return Card(
        summary=plain_text(summary, 139),
        detail=detail,
        indicator=indicator,  # type: ignore[arg-type]
        source=_source(
            "cross-reactivity" if match.kind == "cross-reactivity" else "allergy-conflict",
            "Allergy cross-reactivity" if match.kind == "cross-reactivity" else "Allergy conflict",
        ),
        suggestions=suggestions,
        selection_behavior="at-most-one" if suggestions else None,
        override_reasons=ALLERGY_OVERRIDES,
    )


def _duplicate_card(drug: str, order: Any, active_drug: str, match: DuplicateMatch) -> Card:
    suggestions = _remove_suggestion(order)
    why = "the same ingredient" if match.kind == "same-ingredient" else "the same therapeutic class"
    return Card(
        summary=plain_text(f"Duplicate therapy: {drug} duplicates active {active_drug}", 139),
        detail=(
            f"The patient already has an active order for **{md_text(active_drug)}**: {why} "
            f"({md_text(match.what)})."
        ),
        indicator="warning",
        source=_source("duplicate-therapy", "Duplicate therapy"),
        suggestions=suggestions,
        selection_behavior="at-most-one" if suggestions else None,
        override_reasons=DUPLICATE_OVERRIDES,
    )


def not_checked_card(what: str, against: str, why: str, *, indicator: str = "warning") -> Card:
    """Return the card saying ``what`` could not be checked ``against`` something, and why."""
    return Card(
        summary=plain_text(f"Not checked: {what} against {against}", 139),
        detail=(
            f"**{md_text(what)}** could not be checked against {md_text(against)}: {md_text(why)}. "
            "Check it yourself before signing; no card from this check does not mean it is safe."
        ),
        indicator=indicator,  # type: ignore[arg-type]
        source=_source("not-checked", "Safety check could not run"),
        override_reasons=NOT_CHECKED_OVERRIDES,
    )


def order_check_cards(
    draft_orders: Any,
    selections: list[str] | None,
    allergies: Any,
    medications: Any,
    unavailable: Mapping[str, str],
) -> list[Card]:
    """Return the rule cards for draft medication orders (selected ones for order-select, all for sign).

    ``unavailable`` names the prefetch keys (``allergies``, ``medications``) that could not be read.
    """
    orders, missing = medication_orders(draft_orders, selections)
    cards = [
        not_checked_card(ref, "allergies or active medications", "it is selected but not in draftOrders")
        for ref in missing
    ]
    readable: list[tuple[Any, str, DrugConcept]] = []
    for order in orders:
        concept, why = ordered_drug(order, draft_orders)
        name = _order_name(order, draft_orders)
        if concept is None:
            # A draft with no medication at all is an order not written yet (EHRs send one as the order
            # form opens): say so quietly; a medication we can't identify is a warning.
            no_medication = order.medicationCodeableConcept is None and order.medicationReference is None
            indicator = "info" if no_medication else "warning"
            cards.append(not_checked_card(name, "allergies or active medications", why, indicator=indicator))
        else:
            readable.append((order, name, concept))
    if not readable:
        return cards
    names = ", ".join(name for _, name, _ in readable)
    if "allergies" in unavailable:
        cards.append(
            not_checked_card(
                names, "allergies", f"the allergy list could not be read ({unavailable['allergies']})"
            )
        )
    else:
        cards += _allergy_cards(readable, allergies)
    if "medications" in unavailable:
        cards.append(
            not_checked_card(
                names,
                "active medications",
                f"the medication list could not be read ({unavailable['medications']})",
            )
        )
    else:
        cards += _duplicate_cards(readable, medications)
    return cards


def _allergy_cards(readable: list[tuple[Any, str, DrugConcept]], allergies: Any) -> list[Card]:
    cards: list[Card] = []
    names = ", ".join(name for _, name, _ in readable)
    incomplete = incomplete_list(allergies)
    if incomplete:
        why = f"the allergy list is incomplete: {incomplete}"
        cards.append(not_checked_card(names, "every recorded allergy", why))
    for allergy in active_allergies(allergies):
        label = reference(allergy) if allergy.id else "an allergy"
        substance = allergy_substance(allergy)
        if substance is None:
            cards.append(not_checked_card(names, label, "the allergy record names no substance"))
            continue
        matched = False
        for order, name, concept in readable:
            match = allergy_conflict(concept, substance)
            if match is not None:
                matched = True
                cards.append(_allergy_card(name, order, allergy, match))
        if not matched and not _checkable(substance):
            # Only codes this service doesn't know: an identical code would have matched, a related one can't.
            why = "the allergy names its substance only by codes this service does not know"
            cards.append(not_checked_card(names, label, why))
    return cards


def _duplicate_cards(readable: list[tuple[Any, str, DrugConcept]], medications: Any) -> list[Card]:
    cards: list[Card] = []
    for active in active_medication_requests(medications):
        active_concept, _ = ordered_drug(active, medications)
        if active_concept is None:
            continue
        for order, name, concept in readable:
            if order.id and active.id == order.id:
                continue
            match = duplicate_therapy(concept, active_concept)
            if match is not None:
                cards.append(_duplicate_card(name, order, medication_text(active, medications), match))
    return cards


def rule_flags(kind: Literal["allergy", "duplicate"], ordered: dict[str, Any], other: dict[str, Any]) -> bool:
    """Return whether the rule cards flag an order (its medication CodeableConcept JSON) against ``other``:
    an allergy's substance concept (``allergy``) or an active medication's concept (``duplicate``).

    The whole card path runs, from JSON through the read models; the labelled set is scored with this.
    """
    order = {"resourceType": "MedicationRequest", "id": "order", "medicationCodeableConcept": ordered}
    drafts = read_resource({"resourceType": "Bundle", "entry": [{"resource": order}]})
    if kind == "allergy":
        allergy = {"resourceType": "AllergyIntolerance", "id": "other", "code": other}
        listed = read_resource({"resourceType": "Bundle", "entry": [{"resource": allergy}]})
        cards = order_check_cards(drafts, [f"MedicationRequest/{order['id']}"], listed, None, {})
        wanted = {"allergy-conflict", "cross-reactivity"}
    else:
        active = {"resourceType": "MedicationRequest", "id": "other", "status": "active"}
        listed = read_resource(
            {"resourceType": "Bundle", "entry": [{"resource": active | {"medicationCodeableConcept": other}}]}
        )
        cards = order_check_cards(drafts, [f"MedicationRequest/{order['id']}"], None, listed, {})
        wanted = {"duplicate-therapy"}
    return any(c.source.topic is not None and c.source.topic.code in wanted for c in cards)
