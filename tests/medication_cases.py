"""Labelled medication-check cases (the blind-set format) as real CDS Hooks requests, and their scoring.

Each case describes one order for one patient. It becomes an ``order-select`` body (the order selected) and
an ``order-sign`` body (every draft signed): the patient (age, sex), active medications, allergies, active
conditions and observations go in the prefetch, the order and the case's other orders in ``draftOrders``.
A case alerts when a rule card of its kind (``KIND_TOPICS``) names that order in a delete suggestion; its
indicator is the most severe such card's. Shared by ``tests/hooks/test_medication_cases.py`` and
``bench/bench_medication_rules.py``.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from datetime import date
from datetime import timedelta
from pathlib import Path
from typing import Any

LOINC = "http://loinc.org"
ORDER_ID = "case-order"
PATIENT_ID = "case-patient"
SERVICES = {"order-select": "/cds-services/order-review", "order-sign": "/cds-services/order-sign-review"}
KIND_TOPICS = {
    "interaction": {"drug-interaction"},
    "renal": {"renal"},
    "potassium": {"potassium"},
    "condition": {"drug-condition"},
    "pregnancy": {"pregnancy"},
    "dose": {"dose"},
    "age": {"age"},
    "tiering": {"allergy-conflict", "cross-reactivity"},
}
RANK = {"info": 0, "warning": 1, "critical": 2}


def load_cases(path: Path) -> list[dict[str, Any]]:
    """Return the cases of a labelled set file."""
    return json.loads(path.read_text(encoding="utf-8"))["cases"]


def _concept(item: dict[str, Any]) -> dict[str, Any]:
    concept: dict[str, Any] = {}
    if item.get("text"):
        concept["text"] = item["text"]
    if item.get("coding"):
        concept["coding"] = item["coding"]
    return concept


def _dosage(dosage: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not dosage:
        return []
    instruction: dict[str, Any] = {}
    if dosage.get("dose") is not None:
        quantity = {"value": dosage["dose"]}
        if dosage.get("unit"):
            quantity["unit"] = dosage["unit"]
        instruction["doseAndRate"] = [{"doseQuantity": quantity}]
    repeat = {k: dosage[k] for k in ("frequency", "period", "periodUnit") if dosage.get(k) is not None}
    if repeat:
        instruction["timing"] = {"repeat": repeat}
    return [instruction] if instruction else []


def _request(resource_id: str, item: dict[str, Any], status: str) -> dict[str, Any]:
    request: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": resource_id,
        "status": status,
        "intent": "order",
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "medicationCodeableConcept": _concept(item),
    }
    dosage = _dosage(item.get("dosage"))
    if dosage:
        request["dosageInstruction"] = dosage
    return request


def _bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def _status(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": f"http://terminology.hl7.org/CodeSystem/{system}", "code": code}]}


def _allergy(index: int, item: dict[str, Any]) -> dict[str, Any]:
    allergy: dict[str, Any] = {
        "resourceType": "AllergyIntolerance",
        "id": f"case-allergy-{index}",
        "patient": {"reference": f"Patient/{PATIENT_ID}"},
        "clinicalStatus": _status("allergyintolerance-clinical", "active"),
        "verificationStatus": _status("allergyintolerance-verification", "confirmed"),
        "code": _concept(item),
    }
    for key in ("type", "criticality"):
        if item.get(key):
            allergy[key] = item[key]
    reaction = item.get("reaction")
    if reaction:
        entry: dict[str, Any] = {"manifestation": [{"text": reaction["manifestation"]}]}
        if reaction.get("severity"):
            entry["severity"] = reaction["severity"]
        allergy["reaction"] = [entry]
    return allergy


def _condition(index: int, item: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": f"case-condition-{index}",
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "clinicalStatus": _status("condition-clinical", "active"),
        "verificationStatus": _status("condition-ver-status", "confirmed"),
        "code": _concept(item),
    }


def _observation(index: int, item: dict[str, Any], today: date) -> dict[str, Any]:
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"case-observation-{index}",
        "status": "final",
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "code": {
            "coding": [
                {"system": LOINC, "code": item["loinc"], "display": item.get("display", item["loinc"])}
            ],
            "text": item.get("display", item["loinc"]),
        },
        "effectiveDateTime": (today - timedelta(days=item.get("days_ago", 0))).isoformat(),
    }
    value = item.get("value")
    if isinstance(value, bool):
        observation["valueCodeableConcept"] = {"text": "positive" if value else "negative"}
    elif isinstance(value, int | float):
        observation["valueQuantity"] = {"value": value, "unit": item.get("unit", "")}
    elif isinstance(value, dict):
        observation["valueCodeableConcept"] = value
    elif value is not None:
        observation["valueCodeableConcept"] = {"text": str(value)}
    return observation


def _birth_date(age: int, today: date) -> str:
    # A month past the birthday, so the age on ``today`` is exactly ``age`` whatever the day.
    born = date(today.year - age, today.month, min(today.day, 28)) - timedelta(days=30)
    return born.isoformat()


def case_bodies(case: dict[str, Any], today: date) -> dict[str, dict[str, Any]]:
    """Return the order-select and order-sign request bodies of a case, keyed by hook."""
    patient_data = case.get("patient") or {}
    patient: dict[str, Any] = {"resourceType": "Patient", "id": PATIENT_ID}
    if patient_data.get("sex"):
        patient["gender"] = patient_data["sex"]
    if patient_data.get("age") is not None:
        patient["birthDate"] = _birth_date(patient_data["age"], today)
    observations = _bundle([_observation(i, o, today) for i, o in enumerate(case.get("observations") or [])])
    prefetch = {
        "patient": patient,
        "medications": _bundle(
            [
                _request(f"case-active-{i}", m, "active")
                for i, m in enumerate(case.get("active_medications") or [])
            ]
        ),
        "allergies": _bundle([_allergy(i, a) for i, a in enumerate(case.get("allergies") or [])]),
        "conditions": _bundle([_condition(i, c) for i, c in enumerate(case.get("conditions") or [])]),
        "observations": observations,
        "labs": observations,
    }
    orders = [_request(ORDER_ID, case["order"], "draft")] + [
        _request(f"case-other-{i}", o, "draft") for i, o in enumerate(case.get("other_orders") or [])
    ]
    bodies = {}
    for hook in SERVICES:
        context: dict[str, Any] = {
            "userId": "Practitioner/case-clinician",
            "patientId": PATIENT_ID,
            "draftOrders": _bundle(copy.deepcopy(orders)),
        }
        if hook == "order-select":
            context["selections"] = [f"MedicationRequest/{ORDER_ID}"]
        bodies[hook] = {
            "hook": hook,
            "hookInstance": str(uuid.uuid4()),
            "context": context,
            "prefetch": copy.deepcopy(prefetch),
        }
    return bodies


def code_only(case: dict[str, Any]) -> dict[str, Any] | None:
    """Return the case with the text and displays of every coded drug, allergy and condition removed, or
    None when the order itself is not coded (such a case can't be scored by codes)."""
    if not case["order"].get("coding"):
        return None
    stripped = copy.deepcopy(case)

    def strip(item: dict[str, Any]) -> None:
        if item.get("coding"):
            item.pop("text", None)
            item["coding"] = [{k: v for k, v in c.items() if k != "display"} for c in item["coding"]]

    strip(stripped["order"])
    for key in ("active_medications", "other_orders", "allergies", "conditions"):
        for item in stripped.get(key) or []:
            strip(item)
    return stripped


def judged(cards: list[dict[str, Any]], kind: str) -> str | None:
    """Return the indicator of the most severe card of ``kind`` about the case's order, or None."""
    found = None
    for card in cards:
        topic = (card.get("source", {}).get("topic") or {}).get("code")
        if topic not in KIND_TOPICS[kind]:
            continue
        targets = {
            action.get("resourceId") for s in card.get("suggestions", []) for action in s.get("actions", [])
        }
        if f"MedicationRequest/{ORDER_ID}" not in targets:
            continue
        if found is None or RANK[card["indicator"]] > RANK[found]:
            found = card["indicator"]
    return found


@dataclass
class Score:
    """Confusion counts and misses of one kind (and hook); severity agreement on caught positives."""

    tp: int = 0
    fn: int = 0
    tn: int = 0
    fp: int = 0
    same_severity: int = 0
    # Missed positives that still got a warning saying something could not be checked (not silent).
    said_not_checked: int = 0
    wrong: list[str] = field(default_factory=list)

    def add(self, case: dict[str, Any], indicator: str | None, not_checked: bool = False) -> None:
        """Count one judged case (``not_checked``: a not-checked warning came with the answer)."""
        expected = case["expected"]
        alert = indicator is not None
        if expected["alert"]:
            self.tp += alert
            self.fn += not alert
            self.said_not_checked += not alert and not_checked
            self.same_severity += alert and indicator == expected.get("severity")
        else:
            self.tn += not alert
            self.fp += alert
        if alert != expected["alert"]:
            self.wrong.append(f"{case['id']}({indicator or 'none'})")

    @property
    def recall(self) -> float:
        """Positives caught, of all positives (1.0 with none)."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def specificity(self) -> float:
        """Negatives left quiet, of all negatives (1.0 with none)."""
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else 1.0

    def line(self, label: str) -> str:
        """One printable line of figures."""
        return (
            f"{label:<26} recall={self.recall:.3f} ({self.tp}/{self.tp + self.fn}) "
            f"specificity={self.specificity:.3f} ({self.tn}/{self.tn + self.fp}) "
            f"severity-agree={self.same_severity}/{self.tp}"
            + (f" misses-with-not-checked={self.said_not_checked}/{self.fn}" if self.fn else "")
        )


def score_cases(
    cases: list[dict[str, Any]], post: Callable[[str, dict[str, Any]], dict[str, Any]], today: date
) -> dict[tuple[str, str], Score]:
    """Send every case through both hooks with ``post(path, body) -> response JSON``; return scores by
    (kind, hook)."""
    scores: dict[tuple[str, str], Score] = {}
    for case in cases:
        for hook, body in case_bodies(case, today).items():
            cards = post(SERVICES[hook], body)["cards"]
            warned = any(
                (c["source"].get("topic") or {}).get("code") == "not-checked" and c["indicator"] != "info"
                for c in cards
            )
            scores.setdefault((case["kind"], hook), Score()).add(case, judged(cards, case["kind"]), warned)
    return scores
