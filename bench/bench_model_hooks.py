"""Hook latency with a model job in flight vs a rule-only hook, and the cache-hit latency, over real HTTP.

Runs ``medgemma-cds serve`` (gunicorn) and a ``medgemma-cds worker`` on the tiny Gemma3 checkpoint, with a
throw-away Redis and database, and measures one call at a time (median of N):

- rule-only: ``order-review`` for an order that is not a medication (no model job at all);
- in flight: ``patient-summary`` for a record whose summary job is queued or running (the hook waits for
  its budget, then answers the rule card and the "running" card);
- cache hit: the same ``patient-summary`` once its job is done (the finished result is one Redis read).

Prints figures only. Usage: ``.venv/bin/python bench/bench_model_hooks.py [--budget-ms 1500] [--rounds 15]``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from bench_hooks import database
from bench_hooks import free_port
from bench_hooks import redis_server
from bench_hooks import running
from bench_hooks import sequential_ms

from cds_service.demo import hook_bodies
from worker.tiny_model import build_tiny_model

BIN = Path(sys.executable).parent


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a hook and return its JSON (the bench runs with authentication off)."""
    response = httpx.post(url, json=body, timeout=60)
    response.raise_for_status()
    return dict(response.json())


def with_note(body: dict[str, Any], note: str) -> dict[str, Any]:
    """Return the hook body with the patient's narrative changed, so its model job is a new one."""
    changed = json.loads(json.dumps(body))
    changed["prefetch"]["patient"]["text"] = {
        "status": "generated",
        "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{note}</div>',
    }
    return changed


def main() -> None:
    """Start the stack, measure the three latencies, print them and their ratios."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget-ms", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=15)
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder, redis_server() as redis_url, database(Path(folder)) as db:
        model = build_tiny_model(Path(folder) / "tiny")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = dict(os.environ) | {
            "MEDGEMMA_CDS_REDIS_URL": redis_url,
            "MEDGEMMA_CDS_DATABASE_URL": db,
            "MEDGEMMA_CDS_PUBLIC_URL": base,
            "MEDGEMMA_CDS_AUTH_DISABLED": "true",
            "MEDGEMMA_CDS_TEXT_MODEL": str(model),
            "MEDGEMMA_CDS_IMAGE_MODEL": str(model),
            "MEDGEMMA_CDS_DEVICE": "cpu",
            "MEDGEMMA_CDS_HOOK_BUDGET_MS": str(options.budget_ms),
            "MEDGEMMA_CDS_MAX_NEW_TOKENS": "4096",
            # Shared by the API and the worker: job requests in Redis are encrypted with a key from it.
            "MEDGEMMA_CDS_SECRET_KEY": secrets.token_urlsafe(32),
        }
        serve = [str(BIN / "medgemma-cds"), "serve", "--port", str(port)]
        with running(serve, f"{base}/healthz", env=env):
            discovery = httpx.get(f"{base}/cds-services").json()
            bodies = dict(hook_bodies(discovery))
            summary_body, order_body = (
                bodies["patient-summary"],
                json.loads(json.dumps(bodies["order-review"])),
            )
            # A non-medication order: the rules have nothing to check and no model job is made.
            order_body["context"]["draftOrders"]["entry"] = [
                {"resource": {"resourceType": "ServiceRequest", "id": "sr1", "status": "draft",
                              "intent": "order", "subject": {"reference": "Patient/x"}}}
            ]  # fmt: skip
            order_body["context"]["selections"] = ["ServiceRequest/sr1"]
            order_url = f"{base}/cds-services/order-review"
            rule_only = sequential_ms(lambda: post(order_url, order_body), options.rounds)

            summary_url = f"{base}/cds-services/patient-summary"
            # No worker yet: every call finds its job queued and waits out the budget.
            in_flight = sequential_ms(
                lambda: post(summary_url, with_note(summary_body, "queued")), max(3, options.rounds // 5)
            )
            worker = [str(BIN / "medgemma-cds"), "worker", "--queue", "text"]
            with running(worker, f"{base}/healthz", env=env):
                cached_body = with_note(summary_body, f"cache {uuid.uuid4()}")
                deadline = time.monotonic() + 300
                while not any(
                    card["summary"].startswith("AI pre-visit summary")
                    for card in post(summary_url, cached_body)["cards"]
                ):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the summary job never finished")
                    time.sleep(0.5)
                cache_hit = sequential_ms(lambda: post(summary_url, cached_body), options.rounds)

    rule, flight, hit = (statistics.median(x) for x in (rule_only, in_flight, cache_hit))
    print(f"hook budget {options.budget_ms} ms; one call at a time, median of the rounds")
    print(f"  rule-only hook (no model job)           {rule:8.1f} ms")
    print(f"  patient-summary, model job in flight    {flight:8.1f} ms   x{flight / rule:.1f} of rule-only")
    print(f"  patient-summary, finished job (cache)   {hit:8.1f} ms   x{hit / rule:.1f} of rule-only")
    print(f"  in flight stays within the budget: {flight:.0f} ms <= {options.budget_ms} ms + overhead")


if __name__ == "__main__":
    main()
