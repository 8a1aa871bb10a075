"""Honest naive baselines: HPR training as a per-layer loop, MC scoring one sequence at a time.

HPR training: one ``LayerwiseHPR(n_layers=1)`` per layer, trained in a loop.

Same optimiser settings, schedule, clipping and batch order as :func:`hpr.editors.hpr.fit_layerwise`,
and the same initial parameters (each layer's net starts from that layer's slice of the batched net's
initialisation), so the two differ only in how the work is issued. The one semantic difference is
inherent to training layers separately: gradient clipping is per layer instead of global.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hpr import ops
from hpr.editors.hpr import HPRTrainConfig, LayerwiseHPR


def _copy_cells(into, rows, cols):
    def hook(act, hook):
        into.copy_(act[rows, cols])

    return hook


def _slice(net: LayerwiseHPR, layer: int) -> LayerwiseHPR:
    n_layers, d = net.probe.shape
    one = LayerwiseHPR(1, d, len(net.weights))
    with torch.no_grad():
        one.probe.copy_(net.probe[layer : layer + 1])
        for w1, w in zip(one.weights, net.weights, strict=True):
            w1.copy_(w[layer : layer + 1])
        for b1, b in zip(one.biases, net.biases, strict=True):
            b1.copy_(b[layer : layer + 1])
    return one


def train_per_layer(pos: Tensor, neg: Tensor, cfg: HPRTrainConfig) -> list[LayerwiseHPR]:
    """A Python loop over layers, each trained on its own with the batches ``fit_layerwise`` uses."""
    torch.manual_seed(cfg.seed)
    n, n_layers, d = pos.shape
    init = LayerwiseHPR(n_layers, d, cfg.angle_layers)  # same draws as fit_layerwise's net
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(cfg.warmup * total))
    nets = []
    for layer in range(n_layers):
        gen = torch.Generator().manual_seed(cfg.seed)  # the same batch order for every layer
        net = _slice(init, layer)
        p, q = pos[:, layer : layer + 1], neg[:, layer : layer + 1]
        target = ops.vector_angle(q, p)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
        )
        for _ in range(cfg.epochs):
            for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
                x = torch.cat([p[idx], q[idx]]).transpose(0, 1)  # [1, 2B, d]
                y = torch.cat([torch.ones(len(idx)), torch.zeros(len(idx))])[None]
                t = torch.cat([torch.zeros(len(idx), 1), target[idx]]).T
                bce = nn.functional.binary_cross_entropy_with_logits(net.logits(x), y)
                mse = ((net.theta(x) - t) ** 2).mean()
                loss = bce + mse
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
        nets.append(net.eval())
    return nets


@torch.no_grad()
def layer_losses(net: LayerwiseHPR, pos: Tensor, neg: Tensor) -> Tensor:
    """Final training loss per layer, ``BCE + MSE`` over all pairs: ``[net layers]``."""
    target = ops.vector_angle(neg, pos)
    n, n_layers = target.shape
    x = torch.cat([pos, neg]).transpose(0, 1)
    y = torch.cat([torch.ones(n), torch.zeros(n)]).expand(n_layers, -1)
    t = torch.cat([torch.zeros(n, n_layers), target]).T
    bce = nn.functional.binary_cross_entropy_with_logits(net.logits(x), y, reduction="none").mean(1)
    return bce + ((net.theta(x) - t) ** 2).mean(1)


@torch.inference_mode()
def score_one_at_a_time(model, pairs) -> list[float]:
    """The textbook scorer: each ``(context, continuation)`` run whole, alone, logits at every position."""
    from hpr.scoring import encode_all

    out = []
    for e in encode_all(model, pairs):
        logprobs = model(torch.tensor([e.tokens], device=model.cfg.device)).log_softmax(-1)[0]
        total = len(e.tokens)
        targets = torch.tensor(e.tokens[total - e.n_cont :], device=logprobs.device)
        out.append(float(logprobs[total - e.n_cont - 1 : total - 1].gather(-1, targets[:, None]).sum()))
    return out


# ---------------------------------------------------------------------------------------------------------
# The paths hpr.continuations replaced, kept as the baselines of the real-model-shape measures: collection
# ran every answer whole (primer and question recomputed for each answer); scoring ran each question's
# context once into a KV cache, but the few-shot primer again for every question.


@torch.inference_mode()
def collect_whole_sequences(model, pairs, batch_size: int = 16) -> Tensor:
    """resid_post of every layer at every continuation token, each pair run whole (right-padded batches)."""
    from hpr.encoding import encode_all, pad_batch, pad_token_id

    encoded = encode_all(model, pairs)
    n_layers = model.cfg.n_layers
    out = torch.empty(sum(e.n_cont for e in encoded), n_layers, model.cfg.d_model)
    start = 0
    for first in range(0, len(encoded), batch_size):
        batch = encoded[first : first + batch_size]
        ids, _ = pad_batch(batch, pad_token_id(model))
        rows = torch.tensor([i for i, e in enumerate(batch) for _ in range(e.n_cont)])
        cols = torch.tensor([t for e in batch for t in range(len(e.tokens) - e.n_cont, len(e.tokens))])
        span = slice(start, start + len(rows))
        names = [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
        hooks = [(name, _copy_cells(out[span, layer], rows, cols)) for layer, name in enumerate(names)]
        with model.hooks(fwd_hooks=hooks):
            model(ids.to(model.cfg.device), stop_at_layer=n_layers)
        start += len(rows)
    return out


@torch.inference_mode()
def score_question_contexts(model, pairs, batch_size: int = 16) -> list[float]:
    """Each distinct context (primer + question) run once into a KV cache, then its continuations."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    from hpr.continuations import _rows_of
    from hpr.encoding import encode_all, pad_token_id
    from hpr.scoring import final_logits

    encoded = encode_all(model, pairs)
    pad_id, device, n_layers = pad_token_id(model), model.cfg.device, model.cfg.n_layers
    groups: dict[tuple, list[int]] = {}
    for i, e in enumerate(encoded):
        groups.setdefault(e.tokens[: len(e.tokens) - e.n_cont], []).append(i)
    contexts = list(groups)
    scores = [0.0] * len(encoded)
    per_batch = max(1, batch_size // max(len(ix) for ix in groups.values()))
    for first in range(0, len(contexts), per_batch):
        chunk = contexts[first : first + per_batch]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for g, c in enumerate(chunk):
            ids[g, width - len(c) :], mask[g, width - len(c) :] = torch.tensor(c), 1
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, len(chunk))
        resid = model(ids.to(device), past_kv_cache=cache, attention_mask=mask.to(device), stop_at_layer=n_layers)
        first_logp = final_logits(model, resid[:, -1:])[:, 0].float().log_softmax(-1)
        items = [(g, i) for g, c in enumerate(chunk) for i in groups[c]]
        conts = {i: encoded[i].tokens[len(encoded[i].tokens) - encoded[i].n_cont :] for _, i in items}
        for g, i in items:
            scores[i] = float(first_logp[g, conts[i][0]])
        longer = [(g, i) for g, i in items if len(conts[i]) > 1]
        if not longer:
            continue
        width = max(len(conts[i]) - 1 for _, i in longer)
        ids = torch.full((len(longer), width), pad_id, dtype=torch.long)
        for r, (_, i) in enumerate(longer):
            ids[r, : len(conts[i]) - 1] = torch.tensor(conts[i][:-1])
        rows_cache = _rows_of(cache, torch.tensor([g for g, _ in longer], device=device))
        ids = ids.to(device)
        resid = model(ids, past_kv_cache=rows_cache, attention_mask=torch.ones_like(ids), stop_at_layer=n_layers)
        logp = final_logits(model, resid).float().log_softmax(-1)
        for r, (_, i) in enumerate(longer):
            c = torch.tensor(conts[i][1:], device=device)
            scores[i] += float(logp[r, : len(c)].gather(-1, c[:, None]).sum())
    return scores
