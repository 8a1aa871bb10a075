"""``python -m bench.real_generation [--questions N] [--max-new-tokens T] [--batch-size B] [--threads K]``.

CPU seconds per question of greedy generation on the real SmolLM2-135M-Instruct (``hpr.load_model("smollm2")``,
which must be in the cache or downloadable), base model, TruthfulQA prompts with the lm-eval QA primer as
``hpr.measurements.generations`` builds them, stopping at a newline: ``hpr.generation.greedy`` one prompt at
a time against ``hpr.generation.greedy_batch``. Both must give the same tokens. Needs the TruthfulQA files
(``$HPR_TRUTHFULQA_PATH``, default ``../shared/data/truthfulqa`` beside the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

TRUTHFULQA = Path(os.environ.get("HPR_TRUTHFULQA_PATH", Path(__file__).resolve().parents[2] / "shared/data/truthfulqa"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.real_generation", description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from hpr.editors.sea import newline_ids
    from hpr.encoding import encode_context
    from hpr.generation import greedy, greedy_batch
    from hpr.sources import load_dataset, load_model, prompt_format

    model = load_model("smollm2", device="cpu")
    fmt = prompt_format("truthfulqa")
    qs = load_dataset("truthfulqa", TRUTHFULQA)[: args.questions]
    n = args.max_new_tokens
    prompts = [encode_context(model, fmt.context(q), n) for q in qs]
    stops = newline_ids(model.tokenizer)
    greedy(model, prompts[0], 2, stops)  # warm-up
    sides = {
        "one_at_a_time": lambda: [greedy(model, p, n, stops) for p in prompts],
        "batched": lambda: greedy_batch(model, prompts, n, stops, batch_size=args.batch_size),
    }
    out, record = {}, {}
    for name, fn in sides.items():
        cpu, wall = time.process_time(), time.perf_counter()
        out[name] = fn()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        record[name] = {"cpu_s_per_question": round(cpu / len(qs), 3), "wall_s_per_question": round(wall / len(qs), 3)}
    record.update(
        questions=len(qs),
        max_new_tokens=n,
        batch_size=args.batch_size,
        threads=torch.get_num_threads(),
        prompt_tokens_mean=round(sum(map(len, prompts)) / len(prompts), 1),
        new_tokens=sum(map(len, out["batched"])),
        same_tokens=out["one_at_a_time"] == out["batched"],
        cpu_speedup=round(record["one_at_a_time"]["cpu_s_per_question"] / record["batched"]["cpu_s_per_question"], 2),
    )
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
