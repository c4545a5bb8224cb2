"""Rule checks of draft medication orders: allergies, duplicates, interactions, and the patient's own data.

Each draft order is checked against the allergies (tiered by the 2022 AAAAI/ACAAI practice parameter), the
active medications and the other draft orders (duplicate therapy, drug–drug interactions), and, where the
record holds them, the patient's kidney function, potassium, conditions, pregnancy, dose and age.

Fail-safe, never fail-silent: an order, an allergy or a list that can't be read gives a card saying what
could not be checked against what, and why; a misspelled name read as a known one says so. No card means
"checked, and nothing found".
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
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
from fhir_mappings.drugs import DrugIdentity
from fhir_mappings.drugs import DuplicateMatch
from fhir_mappings.drugs import allergy_conflict
from fhir_mappings.drugs import allergy_history_terms
from fhir_mappings.drugs import duplicate_therapy
from fhir_mappings.drugs import identify
from fhir_mappings.drugs import normalise
from fhir_mappings.interactions import Interaction
from fhir_mappings.interactions import find_interaction
from fhir_mappings.labs import PatientFacts
from fhir_mappings.markdown import md_text
from fhir_mappings.markdown import plain_text
from fhir_mappings.patient_rules import TOPICS
from fhir_mappings.patient_rules import Finding
from fhir_mappings.patient_rules import patient_findings
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
INTERACTION_OVERRIDES = [
    OverrideReason(code="benefit-outweighs-risk", system=OVERRIDE_SYSTEM, display="Benefit outweighs risk"),
    OverrideReason(code="monitoring-in-place", system=OVERRIDE_SYSTEM, display="Will monitor the patient"),
    OverrideReason(code="dose-adjusted", system=OVERRIDE_SYSTEM, display="Dose already adjusted"),
    OverrideReason(code="not-taking-together", system=OVERRIDE_SYSTEM, display="Not taken together"),
]
PATIENT_OVERRIDES = [
    OverrideReason(code="benefit-outweighs-risk", system=OVERRIDE_SYSTEM, display="Benefit outweighs risk"),
    OverrideReason(code="monitoring-in-place", system=OVERRIDE_SYSTEM, display="Will monitor the patient"),
    OverrideReason(code="dose-adjusted", system=OVERRIDE_SYSTEM, display="Dose already adjusted"),
    OverrideReason(code="data-out-of-date", system=OVERRIDE_SYSTEM, display="Record data is out of date"),
]
NOT_CHECKED_OVERRIDES = [
    OverrideReason(code="checked-manually", system=OVERRIDE_SYSTEM, display="Checked manually"),
]
#: What an identified order is checked for beyond its allergies and duplicates (the not-checked cards say).
CHECKS = "allergies, active medications, interactions, kidney function, labs, conditions, dose and age"


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
    or a Bundle entry, such as one the prefetch ``_include``d) with its ingredients; an unresolved reference
    still names its ``display``.
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


@dataclass(frozen=True)
class CheckedOrder:
    """A draft order whose medication could be read: the resource, its name for cards, what it names."""

    order: Any
    name: str
    concept: DrugConcept
    identity: DrugIdentity


def _read_as(identity: DrugIdentity) -> str:
    return ", ".join(f"{word} as {name}" for word, name in identity.read_as)


def _order_name(order: Any, draft_orders: Any) -> str:
    return medication_text(order, draft_orders) or (order.id and reference(order)) or "a draft order"


def _checked(order: Any, bundle: Any, concept: DrugConcept) -> CheckedOrder:
    identity = identify(concept)
    name = _order_name(order, bundle)
    if identity.read_as:
        name = f"{name} (read as {', '.join(read for _, read in identity.read_as)})"
    return CheckedOrder(order=order, name=name, concept=concept, identity=identity)


def _remove_suggestions(*orders: Any) -> list[Suggestion]:
    """Return a suggestion to remove each draft order (never an active one: those are not ours to delete)."""
    return [
        Suggestion(
            label="Remove this draft order" if len(orders) == 1 else f"Remove draft {reference(order)}",
            is_recommended=index == 0,
            actions=[
                Action(type="delete", description="Remove the draft order", resource_id=reference(order))
            ],
        )
        for index, order in enumerate(o for o in orders if o.id)
    ]


def _card(
    summary: str,
    detail: str,
    indicator: str,
    topic: tuple[str, str],
    overrides: list[OverrideReason],
    *orders: Any,
) -> Card:
    suggestions = _remove_suggestions(*orders)
    return Card(
        summary=plain_text(summary, 139),
        detail=detail,
        indicator=indicator,  # type: ignore[arg-type]
        source=_source(*topic),
        suggestions=suggestions,
        selection_behavior="at-most-one" if suggestions else None,
        override_reasons=overrides,
    )


# --- Allergy severity (2022 AAAAI/ACAAI drug allergy practice parameter) -----------------------------


def _reaction_words(allergy: Any) -> tuple[str, set[str]]:
    """Return an allergy's manifestations as normalised text (joined by " ; ") and their codes."""
    concepts = [m for r in allergy.reaction for m in r.manifestation]
    text = " ; ".join(" ".join(normalise(concept_text(c) or "")) for c in concepts)
    codes = {coding.code for c in concepts for coding in c.coding if coding.code}
    return text, codes


