"""The served hook path under load: 64 concurrent new charts with no model worker all get their rule cards.

A dedicated ``medgemma-cds serve`` (gevent workers, the default SQLite store, its own Redis database, the
default 1500 ms budget) so no test worker elsewhere in the run can take the jobs. No timing assert: timing
lives in ``bench/bench_hooks.py``.
"""

from __future__ import annotations

import copy
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import SAMPLE
from support import Issuer
from support import RedisServer
from support import leaks_in_log
from support import served_on_sqlite

SUMMARY = "/cds-services/patient-summary"


@pytest.fixture(scope="module")
def served(
    issuer: Issuer, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, Path]]:
    """Serve with the embedded defaults but auth on; yield the URL, the SQLite file and the log."""
    with served_on_sqlite(issuer, redis_server.new_database(), tmp_path_factory.mktemp("served")) as served:
        yield served


def new_chart(number: int) -> dict[str, Any]:
    """The demo patient's chart as prefetch, made a chart never seen before (own id, own problem text)."""
    (path,) = SAMPLE.glob("Kermit_Trantow_*.json")
    resources = [e["resource"] for e in json.loads(path.read_text())["entry"]]
    patient_id = f"load-{number}-{uuid.uuid4().hex[:8]}"

    def search(resource_type: str) -> dict[str, Any]:
        found = [copy.deepcopy(r) for r in resources if r["resourceType"] == resource_type]
        return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in found]}

    patient = next(copy.deepcopy(r) for r in resources if r["resourceType"] == "Patient") | {"id": patient_id}
    conditions = search("Condition")
    conditions["entry"][0]["resource"]["code"]["text"] = f"Hypertension (chart {number})"
    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/p1", "patientId": patient_id},
        "prefetch": {
            "patient": patient,
            "conditions": conditions,
            "medications": search("MedicationRequest"),
            "allergies": search("AllergyIntolerance"),
            "observations": search("Observation"),
        },
    }


def test_64_concurrent_new_charts_with_no_worker_all_get_their_rule_cards(
    served: tuple[str, Path, Path], issuer: Issuer
) -> None:
    url, database, log_path = served
    bodies = [new_chart(n) for n in range(64)]

    def call(body: dict[str, Any]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {issuer.token(url + SUMMARY)}"}
        return httpx.post(url + SUMMARY, json=body, headers=headers, timeout=30)

    with ThreadPoolExecutor(max_workers=64) as pool:
        responses = list(pool.map(call, bodies))

    for response in responses:
        assert response.status_code == 200, response.text
        summaries = [card["summary"] for card in response.json()["cards"]]
        # The rule card, and the AI said to be unavailable (no worker: the hook did not wait for it).
        assert summaries[0].endswith("allergies"), summaries
        assert summaries[1:] == ["Pre-visit summary: AI analysis unavailable"]

    # The audit rows came from the background writer, off the request path, one per call.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with sqlite3.connect(database) as connection:
            rows = connection.execute("SELECT COUNT(*), MIN(status) FROM hook_audit").fetchone()
        if rows[0] >= 64:
            break
        time.sleep(0.2)
    assert rows == (64, 200)
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    # One JSON access line per request: route template and service id, never the patient id.
    access = [
        json.loads(line) for line in log_path.read_text().splitlines() if '"cds_service.access"' in line
    ]
    hooks = [line for line in access if line["route"] == "/cds-services/<service_id>"]
    assert len(hooks) >= 64
    assert {line["service"] for line in hooks} == {"patient-summary"}
    assert all(line["status"] == 200 and line["latency_ms"] > 0 and line["request_id"] for line in hooks)
    assert not leaks_in_log(
        log_path, {f"patient {b['context']['patientId']}": b["context"]["patientId"] for b in bodies}
    )
