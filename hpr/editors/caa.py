"""CAA, Contrastive Activation Addition / mean-difference steering (Rimsky et al., ACL 2024). Per layer l:
``v_l = mean(resid_post | true answer tokens) - mean(resid_post | false answer tokens)`` (not normalised),
over aligned (true, false) answer-token pairs. Edit at ``blocks.{l}.hook_resid_post``:
``x[:, t] <- x[:, t] + multiplier * v_l`` at the positions ``positions`` selects; the default
``from_prompt_end`` is CAA's "from the end of the instruction on": the prompt's last token and every answer
token (the newest token of each pass in generation). The run steers at one layer, as CAA.

CAA, deliberate differences from the released code:
- its A/B answers are one token and the vector is read there; TruthfulQA answers are sentences, so the
  vector averages every answer token;
- the layer is the best of HPR's top-k layers on validation at multiplier 1 (CAA sweeps every layer on its
  behaviour data), then the multiplier is chosen on validation at that layer; vectors are not normalised
  across behaviours (there is one behaviour);
- option: ``layers="hpr_layers"`` in :class:`CAASettings` (``--caa-layers hpr_layers``) adds the vectors at
  all of HPR's layers at once.

Math in float32, result cast back to the activation's dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hpr.editors.base import (
    Editor,
    Hook,
    Shape,
    check_layers_in_range,
    check_number,
    distinct_layers,
    register,
)
from hpr.editors.registry import FitContext, Method, register_method
from hpr.models import resid_post_hook
from hpr.positions import HELP as POSITIONS_HELP
from hpr.positions import check_mode


@dataclass(frozen=True)
class CAAConfig:
    layers: tuple[int, ...] = field(default=(), metadata={"help": "edited layers (0-based blocks)"})
    multiplier: float = field(default=1.0, metadata={"help": "scale of the added mean-difference vector"})
    positions: str = field(default="from_prompt_end", metadata={"help": POSITIONS_HELP})

    def __post_init__(self):
        layers = distinct_layers(self.layers, "CAA")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "multiplier", check_number(self.multiplier, "CAA multiplier"))
        check_mode(self.positions, "CAA positions")


def fit_caa(pos: Tensor, neg: Tensor, layers: Sequence[int], multiplier: float) -> CAAEditor:
    """``v_l = mean_i pos[i, l] - mean_i neg[i, l]`` for each of ``layers``, from ``[N, n_layers, d_model]``.

    ``pos``/``neg`` are the aligned true/false answer tokens of
    :meth:`hpr.activations.AnswerActivations.token_pairs` (so ``v_l`` is also the mean pairwise difference).
    """
    if pos.ndim != 3 or pos.shape != neg.shape or len(pos) == 0:
        raise ValueError(
            f"pos and neg must both be [N, n_layers, d_model] with N > 0, got {tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    n_layers = pos.shape[1]
    check_layers_in_range("CAA", layers, n_layers)
    chunk = 256  # pos/neg may be Rows: summed block by block in float64 (256 rows: ~35 MB on a 30x576 model)
    total = torch.zeros(pos.shape[1:], dtype=torch.float64)
    for a in range(0, len(pos), chunk):
        total += (pos[a : a + chunk].double() - neg[a : a + chunk].double()).sum(0)
    diff = (total / len(pos)).float()  # [layers, d_model]
    return CAAEditor.from_vectors({layer: diff[layer] for layer in layers}, multiplier, n_layers)


@register
class CAAEditor(Editor):
    method = "caa"
    config_cls = CAAConfig
    strength = "multiplier"

    @classmethod
    def from_vectors(cls, vectors: Mapping[int, Tensor], multiplier: float, n_layers: int) -> CAAEditor:
        """Build from per-layer steering vectors ``[d_model]`` (used as given, not normalised)."""
        shapes = {tuple(v.shape) for v in vectors.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"CAA needs at least one vector, all 1-D of length d_model; got shapes {shapes}")
        tensors = {f"layer{layer}.vector": v.detach().float().cpu().clone() for layer, v in vectors.items()}
        d_model = next(iter(shapes))[0]
        return cls(CAAConfig(layers=tuple(sorted(vectors)), multiplier=multiplier), tensors, d_model, n_layers)

    def expected_shapes(self) -> dict[str, Shape]:
        """One steering vector ``[d_model]`` per layer."""
        return {f"layer{layer}.vector": (self.d_model,) for layer in self.config.layers}

    def with_layers(self, layers: Sequence[int]) -> CAAEditor:
        """The same vectors at a subset of the layers (e.g. the single layer CAA steers at)."""
        missing = sorted(set(layers) - set(self.config.layers))
        if missing:
            raise ValueError(f"CAA editor has no vectors for layers {missing}; it has {list(self.config.layers)}")
        config = dataclasses.replace(self.config, layers=tuple(sorted(layers)))
        tensors = {f"layer{layer}.vector": self.tensors[f"layer{layer}.vector"] for layer in config.layers}
        return self._derived(config, tensors, self.d_model, self.n_layers)

    def shift(self, layer: int) -> Tensor:
        """``multiplier * v_layer`` ``[d_model]`` (float32)."""
        key = f"layer{layer}.vector"
        if key not in self.tensors:
            raise ValueError(f"CAA editor state is missing tensor {key!r}")
        return self.config.multiplier * self.tensors[key].float()

    def edit(self, layer: int, x: Tensor) -> Tensor:
        """``x [..., d_model]`` of ``layer`` after the edit: ``x + multiplier * v_layer``."""
        return (x.float() + self.shift(layer).to(x.device)).to(x.dtype)

    def hooks(self, model) -> list[Hook]:
        check_layers_in_range("CAA", self.config.layers, model.cfg.n_layers)
        device = model.cfg.device

        def make(layer: int):
            shift = self.shift(layer).to(device)  # built once, before any hook attaches

            def hook(x, hook):
                return (x.float() + shift.to(x.device)).to(x.dtype)

            return hook

        return [(resid_post_hook(layer), make(layer)) for layer in self.config.layers]


# ------------------------------------------------------------------------------------------------ in a run

CAA_LAYERS = ("single", "hpr_layers")


@dataclass(frozen=True)
class CAASettings:
    positions: str = field(
        default="from_prompt_end",
        metadata={"help": "positions edited (hpr.positions; default: from the prompt's end on, as CAA)"},
    )
    layers: str = field(
        default="single",
        metadata={
            "help": "single (one of HPR's layers, chosen on val, as CAA) | hpr_layers (all of them at once)",
            "choices": CAA_LAYERS,
        },
    )
    multipliers: tuple[float, ...] = field(
        default=(0.5, 1.0, 2.0, 4.0, 8.0, 16.0), metadata={"help": "multipliers tried on val (best MC1)"}
    )

    def __post_init__(self):
        check_mode(self.positions, "caa.positions")
        if self.layers not in CAA_LAYERS:
            raise ValueError(f"caa.layers must be 'single' or 'hpr_layers', got {self.layers!r}")
        if not self.multipliers:
            raise ValueError("caa.multipliers is empty: give at least one value")
        object.__setattr__(self, "multipliers", tuple(check_number(m, "caa.multipliers") for m in self.multipliers))


def fit_step(fit: FitContext) -> None:
    if fit.done("caa"):
        return
    settings: CAASettings = fit.settings["caa"]
    pos, neg, _ = fit.train_token_pairs()
    layers = fit.layers
    caa = fit_caa(pos, neg, layers, 1.0).with_positions(settings.positions)
    del pos, neg  # the train split (GBs on a real model) is freed before the validation sweeps
    if settings.layers == "single":  # CAA steers at one layer, found by a layer sweep at multiplier 1
        caa = fit.sweep(
            "caa",
            [({"layer": layer, "multiplier": 1.0}, caa.with_layers((layer,))) for layer in layers],
            {"candidate_layers": layers},
            record="caa_layer_sweep",
        )
    best = fit.sweep(
        "caa",
        [({"multiplier": m}, caa.with_strength(m)) for m in settings.multipliers],
        {"layers": list(caa.config.layers)},
    )
    fit.save("caa", best)


register_method(
    Method(
        name="caa",
        summary="Contrastive Activation Addition: the mean true-minus-false residual, at one layer",
        labels=("caa",),
        colours={"caa": "#009E73"},
        order=20,
        fit=fit_step,
        settings=CAASettings,
        flat_settings={"caa_positions": "positions", "caa_layers": "layers", "caa_multipliers": "multipliers"},
        absent_means={"positions": "all", "layers": "hpr_layers"},
    )
)
