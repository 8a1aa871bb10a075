"""Tasks run side by side: one at a time in this process and one at a time in each of some spawned worker
processes, each task once the tasks it waits on are done. Generic: the run's own tasks are
:mod:`hpr.runs.tasks`.

Tasks start longest expected path to the end first, and never two heavy ones (those that hold gigabytes
beside the model) side by side. The first error stops everything: the workers are ended mid-task, which
loses nothing a task has finished, since every task writes its files atomically. :func:`give_memory_back`
is for a task's end, so a long-lived process does not sit at the largest task it ever ran.

Workers are spawned, not forked (a fork copies torch's thread pools mid-use), with the parent's ``__main__``
hidden while they start: a spawned child otherwise re-runs the parent's main script (a Streamlit page, a
notebook, a test runner's module), which workers have no use for and which may not even import there.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import sys
import threading
import types
from collections.abc import Callable, Iterator, Sequence

log = logging.getLogger(__name__)


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


# A process running a task held at most about 5x the model's weights on SmolLM2-135M (2.7 GB beside 0.54 GB of
# float32 weights: its own model copy, activations, a capability pass's logits), the fits that train aside.
_PROCESS_BYTES_PER_WEIGHT_BYTE = 5


def workers_memory_allows(model) -> int:
    """How many processes, each with its own copy of ``model``, fit in the memory available now (Linux's
    MemAvailable; no limit where it cannot be read). A run never starts more, so a machine of many cores and
    a large model does not run out of memory for workers."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 16
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    allowed = max(1, available // max(1, _PROCESS_BYTES_PER_WEIGHT_BYTE * weights))
    return int(allowed)


def run_pool(
    tasks: Sequence[Task],
    workers: int,
    local: Callable[[Task], float],
    work: Callable[[str, str], float],
    initializer: Callable,
    initargs: tuple,
    progress: bool = False,
) -> dict[Task, float]:
    """Run ``tasks`` on this process (``local(task)``) and ``workers - 1`` spawned ones (``work(kind, name)``,
    a module-level function, after ``initializer(*initargs)`` once per worker); each returns the task's
    seconds. Returns every task's seconds."""
    spawned = min(workers, len(tasks)) - 1
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(spawned, context, initializer=initializer, initargs=initargs)
    try:
        with _main_hidden():  # each submit may start a worker: only while __main__ is hidden
            started = [pool.submit(_nothing) for _ in range(spawned)]
        concurrent.futures.wait(started, timeout=0)  # they start the workers; nothing waits on them

        def submit(task: Task):
            return pool.submit(work, task.kind, task.name)

        seconds = Scheduler(tasks, spawned, submit, progress).run(local)
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown()
    return seconds


def _nothing() -> float:
    return 0.0


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class Scheduler:
    """Runs ``tasks``, each once its ``after`` tasks are done, longest path first, never two heavy ones at
    once: one at a time here (``local``) and up to ``remote`` at a time through ``submit`` (a task -> a
    future of its seconds). The first error stops it: nothing new starts and the error is raised (the caller
    stops the tasks still running; each writes its files atomically, so a rerun redoes them and loses
    nothing else)."""

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


def give_memory_back() -> None:
    """Hand the heap's free pages back to the system between tasks. A process otherwise keeps the peak of
    every task it ran (glibc holds freed memory for reuse), so each worker would sit at the run's largest
    task and the run's total at a multiple of it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to ask
        pass
