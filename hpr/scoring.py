"""Log-likelihood of continuations, exactly as lm-evaluation-harness scores multiple choice.

``loglik(choice) = sum_i log p(cont_i | context, cont_<i)``: summed, unnormalised. The context and the
whole string are tokenized separately and the continuation tokens are the tail of the whole string
beyond the context's tokens (lm-eval's ``_encode_pair``), so the leading space stays with the
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
    cont = whole[len(ctx):]
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
    pad = model.tokenizer.pad_token_id
    return pad if pad is not None else 0


def pad_batch(batch: Sequence[Encoded], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded token ids ``[batch, pos]`` and lengths."""
    lengths = torch.tensor([len(e.tokens) for e in batch])
    ids = torch.full((len(batch), int(lengths.max())), pad_id, dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.tokens)] = torch.tensor(e.tokens)
    return ids, lengths


def continuation_logliks(logits: Tensor, batch: Sequence[Encoded]) -> list[float]:
    """Sum of log-probabilities of each row's continuation tokens, from ``[batch, pos, vocab]`` logits."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, e in enumerate(batch):
        n, total = e.n_cont, len(e.tokens)
        targets = torch.tensor(e.tokens[total - n :], device=logits.device)
        # logits at position t predict token t+1
        out.append(logprobs[i, total - n - 1 : total - 1].gather(-1, targets[:, None]).sum().item())
    return out


@torch.inference_mode()
def score(model, pairs: Sequence[tuple[str, str]], batch_size: int = 16, progress: bool = False) -> list[float]:
    """Summed log-likelihood of each ``(context, continuation)`` under ``model`` (with whatever hooks are on it).

    Identical pairs are scored once. Batches are sorted by length to waste little padding.
    """
    from tqdm.auto import tqdm

    unique = list(dict.fromkeys(pairs))
    encoded = encode_all(model, unique)
    order = sorted(range(len(unique)), key=lambda i: -len(encoded[i].tokens))
    pad_id = pad_token_id(model)
    results: dict[int, float] = {}
    device = model.cfg.device
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", disable=not progress, unit="batch"):
        idx = order[start : start + batch_size]
        batch = [encoded[i] for i in idx]
        ids, _ = pad_batch(batch, pad_id)
        logits = model(ids.to(device), return_type="logits")
        for i, ll in zip(idx, continuation_logliks(logits, batch)):
            results[i] = ll
    lookup = {p: results[i] for i, p in enumerate(unique)}
    return [lookup[p] for p in pairs]
