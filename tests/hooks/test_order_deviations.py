"""Property: however an EHR bends a conflicting order, its allergy or the active list, or writes the drugs,
the answer says so or "not checked".

From a valid order-select (and order-sign) body where amoxicillin meets a penicillin allergy, random
deviations are applied: any element dropped, lists wrapped or unwrapped, unknown elements and extensions
added, the medication moved into a contained Medication or a draftOrders entry. Every answer must be 200
with the conflict card or a "not checked" card, never neither. Likewise for interacting pairs whose names
vary (case, salt, strength, form, a one-letter slip) and whose active drug is listed by concept, by an
included or an unresolved reference, among other drugs, on a first page of several.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
ORDER = {
    "resourceType": "MedicationRequest",
    "id": "d1",
    "status": "draft",
    "intent": "order",
    "subject": {"reference": "Patient/p1"},
    "medicationCodeableConcept": {
        "coding": [{"system": RXNORM, "code": "308182", "display": "Amoxicillin 250 MG Oral Capsule"}],
        "text": "Amoxicillin 250 MG Oral Capsule",
    },
    "dosageInstruction": [{"text": "250 mg three times daily"}],
}
ALLERGY = {
    "resourceType": "AllergyIntolerance",
    "id": "a1",
    "clinicalStatus": {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}
        ]
    },
    "verificationStatus": {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                "code": "confirmed",
            }
        ]
    },
    "criticality": "high",
    "code": {"coding": [{"system": SNOMED, "code": "91936005", "display": "Allergy to penicillin"}]},
    "patient": {"reference": "Patient/p1"},
}
NOISE = st.sampled_from(
    [
        {"url": "http://ehr.example/ext", "valueString": "x"},
        [{"url": "http://ehr.example/ext", "valueBoolean": True}],
        "unexpected",
        17,
        None,
        {"nested": {"deeper": [1, "two"]}},
    ]
)


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to an element below ``node`` (dict keys and list indexes), resourceType excluded."""
    found: list[tuple[Any, ...]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        if key == "resourceType":
            continue
        found.append(prefix + (key,))
        found += paths(child, prefix + (key,))
    return found


def parent_of(root: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        root = root[key]
    return root


@st.composite
def deviated(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Return (order, allergy, extra draftOrders entries) after a few random deviations."""
    order, allergy = copy.deepcopy(ORDER), copy.deepcopy(ALLERGY)
    extra: list[dict[str, Any]] = []
    if draw(st.booleans()):
        medication = {
            "resourceType": "Medication",
            "id": "m1",
            "code": order.pop("medicationCodeableConcept"),
        }
        if draw(st.booleans()):
            order["contained"] = [medication]
            order["medicationReference"] = {"reference": "#m1"}
        else:
            extra.append({"fullUrl": "urn:uuid:4a1b", "resource": medication})
            order["medicationReference"] = {
                "reference": draw(st.sampled_from(["urn:uuid:4a1b", "Medication/m1"]))
            }
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        target = draw(st.sampled_from([order, allergy]))
        options = paths(target)
        if not options:
            continue
        path = draw(st.sampled_from(options))
        parent, key = parent_of(target, path), path[-1]
        operation = draw(st.sampled_from(["drop", "wrap", "unwrap", "noise", "extension"]))
        if operation == "drop":
            if isinstance(parent, list):
                parent.pop(key)
            else:
                del parent[key]
        elif operation == "wrap":
            parent[key] = [parent[key]]
        elif operation == "unwrap" and isinstance(parent[key], list) and parent[key]:
            parent[key] = parent[key][0]
        elif operation == "noise" and isinstance(parent[key], dict):
            parent[key][draw(st.sampled_from(["vendorField", "_text", "modifierExtension"]))] = copy.deepcopy(
                draw(NOISE)
            )  # sampled values are shared objects: never mutate them
        elif operation == "extension" and isinstance(parent[key], dict):
            parent[key]["extension"] = [{"url": "http://ehr.example/ext", "valueCode": "x"}]
    return order, allergy, extra


def is_conflict_or_not_checked(card: dict[str, Any]) -> bool:
    topic = card["source"].get("topic", {}).get("code")
    return topic in ("allergy-conflict", "cross-reactivity", "not-checked")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=deviated(), hook=st.sampled_from(["order-select", "order-sign"]))
def test_a_conflict_is_never_silent(client, issuer, case, hook) -> None:
    order, allergy, extra = case
    path = "/cds-services/order-review" if hook == "order-select" else "/cds-services/order-sign-review"
    context: dict[str, Any] = {
        "userId": "Practitioner/COREPRACTITIONER1",
        "patientId": "p1",
        "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": order}, *extra]},
    }
    if hook == "order-select":
        context["selections"] = ["MedicationRequest/d1"]
    body = {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "context": context,
        "prefetch": {
            "allergies": {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": allergy}]},
            "medications": None,
        },
    }
    response = client.post(path, json=body, headers=issuer.headers(path))
    assert response.status_code == 200, response.json
    cards = response.json["cards"]
    assert any(is_conflict_or_not_checked(card) for card in cards), (order, allergy, cards)


#: Interacting pairs (ordered drug, active drug): what the EHR calls them varies, the interaction must not.
PAIRS = [
    ("Clarithromycin", "Simvastatin"),
    ("Ibuprofen", "Warfarin"),
    ("Sertraline", "Phenelzine"),
    ("Sildenafil", "Isosorbide mononitrate"),
]


@st.composite
def drug_text(draw: st.DrawFn, name: str) -> str:
    """Return a drug name as EHRs write it: any case, a salt, a strength, a form, maybe a one-letter slip."""
    if draw(st.booleans()) and len(name) >= 9:
        index = draw(st.integers(min_value=2, max_value=len(name) - 2))
        slip = draw(st.sampled_from(["drop", "double", "swap"]))
        if slip == "drop":
            name = name[:index] + name[index + 1 :]
        elif slip == "double":
            name = name[:index] + name[index] + name[index:]
        else:
            name = name[:index] + name[index + 1] + name[index] + name[index + 2 :]
    name = draw(st.sampled_from([name, name.upper(), name.lower(), name.title()]))
    salt = draw(st.sampled_from(["", " hydrochloride", " HCl", " sodium"]))
    strength = draw(st.sampled_from(["", " 500 mg", " 20MG", " 0.5 mg/mL", " 10 MG"]))
    form = draw(st.sampled_from(["", " tablet", " Oral Tablet", " ER capsule", " oral suspension"]))
    return f"{name}{salt}{strength}{form}".strip()


@st.composite
def active_list(draw: st.DrawFn, active: str) -> tuple[dict[str, Any], bool]:
    """Return a medications Bundle holding ``active`` among unrelated drugs (by concept or reference, maybe
    paged), and whether the active drug is readable at all (an unresolved reference is not)."""
    text = draw(drug_text(active))
    concept = {"text": text}
    entry: dict[str, Any] = {"resourceType": "MedicationRequest", "id": "a1", "status": "active"}
    entries: list[dict[str, Any]] = []
    readable = True
    how = draw(st.sampled_from(["concept", "included", "unresolved"]))
    if how == "concept":
        entry["medicationCodeableConcept"] = concept
    else:
        entry["medicationReference"] = {"reference": "Medication/med-a1"}
        if how == "included":
            medication = {"resourceType": "Medication", "id": "med-a1", "code": concept}
            entries.append({"resource": medication, "search": {"mode": "include"}})
        else:
            readable = False
    others = [
        {
            "resourceType": "MedicationRequest",
            "id": f"o{i}",
            "status": "active",
            "medicationCodeableConcept": {"text": t},
        }
        for i, t in enumerate(
            draw(
                st.lists(
                    st.sampled_from(["Amlodipine 5 mg", "Levothyroxine 50 mcg", "Metformin 500 mg"]),
                    max_size=3,
                )
            )
        )
    ]
    position = draw(st.integers(min_value=0, max_value=len(others)))
    resources = others[:position] + [entry] + others[position:]
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources] + entries,
    }
    if draw(st.booleans()):
        bundle["total"] = len(resources) + 20
        bundle["link"] = [{"relation": "next", "url": "https://ehr.example/fhir/MedicationRequest?page=2"}]
    return bundle, readable


def interaction_or_not_checked(cards: list[dict[str, Any]]) -> bool:
    topics = {card["source"].get("topic", {}).get("code") for card in cards}
    return bool(topics & {"drug-interaction", "not-checked", "read-as"})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), pair=st.sampled_from(PAIRS), hook=st.sampled_from(["order-select", "order-sign"]))
def test_an_interaction_is_never_silent_however_drugs_are_written_or_listed(
    client, issuer, data, pair, hook
) -> None:
    ordered, active = pair
    order = {
        "resourceType": "MedicationRequest",
        "id": "d1",
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": {"text": data.draw(drug_text(ordered))},
    }
    medications, readable = data.draw(active_list(active))
    path = "/cds-services/order-review" if hook == "order-select" else "/cds-services/order-sign-review"
    context: dict[str, Any] = {
        "userId": "Practitioner/COREPRACTITIONER1",
        "patientId": "p1",
        "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": order}]},
    }
    if hook == "order-select":
        context["selections"] = ["MedicationRequest/d1"]
    body = {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "context": context,
        "prefetch": {"allergies": None, "medications": medications},
    }
    response = client.post(path, json=body, headers=issuer.headers(path))
    assert response.status_code == 200, response.json
    cards = response.json["cards"]
    assert interaction_or_not_checked(cards), (order, medications, cards)
    if not readable or "link" in medications:
        assert any(card["source"].get("topic", {}).get("code") == "not-checked" for card in cards), cards
