"""Prints how well and how fast fhir_mappings/drugs.py judges the labelled medication cases.

Run: ``.venv/bin/python bench/bench_medication_rules.py [--cases PATH] [--rounds 200]``.

Quality: recall and specificity over ``tests/fhir_mappings/data/medication_cases.json`` (allergy conflicts and
duplicate therapy together, then per kind), the confusion counts and the ids of misclassified cases.
Speed: the one-off data load, µs per ``identify()`` call with its cache bypassed (what a concept costs the
first time a hook sees it), and µs per allergy or duplicate check once identities are cached. Figures only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fhir_mappings import drugs  # noqa: E402
from fhir_mappings.order_conflicts import rule_flags  # noqa: E402

CASES = ROOT / "tests" / "fhir_mappings" / "data" / "medication_cases.json"


def concept_of(codeable_concept: dict[str, Any]) -> drugs.DrugConcept:
    """Build a DrugConcept from FHIR CodeableConcept JSON: its text, each display and each coding."""
    codings = codeable_concept.get("coding", [])
    texts = [codeable_concept.get("text"), *(coding.get("display") for coding in codings)]
    return drugs.DrugConcept(
        texts=tuple(text for text in texts if text),
        codings=tuple((coding.get("system", ""), coding.get("code", "")) for coding in codings),
    )


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


def main() -> None:
    """Score the case set, then time loading, identify() and the two checks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=Path, default=CASES)
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

    concepts = [concept_of(case[side]) for case in cases for side in ("order", "other")]
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
    print(f"data load: {load_ms:.1f} ms (once per process)")
    print(
        f"identify(), cache bypassed: median {statistics.median(samples):.1f} µs per concept, "
        f"best round {min(samples):.1f} µs ({len(concepts)} concepts x {args.rounds} rounds)"
    )
    print(f"allergy/duplicate check, identities cached: median {statistics.median(checks):.1f} µs per pair")


if __name__ == "__main__":
    main()
