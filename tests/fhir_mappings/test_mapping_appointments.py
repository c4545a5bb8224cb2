"""Appointments → the patients of a day's schedule and whether a booking is soon."""

from __future__ import annotations

from datetime import date
from typing import Any

from fhir_mappings.appointments import appointment_patients
from fhir_mappings.appointments import patient_id_of
from fhir_mappings.appointments import starts_by
from fhir_mappings.read_models import read_resource

SERVER = "https://ehr.test/fhir"
EARLY = {"reference": "Patient/early"}


def schedule(*appointments: dict[str, Any]) -> Any:
    return read_resource({"resourceType": "Bundle", "entry": [{"resource": a} for a in appointments]})


def visit(appointment_id: str, status: str, start: str | None, *actors: Any) -> dict[str, Any]:
    appointment: dict[str, Any] = {"resourceType": "Appointment", "id": appointment_id, "status": status}
    if start:
        appointment["start"] = start
    appointment["participant"] = [{"actor": actor} for actor in actors]
    return appointment


def test_patients_come_in_order_of_their_visit_each_once() -> None:
    day = schedule(
        visit("c", "booked", "2031-05-14T11:00:00+02:00", {"reference": "Patient/late"}),
        visit("a", "arrived", "2031-05-14T08:00:00+02:00", {"reference": "Practitioner/1"}, EARLY),
        visit("b", "booked", "2031-05-14T09:00:00+02:00", {"reference": f"{SERVER}/Patient/late/_history/3"}),
        visit("d", "cancelled", "2031-05-14T07:00:00+02:00", {"reference": "Patient/cancelled"}),
        visit("e", "booked", None, {"reference": "Patient/undated"}),
        # Tolerated as HAPI reads it: one participant not in a list, an actor as a list.
        {"resourceType": "Appointment", "id": "f", "status": "booked", "start": "2031-05-14T10:00:00Z",
         "participant": {"actor": [{"reference": "Patient/tolerated"}]}},
    )  # fmt: skip
    assert appointment_patients(day) == ["early", "late", "tolerated", "undated"]
    assert appointment_patients(None) == []


def test_patient_references_are_read_in_every_form() -> None:
    assert patient_id_of("Patient/p1") == "p1"
    assert patient_id_of("https://ehr.test/fhir/Patient/p1/_history/2") == "p1"
    assert patient_id_of("Group/g1") is None
    assert patient_id_of("Patient/") is None
    assert patient_id_of(None) is None


def test_a_booking_is_soon_when_a_visit_starts_by_the_day() -> None:
    tomorrow = schedule(visit("a", "proposed", "2031-05-15T09:00:00Z"))
    assert starts_by(tomorrow, date(2031, 5, 15))
    assert not starts_by(tomorrow, date(2031, 5, 14))
    assert starts_by(schedule(visit("a", "proposed", None)), date(2031, 5, 14))
    assert not starts_by(schedule(), date(2031, 5, 14))
