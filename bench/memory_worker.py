"""Subprocess of the memory measure: peak RSS growth of one step of activation caching, in a fresh process.

Run as ``python -m bench.memory_worker MODE CKPT_DIR OUT_DIR N_QUESTIONS PER_SHARD BATCH fp16|fp32 PRIMER``
with MODE ``batch`` (the largest batch through ``answer_activations``, once: the ``BATCH`` longest answers),
``contexts`` (one batch as ``collect`` runs it with shared contexts: the ``BATCH`` longest distinct contexts,
each with its longest answer, so the KV cache holds ``BATCH`` context rows) or ``collect`` (the whole
``hpr.activations.collect``, shards written and loaded back; also the peaks of its two phases, writing
the shards and loading them back); prints one JSON line. Each mode runs in its own process so that every growth starts
from the same state (model loaded, nothing else allocated): the allocator keeps what a first call freed, so
a second measurement in one process would see less. RSS is sampled by a thread every half millisecond
(psutil); ``ru_maxrss`` would report the peak of model loading. ``run_in_fresh_process`` is the parent's side:
it starts one such process and reads its line back.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.timing import STEADY_HEAP

REPO = Path(__file__).resolve().parent.parent


def _return_free_memory() -> None:
    """Hand memory freed by earlier work back to the OS (glibc's malloc_trim), so that a measurement starts
    from what is really in use: otherwise a call that reuses freed pages looks smaller than it is, and one
    that does not looks larger (two calls in one test process disagree by over 100 MB after a test suite)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to hand back this way
            pass


def peak_growth(fn, marks: dict | None = None):
    """``(fn(), peak RSS during fn - RSS before)``, growths from the RSS before ``fn``.

    Phases: ``fn`` may call ``marks["mark"](name)`` to end one; ``marks[name]`` is then that phase's peak
    growth and ``marks["end"]`` the peak growth of what follows the last mark.
    """
    import psutil

    proc = psutil.Process()
    gc.collect()
    _return_free_memory()
    before = proc.memory_info().rss
    peak = [before]
    phases = []
    lock = threading.Lock()
    stop = threading.Event()

    def mark(name):
        with lock:
            now = proc.memory_info().rss
            marks[name] = max(peak[0], now) - before
            phases.append(marks[name])
            peak[0] = now  # the next phase's peak starts here

    if marks is not None:
        marks["mark"] = mark

    def sample():
        while not stop.is_set():
            with lock:
                peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        result = fn()
    finally:
        stop.set()
        t.join()
    end = max(peak[0], proc.memory_info().rss) - before
    if marks is not None:
        marks["end"] = end
    return result, max([end, *phases])


def main(argv: list[str]) -> dict:
    import torch
    from safetensors import safe_open

    from bench.models import questions
    from hpr import activations
    from hpr.data import QA_PRIMER, PromptFormat, split_ids
    from hpr.scoring import encode_all
    from hpr.sources import load_model

    mode, ckpt, out, n_q, per_shard, batch, store, primer = argv
    n_q, per_shard, batch = int(n_q), int(per_shard), int(batch)
    fmt = PromptFormat(primer=QA_PRIMER if primer == "primer" else "")
    qs = questions()
    train = set(split_ids([q.id for q in qs])["train"])
    qs = [q for q in qs if q.id in train][:n_q]
    model = load_model(ckpt, device="cpu")
    record = {"mode": mode, "store": store, "questions": len(qs), "torch_threads": torch.get_num_threads()}

    if mode in ("batch", "contexts"):
        pairs = [(fmt.context(q), fmt.continuation(c.text)) for q in qs for c in q.mc2]
        enc = encode_all(model, pairs)
        pool = range(len(enc))
        if mode == "contexts":  # each context's longest answer
            longest: dict[str, int] = {}
            for i, (context, _) in enumerate(pairs):
                if context not in longest or len(enc[i].tokens) > len(enc[longest[context]].tokens):
                    longest[context] = i
            pool = longest.values()
        biggest = sorted(pool, key=lambda i: -len(enc[i].tokens))[:batch]
        big = [pairs[i] for i in biggest]
        _, grown = peak_growth(lambda: activations.answer_activations(model, big, batch))
        return {**record, "batch_peak_bytes": int(grown), "batch_tokens": [len(enc[i].tokens) for i in biggest]}

    folder = Path(out)
    marks: dict = {}
    load = activations.load

    def marked_load(path):  # collect ends by loading its shards back: the peak of writing them is the peak so far
        marks["mark"]("shards_peak_bytes")
        return load(path)

    activations.load = marked_load
    result, grown = peak_growth(
        lambda: activations.collect(
            model, qs, fmt, folder, questions_per_shard=per_shard, batch_size=batch, fp16=store == "fp16"
        ),
        marks,
    )
    shards = sorted(folder.glob("shard-*.safetensors"))
    tokens = []
    for p in shards:
        with safe_open(p, framework="pt") as f:
            tokens.append(f.get_slice("acts").get_shape()[0])
    row_bytes = model.cfg.n_layers * model.cfg.d_model * (2 if store == "fp16" else 4)  # one answer token
    return {
        **record,
        "answers": len(result.question_ids),
        "shards": len(shards),
        "disk_bytes": sum(p.stat().st_size for p in shards),
        "largest_shard_bytes": max(tokens) * row_bytes,
        "result_f32_bytes": int(result.acts.numel() * 4),
        "collect_peak_bytes": int(grown),
        "shards_peak_bytes": int(marks.get("shards_peak_bytes", -1)),
        "load_peak_bytes": int(marks["end"]),
    }


def run_in_fresh_process(
    mode: str, ckpt: Path, out: Path, questions: int, per_shard: int, batch: int, store: str, primer: bool
) -> dict:
    """One step (``mode``) in a fresh process; its JSON record. The arguments are those of ``main``."""
    # The default allocator in the workers: a heap that keeps freed memory would hide RSS growth.
    env = {k: v for k, v in os.environ.items() if k not in STEADY_HEAP}
    cmd = [
        sys.executable,
        "-m",
        "bench.memory_worker",
        mode,
        str(ckpt),
        str(out),
        str(questions),
        str(per_shard),
        str(batch),
        store,
        "primer" if primer else "noprimer",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
