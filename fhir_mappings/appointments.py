"""Appointments → who is coming and when: the patients of a day's schedule, and whether a booking is soon."""

from __future__ import annotations

from datetime import date
from typing import Any

from fhir_mappings.record import EPOCH
from fhir_mappings.record import as_instant
from fhir_mappings.record import bundle_resources

#: Appointment.status values of a visit that will happen or is happening (R4 AppointmentStatus).
EXPECTED_STATUSES = ("booked", "arrived")


def patient_id_of(reference: str | None) -> str | None:
    """Return the id of a Patient reference (``Patient/1``, ``https://…/Patient/1``, ``…/_history/2``)."""
    if not reference:
        return None
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return parts[-1]
    return None


def appointment_patients(appointments: Any, statuses: tuple[str, ...] = EXPECTED_STATUSES) -> list[str]:
    """Return the ids of the Patients taking part in the appointments with one of ``statuses``, each once,
    in order of the appointments' start (those without a start last)."""
    chosen = [a for a in bundle_resources(appointments, "Appointment") if (a.status or "") in statuses]
    chosen.sort(key=lambda a: (as_instant(a.start) is None, as_instant(a.start) or EPOCH, a.id or ""))
    found: dict[str, None] = {}
    for appointment in chosen:
        for participant in appointment.participant:
            patient_id = patient_id_of(participant.actor.reference if participant.actor else None)
            if patient_id:
                found.setdefault(patient_id, None)
    return list(found)


def starts_by(appointments: Any, last_day: date) -> bool:
    """Return whether an appointment starts on or before ``last_day``, or has no readable start."""
    for appointment in bundle_resources(appointments, "Appointment"):
        start = as_instant(appointment.start)
        if start is None or start.date() <= last_day:
            return True
    return False