def _has_any(text: str, words: Iterable[str]) -> bool:
    padded = f" {text} "
    for word in words:
        phrase = " ".join(normalise(word))
        if (word.endswith("*") and f" {phrase}" in padded) or f" {phrase} " in padded:
            return True
    return False


def allergy_indicator(allergy: Any, match: AllergyMatch) -> str | None:
    """Return the card indicator for an allergy match, or None when the history makes it not worth a card.

    A severe history (anaphylaxis, angioedema, SJS/TEN, DRESS, a severe reaction or high criticality) makes
    a same-drug or same-class match critical and cross-reactivity a warning. An intolerance (type
    ``intolerance``, or only manifestations such as cough or nausea) warns for the same ingredient and
    nothing else. Cross-reactivity after a low-risk history (low criticality or only non-severe reactions)
    is info unless the side chain is shared; a ``warn_if`` rule (ACE inhibitor → ARB) warns only after
    that reaction.
    """
    terms = allergy_history_terms()
    text, codes = _reaction_words(allergy)
    criticality = (allergy.criticality or "").lower()
    severities = {(r.severity or "").lower() for r in allergy.reaction} - {""}
    severe = (
        criticality == "high"
        or "severe" in severities
        or bool(codes & set(terms["severe_snomed"]))
        or _has_any(text, terms["severe_words"])
    )
    reactions = [part for part in text.split(" ; ") if part]
    intolerance_only = bool(reactions) and all(
        _has_any(part, terms["intolerance_words"]) for part in reactions
    )
    intolerance = not severe and (
        (allergy.type or "").lower() == "intolerance"
        or intolerance_only
        or (bool(codes) and codes <= set(terms["intolerance_snomed"]))
    )
    if intolerance:
        return "warning" if match.kind == "ingredient" else None
    if match.kind != "cross-reactivity":
        return "critical" if severe else "warning"
    if match.warn_if:
        return "warning" if _has_any(text, match.warn_if) else "info"
    if severe or match.side_chain:
        return "warning"
    low_risk = criticality == "low" or (
        bool(reactions) and bool(severities) and severities <= {"mild", "moderate"}
    )
    low_risk = low_risk or (bool(reactions) and not severities and criticality != "unable-to-assess")
    return "info" if low_risk else "warning"


