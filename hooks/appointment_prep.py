"""appointment-prep: a visit was just booked; have the AI pre-visit summary ready before the chart opens.

It asks for exactly the job patient-summary's chart open will ask for (same prefetch, same job id), on the
lower-priority precompute queue, and never waits for it.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from cds_service.registry import service
from cds_service.wire import Card
from cds_service.wire import HookCall
from cds_service.wire import HookResponse
from cds_service.wire import Source
from fhir_mappings.appointments import starts_by
from hooks.patient_summary import SUMMARY_PREFETCH
from hooks.patient_summary import request_summary_job

# A result lives a day in Redis (RESULT_TTL_S); later visits are prepared by the morning sweep of their day.
PREPARE_DAYS_AHEAD = 1


@service(
    id="appointment-prep",
    hook="appointment-book",
    title="Pre-visit preparation",
    description="Starts the AI pre-visit summary (MedGemma draft) when a visit today or tomorrow is booked.",
    # Booking must never fail on our account: data we can't read only means nothing is prepared.
    prefetch={key: replace(p, failure_mode="omit") for key, p in SUMMARY_PREFETCH.items()},
    precomputes="background",
)
def appointment_prep(call: HookCall) -> HookResponse:
    """Ask for the summary job of a soon-booked patient; one info card saying it will be ready, or none."""
    soon = starts_by(call.appointments, call.today + timedelta(days=PREPARE_DAYS_AHEAD))
    # With a key unreadable, the chart open would read another record: a job for this one would be wasted.
    if not soon or call.unavailable:
        return HookResponse(cards=[])
    job, _ = request_summary_job(call)
    if job is None or job.state == "failed":
        return HookResponse(cards=[])
    card = Card(
        summary="Pre-visit summary will be ready",
        detail="An AI pre-visit summary (MedGemma draft, needs clinician review) is being prepared for this "
        "patient's chart.",
        indicator="info",
        source=Source(label="MedGemma CDS"),
    )
    return HookResponse(cards=[card])
