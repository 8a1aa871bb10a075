"""hpr.runs.parallel: a run spread over worker processes is the one-process run, file for file."""

import concurrent.futures
import json
import threading
import time

import pytest

from hpr.cli import main
from hpr.runs import parallel
from hpr.runs import tasks as run_tasks
from hpr.runs.parallel import Scheduler, Task

METHODS = "base,hpr,caa,sadi,lora"


def _files(folder):
    return {p.relative_to(folder): p for p in sorted(folder.rglob("*")) if p.is_file()}


def _results(folder):
    results = json.loads((folder / "results.json").read_text())
    for key in ("timings_s", "wall_s", "workers"):
        results.pop(key)
    return results


def test_two_workers_write_the_one_process_run_bit_for_bit(tiny_toy, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["reproduce", "--quiet", "--methods", METHODS]
    assert main([*common, "--out", str(one), "--workers", "1"]) == 0
    # half of it first, one process: the workers then do only what is left (a resumed run)
    assert main([*common, "--out", str(two), "--workers", "1", "--methods", "base,caa"]) == 0
    assert main([*common, "--out", str(two), "--workers", "2"]) == 0
    assert json.loads((two / "results.json").read_text())["workers"] == 2
    assert _results(one) == _results(two)
    files_one, files_two = _files(one), _files(two)
    assert set(files_one) == set(files_two)
    differing = [
        str(name)
        for name, path in files_one.items()
        if name.name != "results.json" and path.read_bytes() != files_two[name].read_bytes()
    ]
    assert differing == []  # editors, activations, predictions, norms, answers, capability, sweeps, config


def test_a_finished_run_plans_nothing(tiny_toy, tmp_path):
    from hpr.runs import pipeline
    from hpr.runs.config import RunConfig

    out = tmp_path / "run"
    assert main(["reproduce", "--quiet", "--methods", "base,hpr,iti15", "--out", str(out)]) == 0
    cfg = RunConfig.from_json(json.loads((out / "config.json").read_text())["run"])
    questions, split, model, _, neutral = pipeline._prepared(cfg, None)
    run = pipeline.pipeline_of(cfg, out, questions, split, model, neutral, progress=False)
    assert run_tasks.planned(run) == []
    (out / "predictions" / "iti15.answers.parquet").unlink()
    (out / "editors" / "iti15" / "config.json").unlink()
    planned = {t.key: t.after for t in run_tasks.planned(run)}
    assert planned == {("fit", "iti"): (("fit", "hpr"),), ("answer", "iti15"): (("fit", "iti"),)}


def _remote(n=1):
    """A stand-in for the worker pool: threads running the same task function."""
    return concurrent.futures.ThreadPoolExecutor(n)


def test_scheduler_starts_each_task_after_what_it_reads(tmp_path):
    tasks = [
        Task("collect", "train", "activations", 1),
        Task("fit", "hpr", "hpr_training", 7, (("collect", "train"),)),
        Task("fit", "caa", "fit_caa", 9, (("fit", "hpr"),)),
        Task("evaluate", "caa", "evaluation", 4, (("fit", "caa"),)),
        Task("evaluate", "base", "evaluation", 4),
        Task("answer", "base", "generation", 5, (("fit", "gone"),)),  # done before: not a task here
    ]
    started, ended, lock = {}, {}, threading.Lock()

    def work(task):
        with lock:
            started[task.key] = time.perf_counter()
        time.sleep(0.02)
        with lock:
            ended[task.key] = time.perf_counter()
        return 0.5

    with _remote() as pool:
        seconds = Scheduler(tasks, 1, lambda t: pool.submit(work, t)).run(work)
    assert set(seconds) == set(tasks) and set(seconds.values()) == {0.5}
    for task in tasks:
        for key in task.after:
            if key in ended:
                assert ended[key] <= started[task.key], (key, task.key)


def test_scheduler_raises_the_first_error_and_starts_nothing_more():
    tasks = [Task("fit", "hpr", "hpr_training", 7), Task("fit", "caa", "fit_caa", 9, (("fit", "hpr"),))]
    ran = []

    def work(task):
        ran.append(task.key)
        if task.name == "hpr":
            raise ValueError("HPR failed")
        return 0.0

    with _remote() as pool:
        with pytest.raises(ValueError, match="HPR failed"):
            Scheduler(tasks, 1, lambda t: pool.submit(work, t)).run(work)
    assert ran == [("fit", "hpr")]


def test_scheduler_never_runs_two_heavy_tasks_at_once():
    tasks = [
        Task("fit", m, f"fit_{m}", cost, heavy=heavy)
        for m, cost, heavy in [("reptune", 37, True), ("lora", 15, True), ("sea", 13, False), ("caa", 9, False)]
    ]
    running, overlaps, lock = set(), [], threading.Lock()

    def work(task):
        with lock:
            if task.heavy and any(t.heavy for t in running):
                overlaps.append(task.name)
            running.add(task)
        time.sleep(0.05)
        with lock:
            running.discard(task)
        return 0.0

    with _remote() as pool:
        Scheduler(tasks, 1, lambda t: pool.submit(work, t)).run(work)
    assert overlaps == []


def test_default_workers_one_per_core_and_one_on_a_gpu(monkeypatch):
    monkeypatch.undo()  # the suite's one-worker default off, for this test
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert parallel.default_workers("cpu") == 4
    assert parallel.default_workers(None, pass_threads=2) == 2
    assert parallel.default_workers("cuda:0") == 1


def test_a_short_fit_that_long_work_waits_on_starts_first():
    from hpr.runs.parallel import _to_end

    tasks = [
        Task("fit", "diff", "fit_diff", 1),
        Task("fit", "sea", "fit_sea", 5.5),
        Task("answer", "diff", "generation", 5, (("fit", "diff"),)),
        Task("evaluate", "diff", "evaluation", 4, (("fit", "diff"),)),
    ]
    assert _to_end(tasks) == {("fit", "diff"): 6, ("fit", "sea"): 5.5, ("answer", "diff"): 5, ("evaluate", "diff"): 4}
    order = []
    Scheduler(tasks, 0, None).run(lambda t: order.append(t.key) or 0.0)  # by cost alone, SEA would go first
    assert order == [("fit", "diff"), ("fit", "sea"), ("answer", "diff"), ("evaluate", "diff")]


def test_no_more_workers_than_copies_of_the_model_fit_in_memory(monkeypatch, tmp_path):
    import builtins

    import torch

    model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights: 20 MiB per process
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100000 kB\nMemAvailable: 61440 kB\n")  # 60 MiB
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(meminfo if f == "/proc/meminfo" else f, *a, **k))
    assert parallel.workers_memory_allows(model) == 2
    meminfo.write_text("MemAvailable: 1 kB\n")
    assert parallel.workers_memory_allows(model) == 1  # always at least the main process