def _allergy_card(checked: CheckedOrder, allergy: Any, match: AllergyMatch, indicator: str) -> Card:
    drug = checked.name
    substance = concept_text(allergy.code) or next(
        (concept_text(r.substance) for r in allergy.reaction if r.substance), "a recorded substance"
    )
    criticality = allergy.criticality or "unknown"
    reactions = (
        ", ".join(concept_text(m) for r in allergy.reaction for m in r.manifestation) or "not recorded"
    )
    history = f"criticality: {md_text(criticality)}; reaction: {md_text(reactions)}"
    if match.kind == "cross-reactivity":
        summary = f"Possible cross-reactivity: {drug} with recorded allergy to {substance}"
        advice = {
            "info": "Low-risk history and a dissimilar side chain: the 2022 practice parameter suggests "
            "giving it without testing.",
            "warning": "Check the reaction history; consider a test dose or an alternative.",
        }.get(indicator, "")
        detail = (
            f"The draft order for **{md_text(drug)}** may cross-react with the active allergy or intolerance "
            f"to **{md_text(substance)}** ({md_text(match.what)}; {history}). {advice}"
        )
        topic = ("cross-reactivity", "Allergy cross-reactivity")
    else:
        summary = f"Allergy conflict: {drug} vs recorded allergy to {substance}"
        detail = (
            f"The draft order for **{md_text(drug)}** matches the active allergy or intolerance to "
            f"**{md_text(substance)}** by {match.kind} ({md_text(match.what)}; {history})."
        )
        topic = ("allergy-conflict", "Allergy conflict")
    detail += "\n\nSource: AAAAI/ACAAI drug allergy practice parameter update 2022 (Khan et al.)."
    return _card(summary, detail, indicator, topic, ALLERGY_OVERRIDES, checked.order)


def _duplicate_card(checked: CheckedOrder, active_drug: str, match: DuplicateMatch) -> Card:
    why = "the same ingredient" if match.kind == "same-ingredient" else "the same therapeutic class"
    return _card(
        f"Duplicate therapy: {checked.name} duplicates active {active_drug}",
        f"The patient already has an active order for **{md_text(active_drug)}**: {why} "
        f"({md_text(match.what)}).",
        "warning",
        ("duplicate-therapy", "Duplicate therapy"),
        DUPLICATE_OVERRIDES,
        checked.order,
    )


def _interaction_card(checked: CheckedOrder, other: str, other_order: Any | None, found: Interaction) -> Card:
    rule = found.rule
    where = "another draft order" if other_order is not None else "an active medication"
    return _card(
        f"Interaction: {checked.name} + {other}: {rule.what}",
        f"**{md_text(checked.name)}** ({md_text(found.order_set)}) with **{md_text(other)}** "
        f"({md_text(found.other_set)}, {where}).\n\n"
        f"Mechanism: {md_text(rule.mechanism)}\n\nManagement: {md_text(rule.management)}\n\n"
        f"Source: {md_text(rule.source)}.",
        rule.severity,
        ("drug-interaction", "Drug-drug interaction"),
        INTERACTION_OVERRIDES,
        checked.order,
        *([other_order] if other_order is not None else []),
    )


