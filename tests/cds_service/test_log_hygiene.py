"""Log hygiene: with the root logger at DEBUG, hook calls log no token, JWT, patient name or patient id.

The calls cover the paths that handle PHI or secrets: full prefetch, a read from the FHIR server with a bearer
token, two 412s, a 400 with a name in a bad field, and 401s whose Authorization header carries secrets.
Each record is checked as the service writes it (the JSON line, extras and exception included).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient
from support import PUBLIC_URL
from support import FhirServer
from support import Issuer
from support import fhir_access

from cds_service.logging import JsonFormatter

PATH = "/cds-services/patient-summary"
WRONG_FHIR_TOKEN = "wrong-fhir-token-5d2b9e"
STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


def record_text(record: logging.LogRecord) -> str:
    """Return all a record could write: its message, ``extra`` fields, exception, and the JSON line."""
    extras = {name: value for name, value in vars(record).items() if name not in STANDARD_ATTRIBUTES}
    parts = [record.getMessage(), repr(extras), JsonFormatter().format(record)]
    if record.exc_info:
        parts.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(parts)


def patient_secrets(fhir_server: FhirServer) -> dict[str, str]:
    """Return every sample patient's id, names and identifiers, each labelled for failure messages."""
    return {label: value for label, value in fhir_server.secrets().items() if label.startswith("patient")}


def test_hook_calls_log_no_token_jwt_name_or_patient_id(
    client: FlaskClient,
    issuer: Issuer,
    fhir_server: FhirServer,
    hook_body: Callable[..., dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    secrets = patient_secrets(fhir_server)
    assert len([label for label in secrets if label.startswith("patient name")]) >= 4
    secrets |= {"FHIR access token": fhir_server.token, "wrong FHIR access token": WRONG_FHIR_TOKEN}
    jwts: list[str] = []

    def signed(path: str, audience_path: str | None = None) -> dict[str, str]:
        token = issuer.token(PUBLIC_URL + (audience_path or path))
        jwts.append(token)
        return {"Authorization": f"Bearer {token}"}

    trantow = fhir_server.patients["Trantow"]
    names = fhir_server.get(f"Patient/{trantow}")["name"][0]
    given, family = names["given"][0], names["family"]
    prefetch = {
        "patient": fhir_server.get(f"Patient/{trantow}"),
        "conditions": fhir_server.get(f"Condition?patient={trantow}&clinical-status=active"),
        "medications": fhir_server.get(f"MedicationRequest?patient={trantow}&status=active"),
        "allergies": fhir_server.get(f"AllergyIntolerance?patient={trantow}"),
    }
    # The app exists already (create_app sets the root level), so DEBUG here sticks for the calls below.
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    statuses = []

    full = hook_body("patient-view", trantow, prefetch=prefetch)
    statuses.append(client.post(PATH, json=full, headers=signed(PATH)).status_code)
    fetched = hook_body("patient-view", trantow, **fhir_access(fhir_server.base_url, fhir_server.token))
    statuses.append(client.post(PATH, json=fetched, headers=signed(PATH)).status_code)
    nothing = hook_body("patient-view", trantow)
    statuses.append(client.post(PATH, json=nothing, headers=signed(PATH)).status_code)
    refused = hook_body("patient-view", trantow, **fhir_access(fhir_server.base_url, WRONG_FHIR_TOKEN))
    statuses.append(client.post(PATH, json=refused, headers=signed(PATH)).status_code)
    named = hook_body("patient-view", f"{given} {family}", hookInstance=family)
    named["context"]["userId"] = f"Practitioner/{given} {family}"
    statuses.append(client.post(PATH, json=named, headers=signed(PATH)).status_code)
    statuses.append(
        client.post(PATH, json=fetched, headers=signed(PATH, "/cds-services/order-review")).status_code
    )
    statuses.append(
        client.post(PATH, json=fetched, headers={"Authorization": f"Bearer {fhir_server.token}"}).status_code
    )
    statuses.append(
        client.post(PATH, json=fetched, headers={"Authorization": f"Bearer {jwts[0]}"}).status_code
    )
    assert statuses == [200, 200, 412, 412, 400, 401, 401, 401]

    for token in jwts:
        _header, payload, signature = token.split(".")
        secrets |= {
            f"JWT {token[-12:]}": token,
            f"JWT payload {payload[:12]}": payload,
            f"JWT signature {signature[:12]}": signature,
        }
    records = caplog.records
    # The refusals and the JWT rejections are logged, so an empty capture would mean the check proves nothing.
    assert {"cds_service.auth", "cds_service.errors"} <= {record.name for record in records}
    leaks = [
        f"{label} in {record.name} {record.levelname}: {record.getMessage()[:200]!r}"
        for record in records
        for label, secret in secrets.items()
        if secret in record_text(record)
    ]
    assert not leaks, "\n".join(leaks)
