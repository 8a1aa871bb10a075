"""``python -m bench [--smoke] [--out PATH] [--cache DIR] [--threads N] [--only NAME ...]``: performance ratios.

Every target is a ratio of two timings taken in the same process, interleaved round by round (the order
alternates) after one untimed warm-up of each side. Prints a table and writes ``results.json`` (default
``bench/results.json``) with each measure's value, target, pass/fail and raw timings.

Edit overheads (forward, generation) are measured inside the edited call: the time spent building and
running the edit's hooks against the rest of that same call (``HookClock``), so the machine's noise hits
both sides alike. On this shared 2-core VM one forward pass varies by 5-15 % from call to call, more
than the 1-5 % being measured; the end-to-end median of paired edited/base calls is printed next to it as
a cross-check, with its quartiles. The other ratios are end to end. One torch thread by default and a
heap that keeps freed memory (``STEADY_HEAP``, set by re-executing) make timings steadier; the memory
measure runs its steps in fresh processes with the default allocator.

Models: random-init checkpoints of real shapes, saved with transformers and loaded with
``hpr.load_model(dir)`` (see ``bench/models.py``): GPT-2 small; a Llama-shaped 8-layer d_model 1024 GQA
model; and, for the ``realshape`` group, the shape of SmolLM2-135M-Instruct (the real model users run on
CPU: Llama, 30 layers, d_model 576, 9 heads / 3 KV heads, d_mlp 1536, vocabulary 49152, tied embeddings),
where collection and scoring with shared contexts (``hpr.continuations``) are timed against the paths
they replaced (``bench/naive.py``) on TruthfulQA prompts with the lm-eval QA primer.
``--smoke`` runs every measure on 2-layer d_model 64 models at tiny sizes (seconds; values meaningless).

Layout: ``timing.py`` (interleaved rounds, the in-call stopwatch), ``memory_worker.py`` (peak RSS in fresh
processes), ``measures.py`` and ``realshape.py`` (one function per measure, each returning what it
measured), ``targets.py`` (the targets, as data), ``report.py`` (the generic check and the table),
``sizes.py``, ``editors.py`` (the edits under test), ``models.py`` (checkpoints), ``naive.py`` (baselines).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from bench import measures
from bench import models as M
from bench.measures import Measured
from bench.realshape import realshape
from bench.report import Result, judge, table
from bench.sizes import FULL, SMOKE, Sizes
from bench.timing import STEADY_HEAP

HERE = Path(__file__).resolve().parent
GROUPS = ("forward", "llama", "generation", "caching", "training", "scoring", "memory", "realshape")
GPT2_GROUPS = {"forward", "generation", "caching", "scoring"}  # the groups that share one loaded GPT-2
GPT2_EDITORS = ("hpr", "iti15", "caa", "sea", "sadi")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="every measure at tiny sizes (seconds; values meaningless)")
    ap.add_argument("--out", type=Path, default=HERE / "results.json", help="where to write results.json")
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("HPR_BENCH_CACHE", HERE / ".cache")),
        help="random checkpoints are saved here (reused between runs)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core VM, 2-thread timings vary +-15 %%)",
    )
    ap.add_argument(
        "--only", nargs="*", default=None, choices=GROUPS, metavar="NAME", help=f"subset of: {' '.join(GROUPS)}"
    )
    return ap.parse_args(argv)


def measure_groups(groups: list[str], sizes: Sizes, cache: Path, work: Path) -> Iterator[Measured]:
    """Every measurement of ``groups``, in the table's order, yielded as taken. One model is loaded at a
    time: each is freed before the next loads."""
    if GPT2_GROUPS & set(groups):
        gpt2, label = M.load(sizes.gpt2, cache), sizes.gpt2.name
        if "forward" in groups:
            yield from measures.forward_overheads(gpt2, label, sizes, GPT2_EDITORS)
        if "generation" in groups:
            yield measures.generation(gpt2, label, sizes)
        if "caching" in groups:
            yield measures.caching(gpt2, label, sizes, work)
        if "scoring" in groups:
            yield measures.scoring(gpt2, label, sizes)
        del gpt2
    if "llama" in groups:
        llama, label = M.load(sizes.llama, cache), sizes.llama.name
        yield from measures.forward_overheads(llama, label, sizes, sizes.llama_editors)
        yield measures.generation(llama, label, sizes)
        del llama
    if "training" in groups:
        yield measures.training(sizes.gpt2, sizes)
    if "memory" in groups:
        yield measures.memory(sizes.gpt2, sizes, cache, work)
    if "realshape" in groups:
        yield from realshape(sizes, cache, work)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hpr-bench-") as tmp:
        sizes = SMOKE if args.smoke else FULL
        results = [judge(m) for m in measure_groups(args.only or list(GROUPS), sizes, args.cache, Path(tmp))]
    elapsed = time.perf_counter() - start
    record = {
        "smoke": args.smoke,
        "elapsed_s": round(elapsed, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "allocator": {k: os.environ.get(k) for k in STEADY_HEAP},
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str))
    print(table(results))
    print(f"{sum(r['pass'] for r in results)}/{len(results)} pass in {elapsed:.0f} s; wrote {args.out}")
    return results


if __name__ == "__main__":
    # The steady heap must be in the environment before the interpreter starts: re-execute with it.
    if any(os.environ.get(k) != v for k, v in STEADY_HEAP.items()) and platform.system() == "Linux":
        os.execve(sys.executable, [sys.executable, "-m", "bench", *sys.argv[1:]], {**os.environ, **STEADY_HEAP})
    main()
