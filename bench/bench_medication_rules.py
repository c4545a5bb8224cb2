"""Prints how well and how fast the medication rules judge labelled cases.

Run: ``.venv/bin/python bench/bench_medication_rules.py [--cases PATH] [--sets PATH ...] [--rounds 200]``.

Allergy and duplicate pairs (``--cases``, ``tests/fhir_mappings/data/medication_cases.json``): recall and
specificity, per kind, the confusion counts and the misclassified ids; then the one-off data load, µs per
``identify()`` with its cache bypassed and µs per allergy or duplicate check.

Order cases in the blind-set format (``--sets``, default every ``medication_cases_blind_*.json`` in the
test data and the examples): each case is sent as a real order-select and order-sign request through the
Flask app's HTTP path (auth off, no Redis: the AI card says so, the rule cards stand), and judged by the
cards of its kind about its order. Per kind and hook: recall, specificity, severity agreement on caught
positives, the misses and how many of them still got a not-checked warning; then the same for coded cases
with every text removed (code-only). Figures only.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from medication_cases import code_only  # noqa: E402
from medication_cases import load_cases  # noqa: E402
from medication_cases import score_cases  # noqa: E402

from fhir_mappings import drugs  # noqa: E402
from fhir_mappings.order_conflicts import rule_flags  # noqa: E402

DATA = ROOT / "tests" / "fhir_mappings" / "data"
CASES = DATA / "medication_cases.json"


def judge(case: dict[str, Any]) -> bool:
    """Return whether the rule cards flag a case (any allergy card, warnings included; any duplicate)."""
    return rule_flags(case["kind"], case["order"], case["other"])


def report(label: str, cases: list[dict[str, Any]]) -> None:
    """Print recall, specificity, counts and misclassified ids of a group of cases."""
    tp = fn = tn = fp = 0
    wrong = []
    for case in cases:
        found = judge(case)
        tp += found and case["expected"]
        fn += not found and case["expected"]
        tn += not found and not case["expected"]
        fp += found and not case["expected"]
        if found != case["expected"]:
            wrong.append(case["id"])
    recall = tp / (tp + fn) if tp + fn else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    print(
        f"{label:<10} cases={len(cases):<4} recall={recall:.3f} specificity={specificity:.3f} "
        f"tp={tp} fn={fn} tn={tn} fp={fp}"
    )
    for case_id in wrong:
        print(f"           misclassified: {case_id}")


def order_case_figures(paths: list[Path]) -> None:
    """Send each set's cases through both order hooks and print the scores per kind and hook."""
    from cds_service.app import create_app
    from cds_service.settings import Settings

    workdir = Path(tempfile.mkdtemp(prefix="bench-medication-"))
    settings = Settings(
        auth_disabled=True,
        # No Redis on this port: the AI review fails fast and drops out; the rule cards are what is scored.
        redis_url="redis://127.0.0.1:9/0",
        database_url=f"sqlite:///{workdir / 'cds.db'}",
        hook_budget_ms=0,
    )
    client = create_app(settings).test_client()
    # The access log and the unreachable model queue's warnings would bury the figures.
    logging.disable(logging.CRITICAL)

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = client.post(path, json=body)
        assert response.status_code == 200, (path, response.status_code, response.json)
        return response.json

    today = date.today()
    for path in paths:
        cases = load_cases(path)
        source = json.loads(path.read_text(encoding="utf-8")).get("source", "")
        print(f"\n{path.name}: {len(cases)} cases ({source[:100]})")
        started = time.perf_counter()
        scores = score_cases(cases, post, today)
        seconds = time.perf_counter() - started
        for (kind, hook), score in sorted(scores.items()):
            print(score.line(f"{kind} {hook}"))
            for wrong in score.wrong:
                print(f"    miss: {wrong}")
        coded = [c for c in (code_only(case) for case in cases) if c is not None]
        print(f"code-only ({len(coded)} coded cases, texts removed):")
        for (kind, hook), score in sorted(score_cases(coded, post, today).items()):
            print(score.line(f"  {kind} {hook}"))
        calls = 2 * len(cases)
        print(f"{calls} hook calls in {seconds:.1f} s ({seconds / max(1, calls) * 1000:.1f} ms each)")


def main() -> None:
    """Score the pair set and the order sets, then time loading, identify() and the two checks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=Path, default=CASES)
    parser.add_argument(
        "--sets",
        type=Path,
        nargs="*",
        default=[
            *sorted(DATA.glob("medication_cases_blind_*.json")),
            DATA / "medication_order_examples.json",
        ],
    )
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    cases = json.loads(args.cases.read_text(encoding="utf-8"))["cases"]

    started = time.perf_counter()
    drugs.preload()
    load_ms = (time.perf_counter() - started) * 1000

    report("all", cases)
    for kind in ("allergy", "duplicate"):
        report(kind, [case for case in cases if case["kind"] == kind])
    holdout = [case for case in cases if case.get("holdout")]
    if holdout:
        report("holdout", holdout)
    if args.sets:
        order_case_figures(args.sets)

    concepts = [
        drugs.DrugConcept(
            texts=tuple(
                t
                for t in [case[side].get("text"), *(c.get("display") for c in case[side].get("coding", []))]
                if t
            ),
            codings=tuple((c.get("system", ""), c.get("code", "")) for c in case[side].get("coding", [])),
        )
        for case in cases
        for side in ("order", "other")
    ]
    uncached = drugs.identify.__wrapped__
    samples = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        for concept in concepts:
            uncached(concept)
        samples.append((time.perf_counter() - started) / len(concepts) * 1e6)
    checks = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        for case in cases:
            judge(case)
        checks.append((time.perf_counter() - started) / len(cases) * 1e6)
    print(f"\ndata load: {load_ms:.1f} ms (once per process)")
    print(
        f"identify(), cache bypassed: median {statistics.median(samples):.1f} µs per concept, "
        f"best round {min(samples):.1f} µs ({len(concepts)} concepts x {args.rounds} rounds)"
    )
    print(f"allergy/duplicate check, identities cached: median {statistics.median(checks):.1f} µs per pair")


if __name__ == "__main__":
    main()