def _finding_card(checked: CheckedOrder, finding: Finding) -> Card:
    return _card(
        finding.summary,
        f"**{md_text(checked.name)}**: {md_text(finding.detail)}\n\nSource: {md_text(finding.source)}.",
        finding.severity,
        (finding.topic, TOPICS[finding.topic]),
        PATIENT_OVERRIDES,
        checked.order,
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


def _read_as_card(checked: CheckedOrder) -> Card:
    return _near_misspelling_card(
        f"Read as {', '.join(n for _, n in checked.identity.read_as)}: {checked.name}",
        f"The order's text was not a name this service knows; it was read as a near misspelling "
        f"({md_text(_read_as(checked.identity))}) and checked as that. Correct the order if wrong.",
    )


def _near_misspelling_card(summary: str, detail: str) -> Card:
    """An info card saying a medication name was read as a near misspelling of a known one."""
    return Card(
        summary=plain_text(summary, 139),
        detail=detail,
        indicator="info",
        source=_source("read-as", "Medication name read as"),
        override_reasons=NOT_CHECKED_OVERRIDES,
    )


def order_check_cards(
    draft_orders: Any,
    selections: list[str] | None,
    allergies: Any,
    medications: Any,
    unavailable: Mapping[str, str],
    facts: PatientFacts | None = None,
    *,
    unchecked_orders: int = 0,
) -> list[Card]:
    """Return the rule cards for draft medication orders (selected ones for order-select, all for sign).

    ``unavailable`` names the prefetch keys (``allergies``, ``medications``) that could not be read;
    ``facts`` is what the record says of the patient (no facts: no patient-specific checks);
    ``unchecked_orders`` counts the medication orders left out over the draftOrders limit.
    """
    signing = selections is None
    orders, missing = medication_orders(draft_orders, selections)
    cards = [not_checked_card(ref, CHECKS, "it is selected but not in draftOrders") for ref in missing]
    if unchecked_orders:
        cards.append(
            not_checked_card(
                f"{unchecked_orders} more medication order{'s' if unchecked_orders != 1 else ''}",
                CHECKS,
                "draftOrders held more medication orders than this service checks in one call; the first "
                "ones were checked",
            )
        )
    checked: list[CheckedOrder] = []
    for order in orders:
        concept, why = ordered_drug(order, draft_orders)
        if concept is None:
            # At order-select a draft with no medication at all is an order not written yet (EHRs send one
            # as the order form opens): said quietly; at order-sign, or with a medication we can't
            # identify, it is a warning.
            no_medication = order.medicationCodeableConcept is None and order.medicationReference is None
            indicator = "info" if no_medication and not signing else "warning"
            cards.append(not_checked_card(_order_name(order, draft_orders), CHECKS, why, indicator=indicator))
            continue
        entry = _checked(order, draft_orders, concept)
        if not entry.identity.recognised:
            quoted = "; ".join(f"'{text}'" for text in concept.texts) or "its codes"
            cards.append(
                not_checked_card(
                    entry.name,
                    CHECKS,
                    f"{quoted} names no medication this service knows (only an identical name in an "
                    "allergy or active medication can match)",
                )
            )
        elif entry.identity.read_as:
            cards.append(_read_as_card(entry))
        checked.append(entry)
    if not checked:
        return cards
    names = ", ".join(c.name for c in checked)
    if "allergies" in unavailable:
        cards.append(
            not_checked_card(
                names, "allergies", f"the allergy list could not be read ({unavailable['allergies']})"
            )
        )
    else:
        cards += _allergy_cards(checked, allergies)
    if "medications" in unavailable:
        cards.append(
            not_checked_card(
                names,
                "active medications",
                f"the medication list could not be read ({unavailable['medications']})",
            )
        )
    else:
        cards += _active_medication_cards(checked, medications)
    cards += _draft_interaction_cards(checked, draft_orders)
    if facts is not None:
        cards += _unread_facts_cards(names, unavailable)
        for entry in checked:
            if not entry.identity.recognised:
                continue
            dosages, texts = entry.order.dosageInstruction, entry.concept.texts
            for finding in patient_findings(entry.name, entry.identity, facts, dosages, texts):
                cards.append(_finding_card(entry, finding))
    return cards


def _unread_facts_cards(names: str, unavailable: Mapping[str, str]) -> list[Card]:
    """Return an info card naming the patient checks that could not run because their data can't be read."""
    missing = []
    if "labs" in unavailable and "observations" in unavailable:
        missing.append(("kidney function, potassium and pregnancy tests", unavailable["labs"]))
    if "conditions" in unavailable:
        missing.append(("conditions", unavailable["conditions"]))
    if "patient" in unavailable:
        missing.append(("age and sex", unavailable["patient"]))
    if not missing:
        return []
    why = "; ".join(f"{what}: {reason}" for what, reason in missing)
    against = ", ".join(what for what, _ in missing)
    return [not_checked_card(names, against, f"that data could not be read ({why})", indicator="info")]


def _no_drug_allergy(allergy: Any, substance: DrugConcept) -> bool:
    """Return whether an allergy record states no allergy ("NKDA") or names a food, insect or material."""
    terms = allergy_history_terms()
    codes = {code for _, code in substance.codings}
    if codes & set(terms["no_allergy_snomed"]):
        return True
    texts = [" ".join(normalise(text)) for text in substance.texts]
    return any(
        text in terms["no_allergy_words"] or _has_any(text, terms["non_drug_words"]) for text in texts if text
    )


def _allergy_cards(checked: list[CheckedOrder], allergies: Any) -> list[Card]:
    cards: list[Card] = []
    names = ", ".join(c.name for c in checked)
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
        for entry in checked:
            match = allergy_conflict(entry.concept, substance)
            if match is None:
                continue
            matched = True
            indicator = allergy_indicator(allergy, match)
            if indicator is not None:
                cards.append(_allergy_card(entry, allergy, match, indicator))
        if matched:
            continue
        identity = identify(substance)
        categories = {c.lower() for c in allergy.category}
        if _no_drug_allergy(allergy, substance):
            continue
        if not _checkable(substance):
            # Only codes this service doesn't know: an identical code would have matched, a related one can't.
            why = "the allergy names its substance only by codes this service does not know"
            cards.append(not_checked_card(names, label, why))
        elif not identity.recognised and not categories & {"food", "environment", "biologic"}:
            quoted = "; ".join(f"'{text}'" for text in substance.texts)
            why = f"its substance {quoted} is no medication this service knows (only the same name matched)"
            cards.append(not_checked_card(names, label, why, indicator="info"))
    return cards


def _active_medication_cards(checked: list[CheckedOrder], medications: Any) -> list[Card]:
    """Return duplicate-therapy and interaction cards against active medications, and what wasn't checked."""
    cards: list[Card] = []
    names = ", ".join(c.name for c in checked)
    incomplete = incomplete_list(medications)
    if incomplete:
        cards.append(
            not_checked_card(
                names, "every active medication", f"the medication list is incomplete: {incomplete}"
            )
        )
    unresolved: list[str] = []
    unknown: list[str] = []
    read_as: list[str] = []
    for active in active_medication_requests(medications):
        active_concept, why = ordered_drug(active, medications)
        if active_concept is None:
            unresolved.append(f"{reference(active) if active.id else 'an active medication'} ({why})")
            continue
        active_name = medication_text(active, medications) or "an active medication"
        active_identity = identify(active_concept)
        if not active_identity.recognised:
            unknown.append(active_name)
        elif active_identity.read_as:
            read_as.append(f"'{active_name}' as {', '.join(name for _, name in active_identity.read_as)}")
        for entry in checked:
            if entry.order.id and active.id == entry.order.id:
                continue
            match = duplicate_therapy(entry.concept, active_concept)
            if match is not None:
                cards.append(_duplicate_card(entry, active_name, match))
            found = find_interaction(entry.identity, active_identity)
            if found is not None:
                cards.append(_interaction_card(entry, active_name, None, found))
    if unresolved:
        cards.append(
            not_checked_card(
                names,
                f"active medication{'s' if len(unresolved) > 1 else ''} {', '.join(unresolved)}",
                "what they are could not be read, so duplicates and interactions with them were not checked",
            )
        )
    if unknown:
        quoted = ", ".join(f"'{name}'" for name in unknown)
        cards.append(
            not_checked_card(
                names,
                f"active {quoted}",
                "these name no medication this service knows, so interactions with them were not checked",
                indicator="info",
            )
        )
    if read_as:
        cards.append(
            _near_misspelling_card(
                f"Read as: active {'; '.join(read_as)}",
                f"Active medications not named as this service knows them were read as near misspellings "
                f"({md_text('; '.join(read_as))}) and checked as that. Correct the list if that is wrong.",
            )
        )
    return cards


def _draft_interaction_cards(checked: list[CheckedOrder], draft_orders: Any) -> list[Card]:
    """Return interaction cards between each checked order and the other draft orders (each pair once)."""
    cards: list[Card] = []
    seen: set[frozenset[int]] = set()
    checked_ids = {id(entry.order) for entry in checked}
    others: list[CheckedOrder] = list(checked)
    for order in bundle_resources(draft_orders, "MedicationRequest"):
        if id(order) in checked_ids:
            continue
        concept, _ = ordered_drug(order, draft_orders)
        if concept is not None:
            others.append(_checked(order, draft_orders, concept))
    for entry in checked:
        for other in others:
            pair = frozenset((id(entry.order), id(other.order)))
            if other.order is entry.order or pair in seen:
                continue
            seen.add(pair)
            found = find_interaction(entry.identity, other.identity)
            if found is not None:
                cards.append(_interaction_card(entry, other.name, other.order, found))
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
