"""The halving MLPs that HPR (its angle network) and Diff (its shift network) fit per layer.

Widths ``d, d/2, ..., d/2**(depth-1)``, then the output width (1 for HPR's angle, ``d`` for Diff's shift), GELU
between the linear layers. Trained for every layer at once with parameters stacked on a layer axis
(:func:`stacked_parameters`, :func:`stacked_mlp`); stored per layer as ``<prefix>.<i>.weight`` ``[d_in, d_out]``
and ``<prefix>.<i>.bias`` ``[d_out]`` and run one layer at a time (:func:`stored_parameters`, :func:`mlp`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn


def halving_widths(d_model: int, depth: int, out: int) -> list[int]:
    """``[d, d/2, ..., d/2**(depth-1), out]``."""
    return [d_model // (2**i) for i in range(depth)] + [out]


def stacked_parameters(n_layers: int, widths: list[int]) -> tuple[nn.ParameterList, nn.ParameterList]:
    """Weights ``[n_layers, d_in, d_out]`` and biases ``[n_layers, 1, d_out]`` of each linear layer, drawn as
    ``nn.Linear`` draws its own (uniform within ``1/sqrt(d_in)``), weight then bias, layer by layer."""
    weights, biases = nn.ParameterList(), nn.ParameterList()
    for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
        bound = 1 / math.sqrt(d_in)
        weights.append(nn.Parameter(torch.empty(n_layers, d_in, d_out).uniform_(-bound, bound)))
        biases.append(nn.Parameter(torch.empty(n_layers, 1, d_out).uniform_(-bound, bound)))
    return weights, biases


def stacked_mlp(x: Tensor, weights, biases) -> Tensor:
    """One MLP per layer at once: ``x [layers, n, d_in]``, weights ``[layers, d_in, d_out]``, biases
    ``[layers, 1, d_out]``; GELU between the linear layers."""
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        x = torch.baddbmm(b, x, w)
        if i < len(weights) - 1:
            x = nn.functional.gelu(x)
    return x


def mlp(x: Tensor, params) -> Tensor:
    """The same MLP for one layer: ``x [..., d_in]``, ``params`` a list of ``(weight [d_in, d_out], bias)``."""
    shape = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    for i, (w, b) in enumerate(params):
        x = torch.addmm(b.to(x.device), x, w.to(x.device))
        if i < len(params) - 1:
            x = nn.functional.gelu(x)
    return x.reshape(*shape, -1)


def stored_depth(tensors: Mapping[str, Tensor], prefix: str) -> int:
    """How many linear layers an editor's state holds under ``prefix``."""
    return sum(1 for name in tensors if re.fullmatch(rf"{re.escape(prefix)}\.\d+\.weight", name))


def stored_shapes(prefix: str, widths: list[int]) -> dict[str, tuple[int, ...]]:
    """The shape each stored tensor under ``prefix`` must have, for an MLP of ``widths``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        shapes[f"{prefix}.{i}.weight"] = (d_in, d_out)
        shapes[f"{prefix}.{i}.bias"] = (d_out,)
    return shapes


def stored_parameters(tensors: Mapping[str, Tensor], prefix: str) -> list[tuple[Tensor, Tensor]]:
    """``[(weight, bias), ...]`` of the MLP stored under ``prefix``, from layer 0 on while there is one (empty
    when there is none)."""
    params: list[tuple[Tensor, Tensor]] = []
    while f"{prefix}.{len(params)}.weight" in tensors:
        i = len(params)
        params.append((tensors[f"{prefix}.{i}.weight"], tensors[f"{prefix}.{i}.bias"]))
    return params
