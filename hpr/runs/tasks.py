"""The tasks of ``hpr reproduce``, for :mod:`hpr.runs.parallel`: each split's activations, each method's fit,
each label's test scores and norms, its greedy answers, and the neutral-text costs.

Each task writes what it makes into the run folder, as the pipeline's step itself does, so :func:`prefill`
only fills the folder: the pipeline then runs as on a resumed run, finds every file and reads it back. A
task runs in the main process or in a worker, each on the threads of :mod:`hpr.threads` (one by default),
and computes the same thing either way: every fit seeds its own generators, nothing a task reads depends on
which tasks ran before it in the same process, and one-thread arithmetic is the same in every process. So
the number of workers changes when things are done, never what (a test compares every file).

Each worker loads the data and the model itself (checked against the main process's by its full-weights
fingerprint), so the run holds one copy of the model per process: a run starts no more workers than copies
fit in the memory available, and ``--workers 1`` is the one to use when memory is short. HPR's fit waits for
the activations, every other fit for HPR's probes, a label's evaluation for its editor.

A worker enters :func:`hpr.threads.reproducible` for its whole life and holds on to it: a context manager
that nothing refers to is closed when it is collected, and a worker back on every thread computes other bits
(the two-worker test caught that once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

from hpr.runs import pipeline
from hpr.runs.parallel import Task, give_memory_back, run_pool, workers_memory_allows

log = logging.getLogger(__name__)

# Expected minutes of each fit on SmolLM2-135M (measured, README): they only set which task starts first.
_FIT_COST = {"hpr": 7, "sea": 13, "sadi": 12, "caa": 9, "iti": 4, "diff": 1.2, "lora": 15, "reptune": 37}
# Fits that train through the model. On SmolLM2-135M a process (model included) held up to 4.7 GB fitting
# representation tuning and 4.1 GB fitting LoRA, against 1.6 GB fitting SEA or SADI: two of them side by side
# would double the run's peak.
_HEAVY_FITS = {"lora", "reptune"}


def planned(run) -> list[Task]:
    """Every task of ``run`` whose files are not all in its folder yet (a cheap look: a damaged file is found
    and redone by the pipeline afterwards, in the main process)."""
    from hpr.editors import BASE, method_of

    cfg, out = run.cfg, run.out
    collects = [
        Task("collect", name, "activations", len(run.parts[name]) / 40, ())
        for name in pipeline.SPLITS
        if not _collected(run, name)
    ]
    all_collected = tuple(t.key for t in collects)
    fits = [Task("fit", "hpr", "hpr_training", _FIT_COST["hpr"], all_collected)]
    fits += [
        Task("fit", m, f"fit_{m}", _FIT_COST.get(m, 5), (("fit", "hpr"),), m in _HEAVY_FITS)
        for m in pipeline._methods_to_fit(cfg)
    ]
    fits = [t for t in fits if not _fitted(run, t.name)]
    waiting = {t.key for t in fits}

    def after(label: str) -> tuple[tuple[str, str], ...]:
        method = method_of(label)
        key = ("fit", method.name) if method is not None else None
        return (key,) if key in waiting else ()

    labels = list(dict.fromkeys([BASE, *cfg.methods]))
    per_label = []
    for label in labels:
        preds = out / "predictions" / f"{label}.parquet"
        norms = out / "predictions" / f"{label}.norms.safetensors"
        if not norms.exists() or (not preds.exists() and (label != BASE or BASE in cfg.methods)):
            per_label.append(Task("evaluate", label, "evaluation", 4, after(label)))
        if label in cfg.methods and not (out / "predictions" / f"{label}.answers.parquet").exists():
            per_label.append(Task("answer", label, "generation", 5, after(label)))
    # One task for every label's cost on neutral text: each label's pass is compared with one base pass.
    unmeasured = [label for label in labels if not (out / "capability" / f"{label}.json").exists()]
    if unmeasured:
        every_fit = tuple(sorted({k for label in unmeasured for k in after(label)}))
        per_label.append(Task("capability", ",".join(unmeasured), "capability", 1.2, every_fit))
    return collects + fits + per_label


def _collected(run, name: str) -> bool:
    from hpr.activations import shard_count, shard_path

    folder = run.out / "activations" / name
    return all(shard_path(folder, k).exists() for k in range(shard_count(len(run.parts[name]))))


def _fitted(run, method: str) -> bool:
    from hpr.editors import method_of

    labels = [label for label in run.cfg.methods if (m := method_of(label)) is not None and m.name == method]
    if method == "hpr":
        labels = ["hpr", "hpr_no_angle", "hpr_all_layers", *labels]
        if not (run.out / "probes.json").exists():
            return False
    return all((run.out / "editors" / label / "config.json").exists() for label in labels)


def run_task(run, kind: str, name: str) -> None:
    """Do one task in ``run``'s process: what the pipeline's step does for that one split, method or label."""
    from hpr.runs.folder import read_probes

    if kind == "collect":
        pipeline.collect_split(run, name)
    elif kind == "fit":
        probes = None if name == "hpr" else read_probes(run.out / "probes.json", run.model.cfg.n_layers)
        pipeline.fit_method(run, name, probes)
    elif kind == "evaluate":
        pipeline.evaluate_label(run, name)
    elif kind == "answer":
        pipeline.answer_label(run, name)
    elif kind == "capability":
        pipeline.measure_labels(run, name.split(","))
    else:
        raise ValueError(f"unknown task kind {kind!r}")


def prefill(run, workers: int, device, pass_threads: int) -> int:
    """Do every :func:`planned` task of ``run`` on ``workers`` processes (this one and ``workers - 1``
    spawned ones), fewer where memory allows fewer copies of the model; each task's seconds are added to
    ``run.timings`` under its step. Returns how many processes there were: 1 when there is nothing to do or
    one worker (the pipeline then does it all)."""
    tasks = planned(run)
    allowed = workers_memory_allows(run.model)
    if allowed < workers:
        log.info("memory for %d copies of the model: %d workers instead of %d", allowed, allowed, workers)
        workers = allowed
    if workers < 2 or not tasks:
        return 1
    from hpr import toyworld
    from hpr.models import model_fingerprint

    here = dataclasses.replace(run, progress=False)  # one bar, over tasks, while tasks run side by side
    start = (run.cfg.to_json(), str(run.out), device, pass_threads, model_fingerprint(run.model), toyworld.DEFAULT)
    seconds = run_pool(tasks, workers, lambda t: _timed(here, t.kind, t.name), _work, _start, start, run.progress)
    for task, s in seconds.items():
        run.timings[task.step] = round(run.timings.get(task.step, 0.0) + s, 2)
    return min(workers, len(tasks))


def _timed(run, kind: str, name: str) -> float:
    t0 = time.perf_counter()
    try:
        run_task(run, kind, name)
    finally:
        give_memory_back()
    return time.perf_counter() - t0


_RUN = None  # the worker process's run, made by _start
_HELD = contextlib.ExitStack()  # what _start entered for the worker's life


def _start(cfg_json: dict, out: str, device, pass_threads: int, fingerprint: str, toy_world) -> None:
    """A worker's setup: the run's data and model, loaded as the main process loaded them, on its threads
    (``toy_world``: the world "toy" stands for in the main process, which a notebook or test may have changed)."""
    global _RUN
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from hpr import threads, toyworld

    toyworld.DEFAULT = toy_world
    from hpr.models import model_fingerprint
    from hpr.runs.config import RunConfig

    cfg = RunConfig.from_json(cfg_json)
    questions, split, model, _, neutral = pipeline._prepared(cfg, device)
    if model_fingerprint(model) != fingerprint:
        raise RuntimeError(f"a worker loaded other weights for {cfg.model!r} than the run's; rerun with --workers 1")
    # Entered for the worker's life (it only runs tasks), and held: a context manager nobody refers to is
    # closed when collected, which would put the worker back on every thread.
    _HELD.enter_context(threads.reproducible(model, pass_threads))
    _RUN = pipeline.pipeline_of(cfg, Path(out), questions, split, model, neutral, progress=False)


def _work(kind: str, name: str) -> float:
    assert _RUN is not None, "worker not started"
    return _timed(_RUN, kind, name)
