"""Output schemas of the model tasks: the JSON MedGemma is constrained to, validated before any card exists.

Every string and list is bounded and no extra key is allowed, because the JSON schema of these models is the
grammar of constrained decoding: an unbounded field lets a model loop until ``max_new_tokens`` cuts the JSON,
and without ``extra="forbid"`` pydantic emits no ``additionalProperties: false``, so the grammar would let the
model invent keys.

Token budget (default ``max_new_tokens`` 768). Gemma's 262k vocabulary spends about 4 characters a token
on clinical English and about 3 on FHIR ids; keys, quotes and separators cost about 4 tokens a field and 2
an item.
With every field at its maximum:

- ``PatientSummaryOutput``: 400 + 8 x 60 + 6 x 100 + 6 x 100 characters of prose (~520 tokens) and
  16 x 64 of ids (~380): ~950 tokens. A full answer needs four full lists at once, which a summary of one
  chart seldom has; 768 covers every field but ``evidence_ids`` at its maximum.
- ``ImagingReadOutput``: 1200 + 400 of prose (~400 tokens) and an enum: ~420 tokens. It cites nothing: the
  imaging prompt holds the image and the study's description, no record entries.
- ``OrderReviewOutput``: per concern 64 + 200 + 200 characters and two enums (~155 tokens), 6 concerns and 16
  ids: ~1300 tokens; an order review should ask for about 1280 ``max_new_tokens`` per request.

A cut is not silent. An output that reaches ``max_new_tokens`` without its stop token is rerun once with a
larger budget, then fails as "cut at max_new_tokens" (the failure is a card). A free-text string that fills
its ``max_length`` was closed by the grammar, not by the model: ``capped_strings`` names it, and the card
says that text is cut. The prompts state every key and limit (``prompts.schema_brief``) so the model can
write within them.
"""

from __future__ import annotations

from typing import Annotated
from typing import Any
from typing import Literal

from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import StringConstraints

# A FHIR relative reference "Type/id" (R4 3.1.1.2 Literal References; id: 1-64 of [A-Za-z0-9-.], 2.24.0.1).
# The pattern also keeps escapes and spaces out of ids, which a grammar would otherwise allow.
FhirReference = Annotated[
    str, StringConstraints(min_length=3, max_length=64, pattern=r"^[A-Z][A-Za-z]{0,39}/[A-Za-z0-9\-.]{1,64}$")
]
ProblemText = Annotated[str, StringConstraints(min_length=1, max_length=60)]
NoteText = Annotated[str, StringConstraints(min_length=1, max_length=100)]
EvidenceIds = Annotated[list[FhirReference], Field(max_length=16)]


class PatientSummaryOutput(BaseModel):
    """What MedGemma returns for a chart summary (patient-view)."""

    model_config = ConfigDict(extra="forbid")

    summary: Annotated[str, StringConstraints(min_length=1, max_length=400)]
    key_problems: Annotated[list[ProblemText], Field(max_length=8)]
    medication_concerns: Annotated[list[NoteText], Field(max_length=6)]
    follow_up: Annotated[list[NoteText], Field(max_length=6)]
    evidence_ids: EvidenceIds


class ImagingReadOutput(BaseModel):
    """What MedGemma returns for a read of one imaging study."""

    model_config = ConfigDict(extra="forbid")

    findings: Annotated[str, StringConstraints(min_length=1, max_length=1200)]
    impression: Annotated[str, StringConstraints(min_length=1, max_length=400)]
    urgency: Literal["routine", "urgent", "critical"]


class OrderConcern(BaseModel):
    """One problem with one draft order; ``severity`` maps onto a CDS Hooks card indicator."""

    model_config = ConfigDict(extra="forbid")

    order_id: FhirReference
    severity: Literal["info", "warning", "critical"]
    issue: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    recommendation: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    action: Literal["keep", "change", "remove"]


class OrderReviewOutput(BaseModel):
    """What MedGemma returns for a review of draft orders (order-select, order-sign); no concern is valid."""

    model_config = ConfigDict(extra="forbid")

    concerns: Annotated[list[OrderConcern], Field(max_length=6)]
    evidence_ids: EvidenceIds


def capped_strings(schema: type[BaseModel], output: BaseModel) -> list[str]:
    """Return the paths (``summary``, ``concerns.0.issue``) of free-text strings that fill their maxLength.

    The grammar closes a string at its limit whatever the model was writing, so a string of exactly that
    length was most likely cut mid-sentence. Ids and codes (strings with a pattern or a fixed set of values)
    are not prose and are never reported.
    """
    document = schema.model_json_schema()
    definitions = document.get("$defs", {})
    found: list[str] = []

    def visit(node: dict[str, Any], value: Any, path: list[str]) -> None:
        if "$ref" in node:
            node = definitions[node["$ref"].rsplit("/", 1)[-1]]
        if isinstance(value, str):
            limit = node.get("maxLength")
            free_text = "pattern" not in node and "enum" not in node and "const" not in node
            if free_text and limit is not None and len(value) >= limit:
                found.append(".".join(path))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                visit(node.get("items", {}), item, [*path, str(index)])
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(node.get("properties", {}).get(key, {}), item, [*path, key])

    visit(document, output.model_dump(mode="json"), [])
    return found
