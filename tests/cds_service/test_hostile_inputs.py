"""Hostile hook bodies cost a served API a bounded amount: each answer is a 4xx or says what was too large.

A dedicated ``medgemma-cds serve`` (default options, SQLite store) gets an order-sign body just under the
2 MB body limit (100 draft orders against 2,000 medications: a card per pair without the limits), one just
over it, and an order-select with 100 selections. The service's processes may grow by at most 100 MB in all.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from support import Issuer
from support import RedisServer
from support import free_port
from support import service_env
from support import wait_for_http

from cds_service.demo import draft_order
from cds_service.demo import sample_resources
from cds_service.settings import Settings

LIMITS = Settings.model_fields
MAX_BODY = LIMITS["max_body_bytes"].default
MAX_CARDS = LIMITS["max_cards"].default
MAX_GROWTH_MB = 100
TOO_LARGE = "too large"


@pytest.fixture(scope="module")
def served(
    issuer: Issuer, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int]]:
    """Serve with the default options (authentication off); yield the URL and the master's process id."""
    workdir = tmp_path_factory.mktemp("hostile")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = service_env(f"sqlite:///{workdir / 'cds.db'}", redis_server.new_database(), issuer, url)
    env["MEDGEMMA_CDS_AUTH_DISABLED"] = "true"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "medgemma-cds"), "serve", "--port", str(port)],
        env=env,
        stdout=(workdir / "serve.log").open("w"),
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    try:
        wait_for_http(f"{url}/healthz")
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=15)


def tree_rss_mb(root: int) -> float:
    """Return the resident memory of a process and its children, in MB (Linux ``/proc``)."""
    children = Path(f"/proc/{root}/task/{root}/children").read_text().split()
    total_kb = 0
    for pid in [root, *map(int, children)]:
        status = Path(f"/proc/{pid}/status").read_text()
        total_kb += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return total_kb / 1024


def order_call(hook: str, orders: int, medications: int) -> dict[str, Any]:
    """Return an order hook call on the demo patient with ``orders`` draft orders (each selected, for
    order-select) and ``medications`` active medications in its prefetch."""
    resources = sample_resources()
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    on_file = [r for r in resources if r["resourceType"] == "MedicationRequest"]
    drafts = [draft_order(patient["id"]) | {"id": f"draft-{n}"} for n in range(orders)]
    listed = [copy.deepcopy(on_file[n % len(on_file)]) | {"id": f"active-{n}"} for n in range(medications)]
    context: dict[str, Any] = {
        "userId": "Practitioner/p1",
        "patientId": patient["id"],
        "draftOrders": {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": d} for d in drafts],
        },
    }
    if hook == "order-select":
        context["selections"] = [f"MedicationRequest/{d['id']}" for d in drafts]
    return {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "context": context,
        "prefetch": {
            "patient": patient,
            "medications": {
                "resourceType": "Bundle",
                "type": "searchset",
                "entry": [{"resource": m} for m in listed],
            },
        },
    }


def body_near(limit: int, over: bool) -> bytes:
    """Return an order-sign body just under (or just over) ``limit`` bytes."""
    call = order_call("order-sign", 100, 2000)
    body = orjson.dumps(call)
    assert len(body) < limit, "the base body must fit; pad it up to the limit"
    call["context"]["draftOrders"]["entry"][0]["resource"]["note"] = [
        {"text": "x" * (limit - len(body) - 200 + (400 if over else 0))}
    ]
    return orjson.dumps(call)


def test_hostile_bodies_answer_4xx_or_a_too_large_card_within_100_mb(served: tuple[str, int]) -> None:
    url, master = served
    calls = [
        ("order-sign-review", body_near(MAX_BODY, over=False)),
        ("order-sign-review", body_near(MAX_BODY, over=True)),
        ("order-review", orjson.dumps(order_call("order-select", 100, 120))),
    ]
    assert len(calls[0][1]) > MAX_BODY - 1000 and len(calls[1][1]) > MAX_BODY
    with httpx.Client(timeout=120) as client:
        json_type = {"Content-Type": "application/json"}
        small = orjson.dumps(order_call("order-select", 1, 3))
        warm = client.post(f"{url}/cds-services/order-review", content=small, headers=json_type)
        assert warm.status_code == 200
        before = tree_rss_mb(master)
        for _ in range(3):
            for service, body in calls:
                response = client.post(f"{url}/cds-services/{service}", content=body, headers=json_type)
                if len(body) > MAX_BODY:
                    assert response.status_code == 413, response.text[:300]
                    continue
                assert response.status_code == 200, response.text[:300]
                cards = response.json()["cards"]
                assert len(cards) <= MAX_CARDS
                assert any(TOO_LARGE in card["summary"] for card in cards), [c["summary"] for c in cards]
        grown = tree_rss_mb(master) - before
    assert grown <= MAX_GROWTH_MB, f"the API's processes grew by {grown:.0f} MB"
