"""The prompts the model tasks send; text only, versioned by their content (it is part of every job id)."""

from __future__ import annotations

SYSTEM_PROMPT = (
    "You are a clinical decision-support assistant helping a clinician. You are not a clinical-grade system: "
    "be factual and conservative, never invent findings, and say when the record is insufficient. "
    "Answer only with the JSON object requested. Cite the record lines you used by their ids, written "
    "exactly as they appear in square brackets (for example Condition/123)."
)


def summary_prompt(record_text: str) -> str:
    """Return the user turn asking for a pre-visit summary of the record."""
    return (
        "Write a pre-visit summary of this patient's record for the clinician who is about to see them: "
        "a short summary, the key active problems, medication concerns (interactions, duplications, "
        "monitoring due), and follow-up items (overdue labs, vitals out of range).\n\n"
        f"Record:\n{record_text}"
    )


def imaging_prompt(description: str) -> str:
    """Return the user turn asking for a draft report of the image shown."""
    return (
        f"Read this medical image ({description}) and draft a radiology report: findings, an impression, "
        "and an urgency (routine, urgent or critical). Describe only what is visible."
    )


def order_review_prompt(orders_text: str, record_text: str, findings_text: str = "") -> str:
    """Return the user turn asking for a review of draft orders against the record and the rule findings."""
    return (
        "Review these draft medication orders against the patient's record: interactions, contraindications, "
        "allergies, duplications, and dose for age and renal function. The rule checks' findings and the "
        "labs they used are listed: do not repeat them; add only what they miss. For each concern give the "
        "order id, a severity, the issue, a recommendation and whether to keep, change or remove the order. "
        "Return no concern for an order without a problem.\n\n"
        f"Draft orders:\n{orders_text}\n\nRule findings:\n{findings_text or 'none'}\n\nRecord:\n{record_text}"
    )
