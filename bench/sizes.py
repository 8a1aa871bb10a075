"""How big each measure runs: the full sizes (the README's table) and ``--smoke`` (seconds; values meaningless)."""

from __future__ import annotations

from dataclasses import dataclass

from bench import models as M


@dataclass(frozen=True)
class Sizes:
    gpt2: M.Shape
    llama: M.Shape
    fwd_batch: int  # prompts per forward batch
    fwd_rounds: int
    gen_tokens: int
    gen_rounds: int
    cache_questions: int
    cache_rounds: int
    train_pairs: int
    train_epochs: int
    score_questions: int
    score_rounds: int
    mem_questions: int
    mem_per_shard: int
    mem_batch: int
    llama_editors: tuple[str, ...]
    real: M.Shape  # realshape group
    real_questions: int  # collection and scoring: first N TruthfulQA questions
    real_rounds: int
    real_gen_questions: int  # greedy generation: first N TruthfulQA questions
    real_gen_tokens: int  # ... and new tokens per question
    real_mem_questions: int  # peak RSS: N and 2N train questions
    real_mem_per_shard: int
    real_mem_batch: int


FULL = Sizes(
    M.GPT2_SMALL,
    M.LLAMA_SMALL,
    fwd_batch=2,
    fwd_rounds=4,
    gen_tokens=24,
    gen_rounds=3,
    cache_questions=1,
    cache_rounds=2,
    train_pairs=1024,
    train_epochs=1,
    score_questions=3,
    score_rounds=2,
    mem_questions=32,
    mem_per_shard=8,
    mem_batch=8,
    llama_editors=("hpr",),
    real=M.SMOLLM2_SHAPE,
    real_questions=6,
    real_rounds=2,
    real_gen_questions=16,
    real_gen_tokens=16,
    real_mem_questions=32,
    real_mem_per_shard=8,
    real_mem_batch=8,
)
SMOKE = Sizes(
    M.GPT2_TINY,
    M.LLAMA_TINY,
    fwd_batch=2,
    fwd_rounds=2,
    gen_tokens=3,
    gen_rounds=1,
    cache_questions=1,
    cache_rounds=1,
    train_pairs=64,
    train_epochs=1,
    score_questions=1,
    score_rounds=1,
    mem_questions=4,
    mem_per_shard=2,
    mem_batch=4,
    llama_editors=("hpr",),
    real=M.LLAMA_TINY_TIED,
    real_questions=2,
    real_rounds=1,
    real_gen_questions=3,
    real_gen_tokens=3,
    real_mem_questions=4,
    real_mem_per_shard=2,
    real_mem_batch=4,
)
