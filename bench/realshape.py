"""The ``realshape`` group: measures on the shape of SmolLM2-135M-Instruct, the real model users run on CPU.

Collection and scoring with shared contexts (``hpr.continuations``) are timed against the paths they
replaced (``bench/naive.py``) on TruthfulQA prompts with the lm-eval QA primer, and so is batched greedy
generation over the shared primer against one prompt at a time; collect's peak RSS is measured in fresh
processes at N and 2N questions.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path

import torch

from bench import models as M
from bench.measures import Measured
from bench.memory_worker import run_in_fresh_process
from bench.sizes import Sizes
from bench.timing import race, ratios


def realshape(sizes: Sizes, cache: Path, work: Path) -> Iterator[Measured]:
    """The group's four measures, yielded as taken; the model is freed before the memory measure, whose
    workers load their own."""
    model = M.load(sizes.real, cache)
    yield collection(model, sizes.real.name, sizes)
    yield scoring(model, sizes.real.name, sizes)
    yield generation(model, sizes.real.name, sizes)
    del model
    yield peak_rss(sizes.real, sizes, cache, work)


def _real_pairs(n: int, sets: str) -> tuple[list, list[tuple[str, str]]]:
    """The first ``n`` TruthfulQA questions as lm-eval QA-primer prompts: their ``mc2`` answers
    (``sets="mc2"``) or their distinct ``mc1 + mc2`` choices (``"mc1+mc2"``, as scoring sees them)."""
    from hpr.data import PromptFormat

    fmt = PromptFormat()  # the default (lm-eval) QA primer
    qs = list(M.questions()[:n])
    choices = (lambda q: q.mc2) if sets == "mc2" else (lambda q: q.mc1 + q.mc2)
    return qs, list(dict.fromkeys((fmt.context(q), fmt.continuation(c.text)) for q in qs for c in choices(q)))


def _token_counts(model, pairs, scoring: bool) -> dict:
    """Real (unpadded) tokens each side runs through the blocks: every pair whole or its question context
    once (old), against the shared prefix once + each context's rest once + each continuation (new)."""
    from hpr.continuations import common_prefix
    from hpr.encoding import encode_all

    enc = encode_all(model, pairs)
    contexts = list(dict.fromkeys(tuple(e.tokens[: len(e.tokens) - e.n_cont]) for e in enc))
    prefix = common_prefix([c[:-1] for c in contexts]) if len(contexts) > 1 else 0
    # Both sides leave each continuation's last token out when scoring; collection keeps it.
    cont = sum(e.n_cont - (1 if scoring else 0) for e in enc)
    old = sum(map(len, contexts)) + cont if scoring else sum(len(e.tokens) for e in enc)
    new = prefix + sum(len(c) - prefix - 1 for c in contexts) + cont + len(enc)
    return {"shared_prefix": prefix, "contexts": len(contexts), "old": old, "new": new}


def _warm(model):
    with torch.inference_mode():
        model(torch.zeros(1, 8, dtype=torch.long), stop_at_layer=model.cfg.n_layers)


def _per_question_timings(times: dict, num: str, den: str, n: int) -> dict:
    """Raw seconds of both sides, their medians per question, and the per-round ratios."""
    return {
        f"{num}_s": [round(t, 3) for t in times[num]],
        f"{den}_s": [round(t, 3) for t in times[den]],
        f"{num}_s_per_question": round(statistics.median(times[num]) / n, 3),
        f"{den}_s_per_question": round(statistics.median(times[den]) / n, 3),
        "ratios": [round(x, 3) for x in ratios(times, num, den)],
    }


