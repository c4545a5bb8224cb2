"""Real request bodies (tests/data/requests, sources in its README): every one answers 200 with its card.

What the CDS Hooks sandbox sends from Patient View, Rx View and Rx Sign, and deviations EHRs are known for.
The patient is allergic to penicillins; every amoxicillin order must meet the allergy card, or, where the
order or the allergy list truly can't be read, a card that says it was not checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

CORPUS = Path(__file__).resolve().parents[1] / "data" / "requests"
SERVICE_OF_HOOK = {
    "patient-view": "patient-summary",
    "order-select": "order-review",
    "order-sign": "order-sign-review",
}
NOT_CHECKED = {
    "sandbox-rx-view-no-medication.json",
    "ehr-entry-fullurl-only.json",
    "ehr-allergies-outcome-error-only.json",
}


def topic(card: dict[str, Any]) -> str | None:
    return card["source"].get("topic", {}).get("code")


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.glob("*.json")))
def test_each_real_request_answers_its_card(client, issuer, name: str) -> None:
    body = json.loads((CORPUS / name).read_text())
    path = f"/cds-services/{SERVICE_OF_HOOK[body['hook']]}"

    response = client.post(path, json=body, headers=issuer.headers(path))

    assert response.status_code == 200, response.json
    cards = response.json["cards"]
    if body["hook"] == "patient-view":
        assert any(c["summary"].endswith("allergy") or "allerg" in c["summary"] for c in cards), cards
    elif name in NOT_CHECKED:
        rules = [c for c in cards if c["source"]["label"] == "MedGemma CDS rules"]
        assert [topic(c) for c in rules if topic(c)] == ["not-checked"], cards
    else:
        conflicts = [c for c in cards if topic(c) == "allergy-conflict"]
        assert len(conflicts) == 1, cards
        assert conflicts[0]["indicator"] == "critical"
        assert conflicts[0]["suggestions"][0]["actions"][0]["type"] == "delete"
