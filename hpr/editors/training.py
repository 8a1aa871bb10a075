"""What the trained editors (HPR, Diff, LoRA) share in their optimisation: the learning-rate schedule."""

from __future__ import annotations

import torch


def warmup_then_linear_decay(opt: torch.optim.Optimizer, warmup: float, total_steps: int):
    """Linear warmup over the first ``warmup`` fraction of ``total_steps`` (at least one step), then linear
    decay to 0 at ``total_steps``: the official HPR schedule, which LoRA follows too."""
    warm = max(1, int(warmup * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total_steps - s) / max(1, total_steps - warm))
    )
