"""encounter-prep: the patient checked in; have the AI pre-visit summary ready before the chart opens.

It asks for exactly the job patient-summary's chart open will ask for (same prefetch, same job id), ahead of
precomputed work (the patient is here), and never waits for it. It answers no card: check-in needs none.
"""

from __future__ import annotations

from dataclasses import replace

from cds_service.registry import service
from cds_service.wire import HookCall
from cds_service.wire import HookResponse
from hooks.patient_summary import SUMMARY_PREFETCH
from hooks.patient_summary import request_summary_job


@service(
    id="encounter-prep",
    hook="encounter-start",
    title="Check-in preparation",
    description="Starts the AI pre-visit summary (MedGemma draft) when the patient checks in.",
    # Check-in must never fail on our account: data we can't read only means nothing is prepared.
    prefetch={key: replace(p, failure_mode="omit") for key, p in SUMMARY_PREFETCH.items()},
    precomputes="interactive",
)
def encounter_prep(call: HookCall) -> HookResponse:
    """Ask for the patient's summary job (unless a key was unreadable); answer no card."""
    if not call.unavailable:
        request_summary_job(call)
    return HookResponse(cards=[])