def collection(model, label: str, sizes: Sizes, batch: int = 16) -> Measured:
    """Activation collection, every MC2 answer run whole over shared contexts; same activations."""
    from bench.naive import collect_whole_sequences
    from hpr.activations import answer_activations

    qs, pairs = _real_pairs(sizes.real_questions, "mc2")
    _warm(model)
    sides = {
        "whole": lambda: collect_whole_sequences(model, pairs, batch),
        "shared": lambda: torch.cat(answer_activations(model, pairs, batch)),
    }
    got, times, speedup = race(sides, sizes.real_rounds, slow="whole", fast="shared")
    diff = float((got["whole"] - got["shared"]).abs().max())
    return Measured(
        f"activation collection per question, whole sequences / shared contexts [{label}]",
        "realshape collection",
        speedup,
        checked={"max_abs_diff": diff},
        details={
            "model": label,
            "questions": len(qs),
            "answers": len(pairs),
            "answer_tokens": int(got["shared"].shape[0]),
            "batch_size": batch,
            **_per_question_timings(times, "whole", "shared", len(qs)),
            "max_abs_diff": diff,
            "max_abs_activation": float(got["whole"].abs().max()),
            "tokens_through_blocks": _token_counts(model, pairs, scoring=False),
            "how": "whole: bench.naive.collect_whole_sequences (every MC2 answer run whole, primer + question "
            "+ answer, right-padded batches of 16); shared: hpr.activations.answer_activations (primer "
            "once, each question once, each answer over its own tokens; hpr.continuations); both keep "
            "resid_post of every layer at the answer tokens and stop after the last block",
        },
    )


def scoring(model, label: str, sizes: Sizes, batch: int = 16) -> Measured:
    """MC scoring, each question's context once (primer included) over the primer shared too; same scores."""
    from bench.naive import score_question_contexts
    from hpr.scoring import score

    qs, pairs = _real_pairs(sizes.real_questions, "mc1+mc2")
    _warm(model)
    sides = {
        "contexts": lambda: score_question_contexts(model, pairs, batch),
        "primer": lambda: score(model, pairs, batch_size=batch),
    }
    got, times, speedup = race(sides, sizes.real_rounds, slow="contexts", fast="primer")
    diff = max(abs(a - b) for a, b in zip(got["contexts"], got["primer"], strict=True))
    return Measured(
        f"MC scoring per question, question contexts / shared primer [{label}]",
        "realshape scoring",
        speedup,
        checked={"max_abs_diff": diff},
        details={
            "model": label,
            "questions": len(qs),
            "pairs": len(pairs),
            "batch_size": batch,
            **_per_question_timings(times, "contexts", "primer", len(qs)),
            "max_abs_diff": diff,
            "tokens_through_blocks": _token_counts(model, pairs, scoring=True),
            "how": "question contexts: bench.naive.score_question_contexts (each question's context, primer "
            "included, once into a KV cache, then its choices); shared primer: hpr.scoring.score (the "
            "primer once per call, then each question's text, then the choices); mc1 + mc2 choices, "
            "deduplicated; both take logits only where a choice token is predicted",
        },
    )


def generation(model, label: str, sizes: Sizes, batch: int = 16) -> Measured:
    """Greedy generation, batched over the shared primer, against one prompt at a time; same tokens."""
    from hpr.data import PromptFormat
    from hpr.editors.sea import newline_ids
    from hpr.encoding import encode_context
    from hpr.generation import greedy, greedy_batch

    fmt, n = PromptFormat(), sizes.real_gen_tokens  # the default (lm-eval) QA primer
    qs = list(M.questions()[: sizes.real_gen_questions])
    prompts = [encode_context(model, fmt.context(q), n) for q in qs]
    stops = newline_ids(model.tokenizer)
    _warm(model)
    sides = {
        "one_at_a_time": lambda: [greedy(model, p, n, stops) for p in prompts],
        "batched": lambda: greedy_batch(model, prompts, n, stops, batch_size=batch),
    }
    got, times, speedup = race(sides, sizes.real_rounds, slow="one_at_a_time", fast="batched")
    return Measured(
        f"greedy generation per question, one at a time / batched [{label}]",
        "realshape generation",
        speedup,
        checked={"same_tokens": got["one_at_a_time"] == got["batched"]},
        details={
            "model": label,
            "questions": len(qs),
            "max_new_tokens": n,
            "new_tokens": sum(map(len, got["batched"])),
            "prompt_tokens": sum(map(len, prompts)),
            "batch_size": batch,
            **_per_question_timings(times, "one_at_a_time", "batched", len(qs)),
            "same_tokens": got["one_at_a_time"] == got["batched"],
            "how": "one at a time: hpr.generation.greedy per prompt (KV cache, primer recomputed for each); "
            "batched: hpr.generation.greedy_batch (primer once, the prompts' rests left-padded in one batch, "
            "finished rows dropped); lm-eval QA-primer prompts, greedy, stop at a newline token",
        },
    )


