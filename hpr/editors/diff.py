"""Diff: the HPR paper's learned-difference baseline.

Per edited layer l, a network ``f_l: R^d -> R^d`` learns the shift that takes an activation to the
positive side: trained on the aligned answer-token pairs of :meth:`AnswerActivations.token_pairs` with target
``pos - h``, i.e. ``0`` for a positive token and ``pos - neg`` for its aligned negative. Loss: MSE (mean
over tokens and dimensions, then over layers); all layers are trained together in one batched pass with
HPR's reference optimiser settings (AdamW lr 5e-4, 5 epochs, batch 16 pairs, 5 % warmup then linear decay,
weight decay 0, grad clip 1.0), so the two methods see the same data and budget.

Edit at ``blocks.{l}.hook_resid_post`` of each edited layer, every position of every forward pass (as HPR;
``positions``, :mod:`hpr.positions`, can restrict it):
``h <- h + scale * f_l(h)``. Nothing gates the edit and nothing preserves the norm: that is the contrast
with HPR. Math in float32, the result cast back to the activation's dtype.

Network: the paper does not give its shape; we reuse HPR's angle-network trunk (``d -> d/2 -> d/4 ->
d/8``, GELU between) with a final linear layer back to ``d``, so both methods have the same capacity
up to the output width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hpr.editors.base import Editor, Hook, Shape, check_number, distinct_layers, register
from hpr.editors.halving_mlp import (
    halving_widths,
    mlp,
    stacked_mlp,
    stacked_parameters,
    stored_depth,
    stored_parameters,
    stored_shapes,
)
from hpr.editors.hpr import HPRTrainConfig, fit_on_pairs
from hpr.editors.registry import FitContext, Method, register_method
from hpr.positions import HELP as POSITIONS_HELP
from hpr.positions import check_mode


@dataclass(frozen=True)
class DiffConfig:
    layers: tuple[int, ...] = field(default=(), metadata={"help": "edited layers (0-based blocks)"})
    scale: float = field(default=1.0, metadata={"help": "multiplier of the predicted shift (0 = base model)"})
    positions: str = field(default="all", metadata={"help": POSITIONS_HELP})

    def __post_init__(self):
        layers = distinct_layers(self.layers, "Diff")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "scale", check_number(self.scale, "Diff scale"))
        check_mode(self.positions, "Diff positions")


def diff_widths(d_model: int, hidden_layers: int) -> list[int]:
    """``[d, d/2, ..., d/2**(hidden_layers-1), d]``: the halving trunk, then back to ``d``."""
    widths = halving_widths(d_model, hidden_layers, d_model)
    if min(widths) < 1:
        raise ValueError(f"d_model={d_model} too small for {hidden_layers} halving layers")
    return widths


class LayerwiseDiff(nn.Module):
    """One shift network per layer, parameters stacked on a layer axis (trained in one batched pass)."""

    def __init__(self, n_layers: int, d_model: int, hidden_layers: int = 4):
        super().__init__()
        self.weights, self.biases = stacked_parameters(n_layers, diff_widths(d_model, hidden_layers))

    def forward(self, h: Tensor) -> Tensor:
        """``h [layers, n, d]`` -> predicted shifts ``[layers, n, d]``."""
        return stacked_mlp(h, self.weights, self.biases)


def fit_diff(
    pos: Tensor, neg: Tensor, layers: Sequence[int], cfg: HPRTrainConfig, progress: bool = False
) -> DiffEditor:
    """Fit the shift networks of ``layers`` on aligned token pairs ``pos``/``neg`` ``[N, n_layers, d]``."""

    if pos.ndim != 3 or pos.shape != neg.shape or len(pos) == 0:
        raise ValueError(
            f"pos and neg must both be [N, n_layers, d_model] with N > 0, got {tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    n, n_layers, d = pos.shape
    layers = tuple(sorted(int(layer) for layer in layers))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise ValueError(f"Diff needs layers in [0, {n_layers}), got {layers}")
    chosen = list(layers)

    def loss(net: LayerwiseDiff, p: Tensor, q: Tensor) -> Tensor:
        p, q = p[:, chosen].float(), q[:, chosen].float()
        x = torch.cat([p, q]).transpose(0, 1)  # [layers, 2B, d]
        target = torch.cat([torch.zeros_like(p), p - q]).transpose(0, 1)
        return ((net(x) - target) ** 2).mean()

    net = fit_on_pairs(
        lambda: LayerwiseDiff(len(layers), d, cfg.angle_layers), pos, neg, cfg, loss, "training Diff", progress
    )
    tensors = {}
    for j, layer in enumerate(layers):
        for i, (w, b) in enumerate(zip(net.weights, net.biases, strict=True)):
            tensors[f"layer{layer}.{i}.weight"] = w[j].detach().clone()
            tensors[f"layer{layer}.{i}.bias"] = b[j, 0].detach().clone()
    return DiffEditor(DiffConfig(layers=layers), tensors, d, n_layers)


@register
class DiffEditor(Editor):
    method = "diff"
    config_cls = DiffConfig
    strength = "scale"

    def expected_shapes(self) -> dict[str, Shape]:
        """Per layer, the shift network of :func:`diff_widths` (``d -> d/2 -> ... -> d``), as deep as stored."""
        shapes: dict[str, Shape] = {}
        for layer in self.config.layers:
            depth = max(stored_depth(self.tensors, f"layer{layer}"), 1)
            shapes |= stored_shapes(f"layer{layer}", halving_widths(self.d_model, depth, self.d_model))
        return shapes

    def _params(self, layer: int) -> list[tuple[Tensor, Tensor]]:
        params = stored_parameters(self.tensors, f"layer{layer}")
        if not params or params[-1][0].shape[-1] != self.d_model:
            raise ValueError(f"Diff editor state has no complete network for layer {layer}")
        return params

    def shift(self, layer: int, h: Tensor) -> Tensor:
        """``f_layer(h)`` for ``h [..., d]`` (float32)."""
        return mlp(h.float(), self._params(layer))

    def edit(self, layer: int, h: Tensor) -> Tensor:
        """``h + scale * f_layer(h)``, in float32, cast back to ``h``'s dtype."""
        if self.config.scale == 0:
            return h
        return (h.float() + self.config.scale * self.shift(layer, h)).to(h.dtype)

    def hooks(self, model) -> list[Hook]:
        for layer in self.config.layers:
            self._params(layer)  # fail before anything attaches
        return self.resid_post_hooks(model, self.config.layers)


# ------------------------------------------------------------------------------------------------ in a run


def fit_step(fit: FitContext) -> None:
    """Trained with HPR's settings (schedule, epochs, seed) at HPR's layers, so the two differ in the edit only."""
    if fit.done("diff"):
        return
    pos, neg, _ = fit.train_token_pairs()
    fit.save("diff", fit_diff(pos, neg, fit.layers, fit.settings["hpr"], fit.progress))


register_method(
    Method(
        name="diff",
        summary="Learned difference: an MLP adds a learned vector to negative activations (no norm kept)",
        labels=("diff",),
        colours={"diff": "#CC79A7"},
        order=30,
        fit=fit_step,
    )
)
