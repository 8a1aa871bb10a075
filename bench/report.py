"""Measured against target: the one generic check over ``bench.targets``, and the printed table."""

from __future__ import annotations

import sys

from bench.measures import Measured
from bench.targets import TARGETS

Result = dict  # one row of results.json: measure, value, target, pass, details


def judge(measured: Measured) -> Result:
    """``measured`` checked against its target; prints the PASS/FAIL line at once (progress on long runs)."""
    target = TARGETS[measured.target]
    quantities = {"value": measured.value, **measured.checked}
    details = dict(measured.details)
    outcomes = []
    for check in target["checks"]:
        holds, bound = _holds(check, quantities)
        outcomes.append(holds)
        if "shown_as" in check:  # a bound derived from this run: the details show it, and whether it held
            bound_name, outcome_name = check["shown_as"]
            details[bound_name], details[outcome_name] = round(bound, 1), holds
    ok = all(outcomes)
    print(
        f"{'PASS' if ok else 'FAIL'}  {measured.name}: {measured.value:.3f} (target {target['text']})",
        file=sys.stderr,
        flush=True,
    )
    return {
        "measure": measured.name,
        "value": float(measured.value),
        "target": target["text"],
        "pass": ok,
        "details": details,
    }


def _holds(check: dict, quantities: dict) -> tuple[bool, float | None]:
    """Whether one check of a target holds, and the bound it compared against (None for ``is``)."""
    got = quantities[check["reads"]]
    if "is" in check:
        return bool(got) is check["is"], None
    at_most = "at_most" in check
    bound = check["at_most"] if at_most else check["at_least"]
    if isinstance(bound, dict):  # relative to another quantity of the same run
        bound = bound["times"] * quantities[bound["of"]] + bound.get("plus", 0)
    return bool(got <= bound if at_most else got >= bound), bound


def table(results: list[Result]) -> str:
    """The printed table: one row per measurement, with the end-to-end cross-check of the edit overheads."""

    def note(r):
        d = r["details"]
        if "end_to_end_median" not in d:
            return ""
        lo, hi = d["end_to_end_quartiles"]
        return f"end-to-end edited/base {d['end_to_end_median']:.3f} (IQR {lo:.3f}-{hi:.3f})"

    rows = [("measure", "value", "target", "pass", "cross-check")] + [
        (r["measure"], f"{r['value']:.3f}", r["target"], "PASS" if r["pass"] else "FAIL", note(r)) for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
