"""Timing helpers: interleaved rounds, per-round ratios, and the stopwatch inside an edited call.

Every measure is a ratio of two timings taken in the same process, round by round, so that the machine's
slow and fast spells hit both sides alike (one forward pass on a shared 2-core VM varies by 5-15 %).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any

# glibc returns large freed blocks to the OS, so every forward pass page-faults its activations back in;
# on this VM that made a GPT-2 forward 25 % slower and twice as noisy. Keeping the heap is set before the
# interpreter starts (the variables are read once, at start-up), hence the re-exec in ``bench.__main__``.
STEADY_HEAP = {
    "MALLOC_MMAP_THRESHOLD_": str(2**34),
    "MALLOC_TRIM_THRESHOLD_": str(2**36),
    "MALLOC_TOP_PAD_": str(2**30),
}


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each fn, ``rounds`` rounds, the order rotated each round, after one warm-up each
    (``warmup=False`` for the long measures, whose callers warm up with one small forward instead)."""
    if warmup:
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    return times


def ratios(times: dict[str, list[float]], num: str, den: str) -> list[float]:
    """Per round, ``num``'s time over ``den``'s: each ratio pairs two calls taken back to back."""
    return [a / b for a, b in zip(times[num], times[den], strict=True)]


def race(fns: dict[str, Callable[[], Any]], rounds: int, slow: str, fast: str):
    """Two ways to compute the same thing, timed by :func:`interleaved` (callers warm up themselves): the
    last output of each, the times, and the median per-round speedup of ``fast`` over ``slow``."""
    outputs: dict[str, Any] = {}

    def keeping(name, fn):
        def call():
            outputs[name] = fn()

        return call

    times = interleaved({name: keeping(name, fn) for name, fn in fns.items()}, rounds, warmup=False)
    return outputs, times, statistics.median(ratios(times, slow, fast))


class HookClock:
    """``editor.applied(model)`` with a stopwatch around everything the edit adds to a forward pass:
    building its hooks (``check_model`` + ``hooks``, done on every entry) and each hook call."""

    def __init__(self, editor, model):
        self.editor, self.model, self.seconds = editor, model, 0.0

    @contextlib.contextmanager
    def applied(self):
        t = time.perf_counter()
        self.editor.check_model(self.model)
        hooks = [(name, self._timed(fn)) for name, fn in self.editor.position_hooks(self.model)]
        self.seconds += time.perf_counter() - t
        with self.model.hooks(fwd_hooks=hooks):
            yield

    def _timed(self, fn):
        def hook(x, hook):
            t = time.perf_counter()
            out = fn(x, hook)
            self.seconds += time.perf_counter() - t
            return out

        return hook


def paired(base: Callable[[], object], edited: Callable[[], object], clock: HookClock, rounds: int) -> dict:
    """Alternate base and edited calls (order swapped every round, one warm-up each) and return per round
    the two wall times and the edit's own time inside the edited call."""
    base(), edited()
    out = {"base": [], "edited": [], "edit": []}
    for r in range(rounds):
        for side in ("base", "edited") if r % 2 == 0 else ("edited", "base"):
            before = clock.seconds
            t = time.perf_counter()
            (base if side == "base" else edited)()
            out[side].append(time.perf_counter() - t)
            if side == "edited":
                out["edit"].append(clock.seconds - before)
    return out


def overhead_estimates(t: dict) -> tuple[float, dict]:
    """Edited time / base time, two ways. ``in_call`` (the value): per round, the edited call's time over
    that same call minus the edit's own time, so machine noise hits numerator and denominator alike.
    ``end_to_end``: the median of per-round edited/base ratios; on a shared VM each call varies by
    5-15 %, which swamps a 1-3 % overhead, so it is reported as a cross-check with its quartiles."""
    in_call = [e / (e - x) for e, x in zip(t["edited"], t["edit"], strict=True)]
    e2e = sorted(e / b for e, b in zip(t["edited"], t["base"], strict=True))
    q = statistics.quantiles(e2e, n=4) if len(e2e) > 1 else [e2e[0]] * 3
    return statistics.median(in_call), {
        "in_call_ratios": [round(x, 4) for x in in_call],
        "edit_s": [round(x, 4) for x in t["edit"]],
        "end_to_end_median": round(statistics.median(e2e), 4),
        "end_to_end_quartiles": [round(q[0], 4), round(q[2], 4)],
        "base_s": [round(x, 4) for x in t["base"]],
        "edited_s": [round(x, 4) for x in t["edited"]],
    }
