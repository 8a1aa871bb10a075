"""Honest naive baselines: HPR training as a per-layer loop, MC scoring one sequence at a time.

HPR training: one ``LayerwiseHPR(n_layers=1)`` per layer, trained in a loop.

Same optimiser settings, schedule, clipping and batch order as :func:`hpr.editors.hpr.train_layerwise`,
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


def _slice(net: LayerwiseHPR, layer: int) -> LayerwiseHPR:
    n_layers, d = net.probe.shape
    one = LayerwiseHPR(1, d, len(net.weights))
    with torch.no_grad():
        one.probe.copy_(net.probe[layer : layer + 1])
        for w1, w in zip(one.weights, net.weights):
            w1.copy_(w[layer : layer + 1])
        for b1, b in zip(one.biases, net.biases):
            b1.copy_(b[layer : layer + 1])
    return one


def train_per_layer(pos: Tensor, neg: Tensor, cfg: HPRTrainConfig) -> list[LayerwiseHPR]:
    """A Python loop over layers, each trained on its own with the batches ``train_layerwise`` uses."""
    torch.manual_seed(cfg.seed)
    n, n_layers, d = pos.shape
    init = LayerwiseHPR(n_layers, d, cfg.angle_layers)  # same draws as train_layerwise's net
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
            opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
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
