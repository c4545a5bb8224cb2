"""MedGemma's review of draft orders: the prompt context, and its concerns → one card under the rules.

Rules always win when they disagree: an order a rule flagged keeps its rule card even when the model would
keep the order, and the AI card says so.
"""

from __future__ import annotations

from typing import Any

from cds_service.wire import Action
from cds_service.wire import Card
from cds_service.wire import JobRecord
from cds_service.wire import Suggestion
from fhir_mappings.ai_cards import AI_DISCLAIMER
from fhir_mappings.ai_cards import model_source
from fhir_mappings.ai_cards import truncation_note
from fhir_mappings.labs import PatientFacts
from fhir_mappings.markdown import md_text
from fhir_mappings.model_outputs import OrderReviewOutput
from fhir_mappings.order_conflicts import medication_orders
from fhir_mappings.record import medication_text
from fhir_mappings.record_context import citation
from fhir_mappings.record_context import quoted
from fhir_mappings.summary import RULES_SOURCE

SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


def orders_context(draft_orders: Any, selections: list[str] | None) -> tuple[str, list[str]]:
    """Return the draft orders to review (selected ones, or all) as cited lines with their dosage text,
    and their references. Orders without an id or a medication can't be cited and are left out."""
    lines, refs = [], []
    for order in medication_orders(draft_orders, selections)[0]:
        name = medication_text(order, draft_orders)
        cited = citation(order)
        if not cited or not name:
            continue
        dosage = "; ".join(d.text for d in order.dosageInstruction if d.text)
        lines.append(
            f"[{cited}] draft order: {quoted(name)}" + (f" dosage: {quoted(dosage)}" if dosage else "")
        )
        refs.append(cited)
    return "\n".join(lines), refs


def rule_findings_text(cards: list[Card], facts: PatientFacts) -> str:
    """Return what the rule checks found (one line per card) and the labs and age they used, for the model.

    A card's summary names drugs as the record wrote them: it is quoted, as all record text is.
    """
    lines = [
        f"- {card.indicator}: {quoted(card.summary)}"
        for card in cards
        if card.source.label == RULES_SOURCE.label
    ]
    known = [f"age {facts.age}" if facts.age is not None else "", facts.sex or ""]
    known += [lab.describe() for lab in (facts.egfr, facts.potassium) if lab is not None]
    if facts.pregnancy:
        known.append(f"pregnant ({facts.pregnancy})")
    used = ", ".join(k for k in known if k)
    return "\n".join(lines + ([f"Patient data the rules used: {quoted(used)}"] if used else []))


def order_review_card(
    output: OrderReviewOutput, record: JobRecord, selected: list[str], rule_flagged: set[str]
) -> Card | None:
    """Return the AI card for the model's concerns about selected orders, or None when it has none."""
    concerns = [c for c in output.concerns if c.order_id in selected]
    overruled = sorted({c.order_id for c in concerns if c.action == "keep"} & rule_flagged)
    concerns = [c for c in concerns if not (c.action == "keep" and c.order_id in rule_flagged)]
    if not concerns and not overruled:
        return None
    lines = [
        f"**{md_text(c.order_id)}** ({c.severity}): {md_text(c.issue)} Recommendation: "
        f"{md_text(c.recommendation)}"
        for c in concerns
    ]
    notes = [
        f"The model saw no problem with {md_text(ref)}, but the rule check flagged it: the rule card stands."
        for ref in overruled
    ]
    removable = sorted({c.order_id for c in concerns if c.action == "remove"} - rule_flagged)
    severity = max((c.severity for c in concerns), key=SEVERITY_RANK.__getitem__, default="info")
    return Card(
        summary=f"AI order review: {len(concerns)} concern(s) to check (draft, needs clinician review)"[:139],
        detail="\n\n".join(
            [
                "\n".join(f"- {line}" for line in lines) or "_none_",
                *notes,
                *filter(None, [truncation_note(record)]),
                AI_DISCLAIMER,
            ]
        ),
        indicator=severity,  # type: ignore[arg-type]
        source=model_source(record),
        suggestions=[
            Suggestion(
                label=f"Remove {ref} (AI suggestion)",
                actions=[Action(type="delete", description="Remove the draft order", resource_id=ref)],
            )
            for ref in removable
        ],
        selection_behavior="any" if removable else None,
    )
