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


def final_logits(model, resid: Tensor) -> Tensor:
    """The model's logits from final-block residuals ``[batch, pos, d_model]``: what ``model(...)`` does
    after its last block (final norm, unembedding, logit soft-cap), run on chosen positions only."""
    from transformer_lens.utilities import apply_softcap

    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    return apply_softcap(model.unembed(resid), model.cfg.output_logits_soft_cap)


def _summed_logprobs(model, resid: Tensor, rows: list[int], positions: list[int], targets: list[int],
                     counts: list[int]) -> list[float]:
    """Gather ``resid[rows, positions]``, score ``targets`` and sum them in runs of ``counts``."""
    device = resid.device
    picked = resid[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]
    logprobs = torch.log_softmax(final_logits(model, picked[None])[0].float(), dim=-1)
    chosen = logprobs.gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]
    return [float(part.sum()) for part in torch.split(chosen, counts)]


def _rows_of(cache, rows: Tensor):
    """A frozen KV cache whose row ``i`` is row ``rows[i]`` of ``cache``."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = [TransformerLensKeyValueCacheEntry(e.past_keys[rows], e.past_values[rows], frozen=True)
               for e in cache.entries]
    return TransformerLensKeyValueCache(entries, cache.previous_attention_mask[rows], frozen=True)


def _score_whole(model, batch: Sequence[Encoded], pad_id: int) -> list[float]:
    """Each sequence in full, right-padded; logits only where a continuation token is predicted."""
    ids, _ = pad_batch(batch, pad_id)
    resid = model(ids.to(model.cfg.device), stop_at_layer=model.cfg.n_layers)
    rows, positions, targets = [], [], []
    for i, e in enumerate(batch):
        total = len(e.tokens)
        for t in range(total - e.n_cont, total):  # logits at t-1 predict token t
            rows.append(i), positions.append(t - 1), targets.append(e.tokens[t])
    return _summed_logprobs(model, resid, rows, positions, targets, [e.n_cont for e in batch])


def _score_shared_contexts(model, groups: Sequence[tuple[tuple[int, ...], list[Encoded]]], pad_id: int) -> list[float]:
    """Continuations grouped by their context: the contexts run once, left-padded in one batch, into a KV
    cache; then every continuation runs only over its own tokens against its context's cache rows. Every
    hook sees each real position once, with the same causal past and the same positions (TransformerLens
    derives positions from the attention mask), as in a whole-sequence pass, so position-wise edits (all of
    hpr's editors) give the same scores up to float rounding. Scores in group order."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    device, n_layers = model.cfg.device, model.cfg.n_layers
    width = max(len(c) for c, _ in groups)
    ctx = torch.full((len(groups), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(groups), width), dtype=torch.long)
    for g, (context, _) in enumerate(groups):
        ctx[g, width - len(context) :] = torch.tensor(context)
        mask[g, width - len(context) :] = 1
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, len(groups))
    resid = model(ctx.to(device), past_kv_cache=cache, attention_mask=mask.to(device), stop_at_layer=n_layers)
    first = torch.log_softmax(final_logits(model, resid[:, -1:])[:, 0].float(), dim=-1)  # predicts token 1

    conts = [(g, e.tokens[len(e.tokens) - e.n_cont :]) for g, (_, items) in enumerate(groups) for e in items]
    scores = [float(first[g, c[0]]) for g, c in conts]
    longer = [i for i, (_, c) in enumerate(conts) if len(c) > 1]
    if longer:  # inputs are each continuation minus its last token; right-padded, pads never read
        width = max(len(conts[i][1]) - 1 for i in longer)
        ids = torch.full((len(longer), width), pad_id, dtype=torch.long)
        for row, i in enumerate(longer):
            ids[row, : len(conts[i][1]) - 1] = torch.tensor(conts[i][1][:-1])
        ids = ids.to(device)
        rows_cache = _rows_of(cache, torch.tensor([conts[i][0] for i in longer], device=device))
        resid = model(ids, past_kv_cache=rows_cache, attention_mask=torch.ones_like(ids), stop_at_layer=n_layers)
        rows, positions, targets = [], [], []
        for row, i in enumerate(longer):
            for t in range(1, len(conts[i][1])):
                rows.append(row), positions.append(t - 1), targets.append(conts[i][1][t])
        rest = _summed_logprobs(model, resid, rows, positions, targets, [len(conts[i][1]) - 1 for i in longer])
        for i, r in zip(longer, rest):
            scores[i] += r
    return scores


@torch.inference_mode()
def score(model, pairs: Sequence[tuple[str, str]], batch_size: int = 16, progress: bool = False,
          share_prefix: bool = True) -> list[float]:
    """Summed log-likelihood of each ``(context, continuation)`` under ``model`` (with whatever hooks are on it).

    Identical pairs are scored once. Continuations that share their context token for token (the choices
    of one question) run the context once, through a KV cache (``share_prefix``; turn it off for hooks that
    look at a whole sequence at once). The rest run whole, batched by length to waste little padding.
    """
    from tqdm.auto import tqdm

    unique = list(dict.fromkeys(pairs))
    encoded = encode_all(model, unique)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, e in enumerate(encoded):
        groups.setdefault(e.tokens[: len(e.tokens) - e.n_cont], []).append(i)
    shared = {c: ix for c, ix in groups.items() if share_prefix and len(ix) > 1}
    whole = sorted((i for c, ix in groups.items() if c not in shared for i in ix),
                   key=lambda i: -len(encoded[i].tokens))
    pad_id = pad_token_id(model)
    results: dict[int, float] = {}
    bar = tqdm(total=len(unique), desc="scoring", disable=not progress, unit="answer")
    for start in range(0, len(whole), batch_size):
        idx = whole[start : start + batch_size]
        results.update(zip(idx, _score_whole(model, [encoded[i] for i in idx], pad_id)))
        bar.update(len(idx))
    # Contexts of similar length together (little left padding), up to batch_size continuations a batch
    # (a question with more choices than that goes alone).
    chunks: list[list[tuple[tuple[int, ...], list[int]]]] = []
    size = 0
    for context, idx in sorted(shared.items(), key=lambda kv: -len(kv[0])):
        if not chunks or size + len(idx) > batch_size:
            chunks.append([])
            size = 0
        chunks[-1].append((context, idx))
        size += len(idx)
    for chunk in chunks:
        flat = [i for _, ix in chunk for i in ix]
        groups_in = [(c, [encoded[i] for i in ix]) for c, ix in chunk]
        results.update(zip(flat, _score_shared_contexts(model, groups_in, pad_id)))
        bar.update(len(flat))
    bar.close()
    lookup = {p: results[i] for i, p in enumerate(unique)}
    return [lookup[p] for p in pairs]
