"""Token encoding of ``(context, continuation)`` pairs, as lm-evaluation-harness does it.

The context and the whole string are tokenized separately and the continuation tokens are the tail of the
whole string beyond the context's tokens (lm-eval's ``_encode_pair``), so the leading space stays with the
continuation. A BOS token is prepended only when ``model.cfg.default_prepend_bos`` says so: lm-eval adds
none for real models; the toy model was trained with an end-of-document token before each document.
Over-long inputs lose tokens from the left of the context, as lm-eval does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Encoded:
    tokens: tuple[int, ...]  # context + continuation
    n_cont: int  # the continuation is the last n_cont tokens


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool, max_len: int) -> Encoded:
    if context.endswith(" "):  # lm-eval moves trailing context spaces onto the continuation
        n = len(context) - len(context.rstrip(" "))
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    if not cont:
        raise ValueError(f"continuation {continuation!r} tokenizes to nothing after context {context[-40:]!r}")
    prefix = [tokenizer.bos_token_id] if add_bos else []
    tokens = (prefix + ctx + cont)[-max_len:]
    if len(tokens) <= len(cont):
        raise ValueError(f"continuation of {len(cont)} tokens does not fit in the model's context of {max_len}")
    return Encoded(tuple(tokens), len(cont))


def encode_all(model, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
    add_bos = bool(model.cfg.default_prepend_bos)
    return [encode_pair(model.tokenizer, c, x, add_bos, model.cfg.n_ctx) for c, x in pairs]


def encode_context(model, context: str, room: int = 0) -> list[int]:
    """A prompt's token ids as the scorer would see it (same BOS rule), leaving ``room`` tokens to generate."""
    ids = model.tokenizer(context, add_special_tokens=False)["input_ids"]
    prefix = [model.tokenizer.bos_token_id] if model.cfg.default_prepend_bos else []
    keep = model.cfg.n_ctx - room
    if keep < 1:
        raise ValueError(f"no room for a prompt: n_ctx={model.cfg.n_ctx}, {room} tokens to generate")
    return (prefix + ids)[-keep:]


def pad_token_id(model) -> int:
    """The id used to right-pad batches (padding follows the real tokens, so causal attention ignores it)."""
    pad = model.tokenizer.pad_token_id if model.tokenizer is not None else None
    return pad if pad is not None else 0


def pad_batch(batch: Sequence[Encoded], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded token ids ``[batch, pos]`` and lengths."""
    ids, _ = pad_sequences([e.tokens for e in batch], pad_id)
    return ids, torch.tensor([len(e.tokens) for e in batch])


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Token ids ``[len(seqs), longest]`` padded with ``pad_id`` on the right (or the left), and the attention
    mask (1 on real tokens). Empty sequences are all padding."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        if seq:
            at = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[r, at] = torch.tensor(seq)
            mask[r, at] = 1
    return ids, mask
