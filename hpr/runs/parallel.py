"""A run's steps spread over worker processes, with results bit-identical to one process.

Every step of :func:`hpr.runs.pipeline.reproduce` that can run apart from the others is a task here: one
split's activations, one method's fit, one label's test scores and norms, its greedy answers, its cost on
neutral text. Each task writes what it makes into the run folder, as the step itself does, so
:func:`prefill` only fills the folder: the pipeline then runs as on a resumed run, finds every file and reads
it back. A task is run in the main process or in a worker, one at a time per process, each on the threads
of :mod:`hpr.threads` (one by default). It computes the same thing either way: every fit seeds its own
generators, nothing a task reads depends on which tasks ran before it in the same process, and one-thread
arithmetic is the same in every process. So ``workers`` changes when things are done, never what.

Each worker loads the data and the model itself (the model is checked against the main process's by its
full-weights fingerprint), so the run holds one copy of the model per process: ``--workers 1`` is the one
to use when memory is short. Tasks start as soon as what they read exists (HPR's fit waits for the
activations, every other fit for HPR's probes, a label's evaluation for its editor), those with the longest
expected path to the end of the run first, and never two fits that train through the model side by side.

The process that ran a task is the one thread-level fact that is not the same: ``threads.reproducible`` is
entered in a worker for its whole life and held there (a context manager nobody refers to is closed when it
is collected, and a worker on every thread computes other bits; the toy test caught that).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# Expected minutes of each fit on SmolLM2-135M (measured, README): they only set which task starts first.
_FIT_COST = {"hpr": 7, "sea": 13, "sadi": 12, "caa": 9, "iti": 4, "diff": 1.2, "lora": 15, "reptune": 37}
# Fits that train through the model. On SmolLM2-135M a process (model included) held up to 4.7 GB fitting
# representation tuning and 4.1 GB fitting LoRA, against 1.6 GB fitting SEA or SADI: two of them side by side
# would double the run's peak.
_HEAVY_FITS = {"lora", "reptune"}


@dataclasses.dataclass(frozen=True)
class Task:
    """One unit of a run: ``kind`` (collect, fit, evaluate, answer, capability) of ``name`` (a split, a
    method or a label); its seconds count towards ``step`` in ``results.json``'s ``timings_s``."""

    kind: str
    name: str
    step: str
    cost: float  # expected minutes, for the order only
    after: tuple[tuple[str, str], ...] = ()  # (kind, name) of the tasks whose files it reads
    heavy: bool = False  # holds gigabytes beside the model (training through it): one such task at a time

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.name)


def default_workers(device=None, pass_threads: int = 1) -> int:
    """As many one-run processes as this process may use cores for (one on a GPU: one device to share)."""
    if device is not None and str(device).startswith("cuda"):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, pass_threads))


def planned(run) -> list[Task]:
    """Every task of ``run`` whose files are not all in its folder yet (a cheap look: a damaged file is found
    and redone by the pipeline afterwards, in the main process)."""
    from hpr.editors import BASE, method_of
    from hpr.runs import pipeline

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
    from hpr.runs import pipeline
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


def prefill(run, workers: int, device, pass_threads: int) -> None:
    """Do every :func:`planned` task of ``run`` on ``workers`` processes (this one and ``workers - 1``
    spawned ones); each task's seconds are added to ``run.timings`` under its step. Nothing to do, or one
    worker: returns at once (the pipeline does it all)."""
    tasks = planned(run)
    if workers < 2 or not tasks:
        return
    from hpr.models import model_fingerprint

    here = dataclasses.replace(run, progress=False)  # one bar, over tasks, while tasks run side by side
    spawned = min(workers, len(tasks)) - 1
    from hpr import toyworld

    fingerprint = model_fingerprint(run.model)
    start = (run.cfg.to_json(), str(run.out), device, pass_threads, fingerprint, toyworld.DEFAULT)
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools mid-use
    pool = concurrent.futures.ProcessPoolExecutor(spawned, context, initializer=_start, initargs=start)
    try:
        scheduler = Scheduler(tasks, spawned, lambda t: pool.submit(_work, t.kind, t.name), run.progress)
        seconds = scheduler.run(lambda t: _timed(here, t.kind, t.name))
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown()
    for task, s in seconds.items():
        run.timings[task.step] = round(run.timings.get(task.step, 0.0) + s, 2)


