"""``hpr reproduce``: the whole run into one folder, its steps (:mod:`hpr.runs.pipeline`) spread over
worker processes where there are several (:mod:`hpr.runs.tasks`)."""

from __future__ import annotations

import time
from pathlib import Path

from hpr import threads
from hpr.files import write_json
from hpr.runs import pipeline, tasks
from hpr.runs.config import RunConfig
from hpr.runs.folder import check_run_folder


def reproduce(
    cfg: RunConfig, out: Path, device=None, progress: bool = True, pass_threads: int = 1, workers: int = 1
) -> dict:
    """The whole run (:mod:`hpr.runs.pipeline`), written to ``out/results.json`` and returned. Fits run on one
    thread and the model's forward passes on ``pass_threads`` (:mod:`hpr.threads`: 1, the default, is
    bit-reproducible on any machine; more is faster and may differ in the last bits). ``workers`` > 1 spreads
    the steps over that many processes, each on ``pass_threads`` threads: the same files to the bit, sooner."""
    out = Path(out)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    check_run_folder(out)
    t0 = time.perf_counter()
    questions, split, model, load_s, neutral = pipeline._prepared(cfg, device)
    with threads.reproducible(model, pass_threads):
        pipeline._claim_folder(cfg, out, questions, split, model)
        run = pipeline.pipeline_of(cfg, out, questions, split, model, neutral, progress)
        run.timings["load_model"] = load_s
        used = tasks.prefill(run, workers, device, pass_threads) if workers > 1 else 1
        results = pipeline.run_steps(run, split)
    results["workers"] = used
    results["wall_s"] = round(time.perf_counter() - t0, 2)
    results["code"] = pipeline.code_version()
    write_json(out / "results.json", results)
    return results
