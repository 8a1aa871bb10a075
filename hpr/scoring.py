"""Log-likelihood of continuations, exactly as lm-evaluation-harness scores multiple choice.

``loglik(choice) = sum_i log p(cont_i | context, cont_<i)``: summed, unnormalised, over the continuation
tokens as :mod:`hpr.encoding` splits them (lm-eval's ``_encode_pair``). Shared contexts run once
(:mod:`hpr.continuations`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from hpr import positions, threads
from hpr.continuations import stream_batches
from hpr.encoding import Encoded, encode_all, encode_context, encode_pair, pad_batch, pad_token_id

__all__ = [
    "Encoded",
    "batch_logliks",
    "encode_all",
    "encode_context",
    "encode_pair",
    "final_logits",
    "pad_batch",
    "pad_token_id",
    "score",
]


def final_logits(model, resid: Tensor) -> Tensor:
    """The model's logits from final-block residuals ``[batch, pos, d_model]``: what ``model(...)`` does
    after its last block (final norm, unembedding, logit soft-cap), run on chosen positions only."""
    from transformer_lens.utilities import apply_softcap

    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    return apply_softcap(model.unembed(resid), model.cfg.output_logits_soft_cap)


def _summed_logprobs(model, resid: Tensor, rows, positions, targets: list[int], counts: list[int]) -> list[float]:
    """Gather ``resid[rows, positions]``, score ``targets`` and sum them in runs of ``counts``."""
    device = resid.device
    picked = resid[torch.as_tensor(rows, device=device), torch.as_tensor(positions, device=device)]
    with threads.model_pass():  # row by row, so on the passes' threads with the same bits
        logprobs = torch.log_softmax(final_logits(model, picked[None])[0].float(), dim=-1)
    chosen = logprobs.gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]
    return [float(part.sum()) for part in torch.split(chosen, counts)]


def _score_whole(model, batch: Sequence[Encoded], pad_id: int) -> list[float]:
    """Each sequence in full, right-padded; logits only where a continuation token is predicted."""
    ids, _ = pad_batch(batch, pad_id)
    kinds = positions.whole_sequence_kinds(
        [len(e.tokens) - e.n_cont for e in batch], [len(e.tokens) for e in batch], ids.shape[1]
    )
    with positions.marked(kinds):
        resid = model(ids.to(model.cfg.device), stop_at_layer=model.cfg.n_layers)
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for i, e in enumerate(batch):
        total = len(e.tokens)
        for t in range(total - e.n_cont, total):  # logits at t-1 predict token t
            rows.append(i)
            cols.append(t - 1)
            targets.append(e.tokens[t])
    return _summed_logprobs(model, resid, rows, cols, targets, [e.n_cont for e in batch])


def batch_logliks(model, batch, encoded: Sequence[Encoded]) -> list[float]:
    """Summed log-likelihood of each row's continuation in ``batch`` (a :class:`~hpr.continuations.
    ContinuationBatch` built ``for_scoring`` from ``encoded``), in row order."""
    resid = batch.run(model, stop_at_layer=model.cfg.n_layers)
    rows, cols = batch.continuation_cells(predicting=True)
    targets = [t for i in batch.index for t in encoded[i].tokens[len(encoded[i].tokens) - encoded[i].n_cont :]]
    return _summed_logprobs(model, resid, rows, cols, targets, batch.n_cont)


@torch.inference_mode()
def score(
    model,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 16,
    progress: bool = False,
    share_prefix: bool = True,
    alongside: tuple[Sequence[Encoded], Callable] | None = None,
) -> list[float]:
    """Summed log-likelihood of each ``(context, continuation)`` under ``model`` (with whatever hooks are on it).

    Identical pairs are scored once. Continuations that share their context token for token (the choices
    of one question) run the context once, through a KV cache (``share_prefix``; turn it off for hooks that
    look at a whole sequence at once). The rest run whole, batched by length to waste little padding.
    ``alongside = (encoded, read)``: other continuations of the same contexts that ride on each chunk's cache
    (:func:`hpr.continuations.stream_batches`); ``read(batch)`` runs each of their batches.
    """
    from tqdm.auto import tqdm

    unique = list(dict.fromkeys(pairs))
    encoded = encode_all(model, unique)
    results: dict[int, float] = {}
    bar = tqdm(total=len(unique), desc="scoring", disable=not progress, unit="answer")
    if alongside is not None and not share_prefix:
        raise ValueError("alongside needs share_prefix: it rides on the shared contexts' caches")
    if share_prefix:
        streams = [(encoded, True)] + ([(alongside[0], False)] if alongside is not None else [])
        for stream, batch in stream_batches(model, streams, batch_size, [bar]):
            if stream == 0:
                results.update(zip(batch.index, batch_logliks(model, batch, encoded), strict=True))
            else:
                alongside[1](batch)  # type: ignore[index]
            del batch  # freed before the next batch's row cache is built
    else:
        pad_id = pad_token_id(model)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].tokens))  # little padding
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            results.update(zip(idx, _score_whole(model, [encoded[i] for i in idx], pad_id), strict=True))
            bar.update(len(idx))
    bar.close()
    lookup = {p: results[i] for i, p in enumerate(unique)}
    return [lookup[p] for p in pairs]