class Scheduler:
    """Runs ``tasks``, each once its ``after`` tasks are done, longest path first, never two heavy ones at once:
    one at a time here (``local``) and up to ``remote`` at a time through ``submit`` (a task -> a future of
    its seconds). The first error
    stops it: nothing new starts and the error is raised (the caller stops the tasks still running; each
    writes its files atomically, so a rerun redoes them and loses nothing else)."""

    def __init__(self, tasks: Sequence[Task], remote: int, submit: Callable, progress: bool = False):
        self.given = {t.key: t for t in tasks}  # as given: the keys of the seconds returned
        known = set(self.given)
        # a task's prerequisites that are not tasks here were done before (their files are in the folder)
        self.pending = [dataclasses.replace(t, after=tuple(k for k in t.after if k in known)) for t in tasks]
        # Longest path to the end first (a short fit whose label's evaluation and answers wait on it goes
        # before a longer fit that nothing long waits on): the order only changes when things end.
        to_end = _to_end(self.pending)
        self.pending.sort(key=lambda t: -to_end[t.key])
        self.remote, self.submit = remote, submit
        self.done: set[tuple[str, str]] = set()
        self.running: dict[tuple[str, str], str] = {}  # key -> where
        self.seconds: dict[Task, float] = {}
        self.error: BaseException | None = None
        self.changed = threading.Condition()
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(tasks), desc="run", unit="task", disable=not progress)

    def _ready(self) -> Task | None:
        heavy_running = any(self.given[k].heavy for k in self.running)
        for t in self.pending:
            if all(k in self.done for k in t.after) and not (t.heavy and heavy_running):
                return t
        return None

    def _take(self, where: str) -> Task | None:
        """The next ready task, marked running (under the lock)."""
        if self.error is not None:
            return None
        task = self._ready()
        if task is not None:
            self.pending.remove(task)
            self.running[task.key] = where
            self._show()
        return task

    def _show(self) -> None:
        self.bar.set_postfix_str(", ".join(f"{k} {n}" for k, n in self.running), refresh=True)

    def _finished(self, task: Task, seconds: float | None, error: BaseException | None) -> None:
        with self.changed:
            del self.running[task.key]
            if error is not None:
                self.error = self.error or error
            else:
                self.done.add(task.key)
                self.seconds[self.given[task.key]] = seconds or 0.0
                self.bar.update()
            self._feed()
            self.changed.notify_all()

    def _feed(self) -> None:
        """Start ready tasks on the workers until all are busy (under the lock)."""
        while sum(where == "worker" for where in self.running.values()) < self.remote:
            task = self._take("worker")
            if task is None:
                return
            future = self.submit(task)
            future.add_done_callback(lambda f, t=task: self._finished(t, *_outcome(f)))

    def run(self, local: Callable[[Task], float]) -> dict[Task, float]:
        try:
            with self.changed:
                self._feed()
            while True:
                with self.changed:
                    task = self._take("here")
                    while task is None and (self.pending or self.running) and self.error is None:
                        self.changed.wait()
                        task = self._take("here")
                    if task is None and self.error is not None:
                        raise self.error
                    if task is None:
                        return self.seconds
                try:
                    seconds = local(task)
                except BaseException as e:
                    self._finished(task, None, e)
                    raise
                self._finished(task, seconds, None)
        finally:
            self.bar.close()


def _to_end(tasks: Sequence[Task]) -> dict[tuple[str, str], float]:
    """Each task's expected minutes from its start to the end of the last task that waits on it."""
    waiting: dict[tuple[str, str], list[Task]] = {t.key: [] for t in tasks}
    for t in tasks:
        for k in t.after:
            waiting[k].append(t)
    length: dict[tuple[str, str], float] = {}

    def of(t: Task) -> float:
        if t.key not in length:
            length[t.key] = t.cost + max((of(w) for w in waiting[t.key]), default=0.0)
        return length[t.key]

    for t in tasks:
        of(t)
    return length


def _stop(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """End the workers now, mid-task: after an error or Ctrl-C nothing they would still write is needed."""
    processes = list((pool._processes or {}).values())  # no public handle on a pool's processes
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)


def _outcome(future) -> tuple[float | None, BaseException | None]:
    error = future.exception()
    return (None, error) if error is not None else (future.result(), None)


def _timed(run, kind: str, name: str) -> float:
    t0 = time.perf_counter()
    run_task(run, kind, name)
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
    from hpr.runs import pipeline
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
