"""The peer for ``bench_hooks.py``: HealthChain serving the same patient-view summary card as patient-summary.

Runs in its own virtual environment (``bench/.venv-peer``, HealthChain from PyPI), never beside medgemma-cds:
``bench/.venv-peer/bin/uvicorn --app-dir bench peer_healthchain:app --workers N``. The handler parses the same
prefetch into fhir.resources R4 models and answers the same rule card (counts and markdown lists of active
problems, medications and allergies); it has no model job, audit row or authentication, which ours has.
"""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.patient import Patient
from healthchain.gateway import CDSHooksService
from healthchain.gateway import HealthChainAPI
from healthchain.models import CDSRequest
from healthchain.models import CDSResponse

ACTIVE = {"active", "recurrence", "relapse"}


def _resources(bundle: Bundle | None, resource_type: str) -> list[Any]:
    if bundle is None:
        return []
    return [
        e.resource
        for e in bundle.entry or []
        if e.resource is not None and e.resource.get_resource_type() == resource_type
    ]


def _text(concept: Any) -> str:
    if concept is None:
        return ""
    if concept.text:
        return str(concept.text)
    for coding in concept.coding or []:
        if coding.display or coding.code:
            return str(coding.display or coding.code)
    return ""


def _status(concept: Any) -> str | None:
    codes = [c.code for c in (concept.coding or [])] if concept is not None else []
    return codes[0] if codes else None


def _bundle(data: dict[str, Any] | None) -> Bundle | None:
    return Bundle.model_validate(data) if data is not None else None


def _markdown(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items) or "_none_"


cds = CDSHooksService()


@cds.hook("patient-view", id="patient-summary", title="Patient summary")
def patient_summary(request: CDSRequest) -> CDSResponse:
    """Answer one info card listing active problems, medications and allergies from the prefetch."""
    prefetch = request.prefetch or {}
    Patient.model_validate(prefetch["patient"])
    conditions = _bundle(prefetch.get("conditions"))
    medications = _bundle(prefetch.get("medications"))
    allergies = _bundle(prefetch.get("allergies"))
    _bundle(prefetch.get("observations"))
    problems = sorted(
        {_text(c.code) for c in _resources(conditions, "Condition") if _status(c.clinicalStatus) in ACTIVE}
        - {""}
    )
    meds = sorted(
        {
            _text(m.medicationCodeableConcept)
            for m in _resources(medications, "MedicationRequest")
            if m.status == "active"
        }
        - {""}
    )
    allergy_lines = sorted(
        {
            _text(a.code) + (f" ({a.criticality} criticality)" if a.criticality else "")
            for a in _resources(allergies, "AllergyIntolerance")
            if _status(a.clinicalStatus) in (None, "active")
            and _status(a.verificationStatus) not in ("refuted", "entered-in-error")
        }
        - {""}
    )
    summary = (
        f"{len(problems)} active problems, {len(meds)} active medications, {len(allergy_lines)} allergies"
    )
    detail = "\n\n".join(
        [
            f"**Active problems**\n\n{_markdown(problems)}",
            f"**Active medications**\n\n{_markdown(meds)}",
            f"**Allergies and intolerances**\n\n{_markdown(allergy_lines)}",
        ]
    )
    card = {"summary": summary, "detail": detail, "indicator": "info", "source": {"label": "rules"}}
    return CDSResponse(cards=[card])


app = HealthChainAPI(enable_events=False)
app.register_service(cds)
