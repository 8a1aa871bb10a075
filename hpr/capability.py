"""What an edit costs on text unrelated to it: KL(base || edited) of the next-token distribution, and perplexity.

ITI's paper reports the same two numbers (cross-entropy and KL to the original model, on 100 OpenWebText passages
of 128 tokens, the intervention at every position). Here the text is neutral passages
(:mod:`hpr.data.neutral`), and every token counts as continuation (:func:`hpr.positions.as_answer`), so each
editor edits every position of it, whatever positions it edits on a question: the measure is of the edit itself,
not of where an MC prompt lets it act. Per method, with ``n`` the next-token predictions of every passage:

- ``kl`` = mean over the ``n`` positions of ``sum_v p_base(v) (log p_base(v) - log p_edit(v))``;
- ``perplexity`` = ``exp(mean NLL of the true next token)``; ``ppl_change`` = edited / base - 1.

An editor that leaves every activation bit-identical (zero strength) has KL exactly 0 and the base perplexity.
Memory is bounded: rows are batched so that one ``[rows, pos, vocab]`` float32 tensor stays near 256 MB (a
262k vocabulary makes the unembedding large), and only the running sums are kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from hpr import positions
from hpr.editors.base import applied_if_any
from hpr.encoding import pad_token_id

LOGIT_FLOATS = 1 << 26  # float32 elements of one [rows, pos, vocab] tensor (256 MB)


def encode_passages(model, passages: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each passage (BOS first where the model adds one), cut to ``max_tokens``; passages of fewer
    than two tokens (nothing to predict) are dropped."""
    tok = model.tokenizer
    prefix = [tok.bos_token_id] if model.cfg.default_prepend_bos and tok.bos_token_id is not None else []
    limit = min(max_tokens, model.cfg.n_ctx)
    encoded = [(prefix + tok(t, add_special_tokens=False)["input_ids"])[:limit] for t in passages]
    encoded = [e for e in encoded if len(e) >= 2]
    if not encoded:
        raise ValueError("the neutral text has no passage of at least two tokens")
    return encoded


def _log_probs(model, ids: torch.Tensor, editor) -> torch.Tensor:
    with applied_if_any(editor, model), positions.as_answer():  # neutral text: every token is continuation
        logits = model(ids.to(model.cfg.device))
    return logits[:, :-1].float().log_softmax(-1).cpu()


@torch.inference_mode()
def measure(model, encoded: Sequence[Sequence[int]], editors: Mapping[str, object], progress=None) -> dict:
    """``{label: {"kl", "nll", "perplexity", "tokens"}}`` for ``"base"``, the unedited model whose pass every KL
    is taken against, and for each editor of ``editors`` (a None editor is the unedited model: left out)."""
    editors = {label: e for label, e in editors.items() if e is not None}
    pad_id = pad_token_id(model)
    width = max(map(len, encoded))
    rows_per_batch = max(1, LOGIT_FLOATS // (width * model.cfg.d_vocab))
    sums = {label: [0.0, 0.0] for label in ["base", *editors]}  # KL sum, NLL sum
    count = 0
    for start in range(0, len(encoded), rows_per_batch):
        batch = encoded[start : start + rows_per_batch]
        ids = torch.full((len(batch), max(map(len, batch))), pad_id, dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, : len(e)] = torch.tensor(e)
        lengths = torch.tensor([len(e) for e in batch])
        has_next = torch.arange(ids.shape[1] - 1)[None] < (lengths - 1)[:, None]
        targets = ids[:, 1:, None]
        base = _log_probs(model, ids, None)
        base_p = base.exp()
        for label, editor in [("base", None), *editors.items()]:
            logp = base if editor is None else _log_probs(model, ids, editor)
            kl = (base_p * (base - logp)).sum(-1)
            nll = -logp.gather(-1, targets).squeeze(-1)
            sums[label][0] += float(kl[has_next].double().sum())
            sums[label][1] += float(nll[has_next].double().sum())
            del logp
        count += int(has_next.sum())
        if progress is not None:
            progress.update(len(batch))
    return {
        label: {"kl": kl / count, "nll": nll / count, "perplexity": math.exp(nll / count), "tokens": count}
        for label, (kl, nll) in sums.items()
    }


def with_ppl_change(measures: Mapping[str, Mapping]) -> dict:
    """Each label's measures with ``ppl_change`` (its perplexity / the base's - 1) added."""
    base = measures["base"]["perplexity"]
    return {label: {**m, "ppl_change": m["perplexity"] / base - 1} for label, m in measures.items()}
