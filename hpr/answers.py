"""Greedy answers to questions under an editor, scored as lm-evaluation-harness's ``truthfulqa_gen``.

Each test question is asked in the run's own prompt (the few-shot primer, then ``Q: ...\\nA:``: the prompt its
MC scores use) and answered greedily, batched with the primer's KV cache shared
(:func:`hpr.generation.greedy_batch`). Generation stops as lm-eval stops this task, at the few-shot delimiter
(the blank line between the primer's examples; the toy world's primer separates them with one newline) or the
tokenizer's EOS, and the answer is the decoded text (special tokens skipped) cut there
(:mod:`hpr.gen_scoring`). Two deliberate differences from lm-eval 0.4: its prompt for this task ends at the
question, without ``\\nA:``, so its model writes ``A:`` into the answer it scores; and it allows 256 new tokens,
where the default here is 64 (TruthfulQA's references are one sentence; an answer still going at 64 tokens has
lost the format, and the cap keeps a degenerate editor's cost bounded).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from hpr import gen_scoring, generation
from hpr.data.prompts import PromptFormat
from hpr.data.schema import MCQuestion
from hpr.editors.base import applied_if_any
from hpr.encoding import encode_context


def stop_strings(model, fmt: PromptFormat) -> tuple[str, ...]:
    """Where an answer ends: the primer's delimiter between examples and the tokenizer's EOS string."""
    eos = model.tokenizer.eos_token
    return tuple(s for s in (fmt.separator, eos) if s)


def cut(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first of ``stops`` (each cut in turn, as lm-eval's ``until``)."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


@torch.inference_mode()
def greedy_answers(
    model,
    questions: Sequence[MCQuestion],
    fmt: PromptFormat,
    editor=None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress=None,
) -> pd.DataFrame:
    """``question_id, completion`` for each question: its greedy answer under ``editor`` (None: the base
    model), at most ``max_new_tokens`` tokens. Where the longest prompt leaves less room in the model's
    context, the answers get what is left, but at least a quarter of the context, prompts then losing their
    first (primer) tokens as :func:`hpr.encoding.encode_context` cuts them."""

    stops = stop_strings(model, fmt)
    contexts = [fmt.context(q) for q in questions]
    longest = max((len(encode_context(model, c)) for c in contexts), default=0)
    room = max(1, min(max_new_tokens, max(model.cfg.n_ctx - longest, model.cfg.n_ctx // 4)))
    prompts = [encode_context(model, c, room) for c in contexts]
    with applied_if_any(editor, model):
        outputs = generation.greedy_batch(
            model, prompts, room, stop_strings=stops, batch_size=batch_size, progress=progress
        )
    texts = [cut(model.tokenizer.decode(ids, skip_special_tokens=True), stops) for ids in outputs]
    return pd.DataFrame({"question_id": [q.id for q in questions], "completion": texts})


def scored(completions: pd.DataFrame, questions: Sequence[MCQuestion]) -> pd.DataFrame:
    """:func:`hpr.gen_scoring.question_scores` of ``method, question_id, completion`` rows against each
    question's generation references."""
    return gen_scoring.question_scores(completions, {q.id: q.generation_answers() for q in questions})
