"""Rule checks of selected draft medication orders: allergy conflicts and duplicate therapy."""

from __future__ import annotations

import re
from typing import Any

from cds_service.wire import Action
from cds_service.wire import Card
from cds_service.wire import OverrideReason
from cds_service.wire import Suggestion
from fhir_mappings.record import RXNORM
from fhir_mappings.record import active_allergies
from fhir_mappings.record import active_medication_requests
from fhir_mappings.record import bundle_resources
from fhir_mappings.record import concept_codes
from fhir_mappings.record import concept_text
from fhir_mappings.record import medication_concept
from fhir_mappings.record import reference
from fhir_mappings.summary import RULES_SOURCE

OVERRIDE_SYSTEM = "https://github.com/medgemma-cds/medgemma-cds/override-reason"
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
# Cross-reacting ingredients the rule knows by class; a substance named by its class matches its members.
DRUG_CLASSES = {
    "penicillin": {
        "penicillin",
        "amoxicillin",
        "ampicillin",
        "piperacillin",
        "nafcillin",
        "oxacillin",
        "dicloxacillin",
    },
    "sulfonamide": {"sulfamethoxazole", "sulfadiazine", "sulfasalazine"},
    "nsaid": {"aspirin", "ibuprofen", "naproxen", "diclofenac", "ketorolac", "celecoxib", "indomethacin"},
    "cephalosporin": {"cefalexin", "cephalexin", "cefazolin", "ceftriaxone", "cefuroxime", "cefepime"},
}
# Words of drug names that are forms, devices or units, not ingredients.
_STOPWORDS = {
    "allergy", "allergic", "intolerance", "product", "oral", "tablet", "tablets", "capsule", "chewable",
    "solution", "suspension", "injection", "injectable", "injector", "auto", "actuat", "metered", "dose",
    "inhaler", "extended", "release", "topical", "cream", "disintegrating", "prefilled", "syringe", "unit",
    # Salts and esters name the form of an ingredient, not the drug: two hydrochlorides are not a duplicate.
    "hydrochloride", "sodium", "potassium", "calcium", "sulfate", "acetate", "citrate", "phosphate",
    "maleate", "succinate", "tartrate", "besylate", "mesylate", "fumarate", "bromide", "chloride", "hyclate",
}  # fmt: skip
_WORD = re.compile(r"[a-z]{4,}")


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


def _ingredients(text: str) -> set[str]:
    """Return the words of a text plus the class names those words belong to."""
    words = _words(text)
    classes = {name for name, members in DRUG_CLASSES.items() if words & (members | {name, name + "s"})}
    return words | classes


def selected_medication_orders(draft_orders: Any, selections: list[str]) -> list[Any]:
    """Return the draft MedicationRequests the clinician selected (§order-select ``selections``)."""
    wanted = set(selections)
    return [m for m in bundle_resources(draft_orders, "MedicationRequest") if reference(m) in wanted]


def _remove_suggestion(order: Any) -> Suggestion:
    return Suggestion(
        label="Remove this draft order",
        is_recommended=True,
        actions=[Action(type="delete", description="Remove the draft order", resource_id=reference(order))],
    )


def allergy_match(order: Any, allergy: Any) -> bool:
    """Return True when an ordered medication matches an allergy's substance by RxNorm code, name or class."""
    ordered = medication_concept(order)
    if concept_codes(ordered, RXNORM) & concept_codes(allergy.code, RXNORM):
        return True
    substance = _ingredients(concept_text(allergy.code))
    return bool(substance & _ingredients(concept_text(ordered)))


def order_conflict_cards(
    draft_orders: Any, selections: list[str], allergies: Any, medications: Any
) -> list[Card]:
    """Return a card per selected draft order that conflicts with an allergy or duplicates an active drug."""
    cards: list[Card] = []
    for order in selected_medication_orders(draft_orders, selections):
        drug = concept_text(medication_concept(order)) or "this medication"
        for allergy in active_allergies(allergies):
            if allergy_match(order, allergy):
                substance = concept_text(allergy.code) or "a recorded substance"
                cards.append(
                    Card(
                        summary=f"Allergy conflict: {drug} vs recorded allergy to {substance}"[:139],
                        detail=(
                            f"The draft order for **{drug}** matches the active allergy or intolerance to "
                            f"**{substance}** (criticality: {allergy.criticality or 'unknown'})."
                        ),
                        indicator="critical" if allergy.criticality == "high" else "warning",
                        source=RULES_SOURCE,
                        suggestions=[_remove_suggestion(order)],
                        selection_behavior="at-most-one",
                        override_reasons=ALLERGY_OVERRIDES,
                    )
                )
        ordered_codes = concept_codes(medication_concept(order), RXNORM)
        ordered_words = _words(drug)
        for active in active_medication_requests(medications):
            active_drug = concept_text(medication_concept(active))
            same_code = bool(ordered_codes & concept_codes(medication_concept(active), RXNORM))
            if active.id != order.id and (same_code or ordered_words & _words(active_drug)):
                cards.append(
                    Card(
                        summary=f"Duplicate therapy: {drug} duplicates active {active_drug}"[:139],
                        detail=f"The patient already has an active order for **{active_drug}**.",
                        indicator="warning",
                        source=RULES_SOURCE,
                        suggestions=[_remove_suggestion(order)],
                        selection_behavior="at-most-one",
                        override_reasons=DUPLICATE_OVERRIDES,
                    )
                )
    return cards
