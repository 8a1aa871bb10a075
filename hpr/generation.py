"""Greedy generation with a KV cache, each pass marked for position-aware editors (:mod:`hpr.positions`).

:func:`greedy` generates for one prompt: the prefill pass runs the prompt, its last token marked as the
prompt end; every later pass feeds the last generated token, marked as an answer token. Both are the newest
position of their pass, which is where honest_llama's ITI and the official HPR ``generate()`` edit; editors
with ``positions="all"`` also edit the prompt at prefill.

:func:`greedy_batch` gives each of many prompts what :func:`greedy` gives it, sharing their common prefix
(a few-shot primer) the way :mod:`hpr.continuations` does:

1. the longest token prefix common to every prompt, each less its last token, runs once (batch 1) into a
   TransformerLens KV cache;
2. prompts are taken ``batch_size`` at a time, shortest first; each one's rest except its last token runs
   left-padded after the shared prefix, extending the cache (TransformerLens takes position ids from the
   cumulative attention mask, so the padding shifts nothing and is never attended);
3. decoding feeds each row's last prompt token, then each new token; a row that has stopped leaves the
   batch (its cache rows are dropped) so the others no longer pay for it.

Passes 1 and 2 are marked as context (nothing there for the modes that skip the context), the first
decoding pass as the prompt end, later ones as answer tokens, all as the newest position: every position
is marked as in :func:`greedy`'s prefill and decoding, so every editor mode edits the same positions, and
hooks on the model around the whole call (an editor) see every pass. Results agree with :func:`greedy`
token for token up to float rounding of the batched passes, which no test has seen change a greedy token.

Both stop a row after a token in ``stop_ids`` (kept), once its decoded text contains one of
``stop_strings`` (the token that completed it kept; the caller cuts the text), or at ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hpr import positions
from hpr.continuations import _contexts_cache, _new_cache, _prefix_cache, _rows_of, common_prefix
from hpr.encoding import pad_token_id


def _check_prompt(model, prompt: Sequence[int], max_new_tokens: int) -> None:
    if not prompt:
        raise ValueError("greedy generation needs a prompt of at least one token")
    if len(prompt) + max_new_tokens > model.cfg.n_ctx:
        raise ValueError(
            f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new ones exceeds the model's "
            f"context of {model.cfg.n_ctx} tokens"
        )


def _stopped(tokenizer, new: list[int], stop_ids: set[int], stop_strings: Sequence[str]) -> bool:
    """Whether a row that has generated ``new`` (its last token just now) ends here (module docstring)."""
    if new[-1] in stop_ids:
        return True
    if not stop_strings:
        return False
    text = tokenizer.decode(new)
    return any(s in text for s in stop_strings)


def _stop_strings(model, stop_strings: Sequence[str]) -> tuple[str, ...]:
    strings = tuple(stop_strings)
    if any(not s for s in strings):
        raise ValueError("stop_strings must be non-empty strings")
    if strings and model.tokenizer is None:
        raise ValueError("stop_strings need a model with a tokenizer")
    return strings


@torch.inference_mode()
def greedy(
    model, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = ()
) -> list[int]:
    """The greedy continuation of ``prompt`` (token ids), up to ``max_new_tokens`` tokens; it ends after the
    first token in ``stop_ids`` (which is kept), once its text contains one of ``stop_strings`` (the token
    completing it kept) or at ``max_new_tokens``. Whatever hooks are on the model apply."""
    _check_prompt(model, prompt, max_new_tokens)
    strings = _stop_strings(model, stop_strings)
    device = model.cfg.device
    cache = _new_cache(model, 1)
    ids = torch.tensor([list(prompt)], device=device)
    stops = set(stop_ids)
    new: list[int] = []
    prefill = True
    while len(new) < max_new_tokens:
        with positions.marked(positions.generation_kinds(1, ids.shape[1], prefill)):
            logits = model(ids, past_kv_cache=cache, attention_mask=torch.ones_like(ids))
        new.append(int(logits[0, -1].argmax()))
        if _stopped(model.tokenizer, new, stops, strings):
            break
        ids = torch.tensor([[new[-1]]], device=device)
        prefill = False
    return new


@torch.inference_mode()
def greedy_batch(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    batch_size: int = 16,
    progress=None,
) -> list[list[int]]:
    """:func:`greedy` of each prompt (token ids), in order, the prompts' common prefix run once and the rest
    ``batch_size`` prompts at a time (module docstring). ``progress`` (a tqdm bar) advances per prompt done."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    tokens = [tuple(p) for p in prompts]
    for p in tokens:
        _check_prompt(model, p, max_new_tokens)
    strings = _stop_strings(model, stop_strings)
    out: list[list[int]] = [[] for _ in tokens]
    if not tokens or max_new_tokens < 1:
        if progress is not None:
            progress.update(len(tokens))
        return out
    shared_len = common_prefix([p[:-1] for p in tokens])
    shared = _prefix_cache(model, tokens[0][:shared_len])
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    pad_id = pad_token_id(model) if model.tokenizer is not None else 0
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        cache = _contexts_cache(model, shared, shared_len, [tokens[i] for i in chunk], pad_id)
        rows = _decode(model, cache, [tokens[i][-1] for i in chunk], max_new_tokens, set(stop_ids), strings, progress)
        del cache  # freed before the next batch's is built
        for i, row in zip(chunk, rows, strict=True):
            out[i] = row
    return out


def _decode(model, cache, lasts: list[int], max_new_tokens: int, stops: set[int], strings, progress) -> list[list[int]]:
    """Greedy decoding of a batch whose cache holds every prompt but its last token (``lasts``)."""
    device = model.cfg.device
    new: list[list[int]] = [[] for _ in lasts]
    alive = list(range(len(lasts)))  # the prompts (indices into ``lasts``) still in the batch, by row
    feed, prompt_end = lasts, True
    while alive:
        ids = torch.tensor(feed, device=device)[:, None]
        with positions.marked(positions.generation_kinds(len(alive), 1, prefill=prompt_end)):
            logits = model(ids, past_kv_cache=cache, attention_mask=torch.ones_like(ids))
        keep = []
        for row, (g, token) in enumerate(zip(alive, logits[:, -1].argmax(-1).tolist(), strict=True)):
            new[g].append(token)
            if len(new[g]) >= max_new_tokens or _stopped(model.tokenizer, new[g], stops, strings):
                if progress is not None:
                    progress.update(1)
            else:
                keep.append(row)
        if len(keep) < len(alive) and keep:
            cache = _rows_of(cache, torch.tensor(keep, device=device), frozen=False)
        alive = [alive[row] for row in keep]
        feed, prompt_end = [new[g][-1] for g in alive], False
    return new