def _mb(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


def _memory_row(run: dict, batch_peak_bytes: int) -> tuple[dict, int]:
    """One collect run's row of the details, and its overhead (bytes beyond the result)."""
    bound = batch_peak_bytes + run["largest_shard_bytes"] + run["result_f32_bytes"]
    # Memory beyond the result, phase by phase: writing the shards (no result yet), then loading them
    # into the result. The plain peak - result is mostly how much freed heap of the writing phase glibc
    # still holds when the result is allocated: 65-250 MB from run to run, whatever the shard count.
    over = max(run["shards_peak_bytes"], run["load_peak_bytes"] - run["result_f32_bytes"])
    row = {
        "shards": run["shards"],
        "answers": run["answers"],
        "peak_mb": _mb(run["collect_peak_bytes"]),
        "result_f32_mb": _mb(run["result_f32_bytes"]),
        "largest_shard_mb": _mb(run["largest_shard_bytes"]),
        "bound_mb": _mb(bound),
        "within_bound": run["collect_peak_bytes"] <= bound,
        "writing_peak_mb": _mb(run["shards_peak_bytes"]),
        "loading_peak_mb": _mb(run["load_peak_bytes"]),
        "overhead_mb": _mb(over),
        "peak_minus_result_mb": _mb(run["collect_peak_bytes"] - run["result_f32_bytes"]),
    }
    return row, over


def peak_rss(shape: M.Shape, sizes: Sizes, cache: Path, work: Path) -> Measured:
    """Peak RSS growth of ``collect`` (fp32, QA primer) on N and 2N train questions, each in a fresh process,
    against one batch's peak: ``answer_activations`` on one batch as ``collect`` runs it, ``batch`` distinct
    contexts (the longest of the 2N questions, which include the N) with one answer each (``contexts`` mode
    of the worker). The ``batch`` mode's longest answers come from a few questions only: their KV cache has
    a few context rows where collect's has ``batch`` (at this shape 144 MB against 207 MB for batch 8)."""
    ckpt = M.checkpoint(shape, cache)
    n, per, b = sizes.real_mem_questions, sizes.real_mem_per_shard, sizes.real_mem_batch
    runs = {
        q: run_in_fresh_process("collect", ckpt, work / f"realmem-{q}", q, per, b, "fp32", primer=True)
        for q in (n, 2 * n)
    }
    one = run_in_fresh_process("contexts", ckpt, work / "realmem-batch", 2 * n, per, b, "fp32", primer=True)
    rows, over = {}, {}
    for q, r in runs.items():
        rows[q], over[q] = _memory_row(r, one["batch_peak_bytes"])
    growth = over[2 * n] / over[n] if over[n] > 0 else float("inf")
    return Measured(
        f"peak RSS of collect, train split [{shape.name}]",
        "realshape peak RSS",
        growth,
        checked={
            "rss_within_bound": all(r["within_bound"] for r in rows.values()),
            "overhead_n_mb": over[n] / 2**20,
            "overhead_2n_mb": over[2 * n] / 2**20,
        },
        details={
            "model": shape.name,
            "questions": [n, 2 * n],
            "per_shard": per,
            "batch_size": b,
            "store": "fp32",
            "batch_peak_mb": _mb(one["batch_peak_bytes"]),
            "batch_tokens": one["batch_tokens"],
            "runs": {str(q): row for q, row in rows.items()},
            "raw": {str(q): r for q, r in runs.items()} | {"batch": one},
            "how": "bench.memory_worker in fresh processes (default allocator, RSS sampled every 0.5 ms): "
            "hpr.activations.collect with the QA primer, float32 shards, peaks of writing the shards and of "
            "loading them back into the result; overhead = max(writing peak, loading peak - result); "
            "value = overhead(2N) / overhead(N)",
        },
    )
