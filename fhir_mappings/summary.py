"""Patient summary card: counts of active problems, medications and allergies, with markdown lists."""

from __future__ import annotations

from typing import Any

from cds_service.wire import Card
from cds_service.wire import Source
from fhir_mappings.markdown import markdown_list
from fhir_mappings.record import active_allergies
from fhir_mappings.record import active_conditions
from fhir_mappings.record import active_medication_requests
from fhir_mappings.record import concept_text
from fhir_mappings.record import medication_concept

RULES_SOURCE = Source(label="MedGemma CDS rules")


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def summary_cards(patient: Any, conditions: Any, medications: Any, allergies: Any) -> list[Card]:
    """Return one info card summarising the active record; the summary carries counts only."""
    if patient is None:
        return []
    problems = sorted({concept_text(c.code) for c in active_conditions(conditions)} - {""})
    meds = sorted(
        {concept_text(medication_concept(m)) for m in active_medication_requests(medications)} - {""}
    )
    allergy_lines = sorted(
        {
            concept_text(a.code) + (f" ({a.criticality} criticality)" if a.criticality else "")
            for a in active_allergies(allergies)
        }
        - {""}
    )
    summary = (
        f"{_plural(len(problems), 'active problem')}, {_plural(len(meds), 'active medication')}, "
        f"{_plural(len(allergy_lines), 'allergy', 'allergies')}"
    )
    detail = "\n\n".join(
        [
            f"**Active problems**\n\n{markdown_list(problems)}",
            f"**Active medications**\n\n{markdown_list(meds)}",
            f"**Allergies and intolerances**\n\n{markdown_list(allergy_lines)}",
        ]
    )
    return [Card(summary=summary, detail=detail, indicator="info", source=RULES_SOURCE)]
