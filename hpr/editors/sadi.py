"""SADI: Semantics-Adaptive Dynamic Intervention (Wang, Yang & Peng, ICLR 2025; ``weixuan-wang123/SADI``).

Fit: over contrastive pairs (a question with a true and with a false answer), the difference of the
activations at the last token, ``D = A(q + a_true) - A(q + a_false)``, averaged over pairs. The mask ``M``
is 1 on the ``k`` elements with the largest signed mean difference (over all layers) and 0 elsewhere.
Elements, by ``level``:

- ``heads``: per-head outputs before W_O (``blocks.{l}.attn.hook_z``); a head's score is the mean of its
  ``d_head`` differences and the whole head vector is scaled (SADI-HEAD, the paper's best);
- ``hidden``: MLP outputs, one element per ``d_model`` unit (``blocks.{l}.hook_mlp_out``);
- ``neurons``: MLP hidden activations (``blocks.{l}.mlp.hook_post``, ``act(pre)`` or ``act(gate) * up``
  for gated MLPs; scaling an element there equals scaling ``act(gate)`` in the code).

Edit, the input's own activation scaled on the mask:
``mode="additive"`` (the paper): ``A' = A + delta * (M * A)``;
``mode="multiplicative"`` (the released code): ``A' = A * (1 - M) + delta * (M * A)``.

Positions (:mod:`hpr.positions`): the released code patches one position, the last prompt token, into the
forward pass over question + answer; ``positions="prompt_end"`` (the default) does the same, and in
generation edits the prefill's last token. ``all`` edits every position. The grid of (k, delta) is chosen
on the validation split, never on test (the released script reports the best grid point on test data).
Deliberate difference: the run's default grid (k in 1, 2, 4, 8; delta in 0.5, 1, 2, 5) is narrower and
cheaper than the released script's (heads: k up to 10, delta 5 to 80; :data:`RELEASED_GRIDS`), which
``hpr reproduce --sadi-grid released`` searches instead (96 validation runs for heads).
Math in float32, cast back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hpr.activations import last_token_activations
from hpr.data.prompts import PromptFormat
from hpr.data.schema import MCQuestion
from hpr.editors.base import Editor, Hook, Shape, check_number, register, whole_numbers
from hpr.editors.registry import FitContext, Method, register_method
from hpr.positions import HELP as POSITIONS_HELP
from hpr.positions import check_mode

LEVELS = ("heads", "hidden", "neurons")
# The (k, delta) grids of the released script, per level. It reports the best point on test data; here a
# grid is searched on the validation split only.
RELEASED_GRIDS: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] = {
    "heads": ((1, 2, 4, 6, 8, 10), tuple(float(d) for d in range(5, 81, 5))),
    "neurons": ((3, 5, 10, 30, 50, 100, 200, 300, 400, 500), (10.0, 20.0, 30.0, 50.0, 70.0, 90.0)),
    "hidden": ((1, 2, *range(4, 21, 2)), tuple(float(d) for d in range(5, 81, 5))),
}
MODES = ("additive", "multiplicative")
Element = tuple[int, int]  # (layer, unit)


def level_hook(level: str, layer: int) -> str:
    return {
        "heads": f"blocks.{layer}.attn.hook_z",
        "hidden": f"blocks.{layer}.hook_mlp_out",
        "neurons": f"blocks.{layer}.mlp.hook_post",
    }[level]


def level_units(level: str, cfg) -> int:
    """Elements per layer at ``level`` for a model config: n_heads, d_model or d_mlp."""
    return {"heads": cfg.n_heads, "hidden": cfg.d_model, "neurons": cfg.d_mlp}[level]


@dataclass(frozen=True)
class SADIConfig:
    level: str = field(default="heads", metadata={"help": "heads | hidden | neurons"})
    elements: tuple[Element, ...] = field(default=(), metadata={"help": "masked elements as (layer, unit)"})
    delta: float = field(default=1.0, metadata={"help": "scale of the masked elements (0 = base model)"})
    mode: str = field(
        default="additive",
        metadata={"help": "additive (paper): A + delta*M*A; multiplicative (code): masked A times delta"},
    )
    positions: str = field(default="prompt_end", metadata={"help": POSITIONS_HELP})

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"SADI level must be one of {LEVELS}, got {self.level!r}")
        if self.mode not in MODES:
            raise ValueError(f"SADI mode must be one of {MODES}, got {self.mode!r}")
        check_mode(self.positions, "SADI positions")
        elements = []
        for e in self.elements:
            pair = whole_numbers(e, "SADI elements (layer, unit)")
            if len(pair) != 2:
                raise ValueError(f"SADI elements must be (layer, unit) pairs of non-negative ints, got {e!r}")
            elements.append(pair)
        if len(set(elements)) != len(elements):
            raise ValueError(f"SADI elements contain duplicates: {elements}")
        object.__setattr__(self, "elements", tuple(sorted(elements)))
        object.__setattr__(self, "delta", check_number(self.delta, "SADI delta"))


@torch.inference_mode()
def mean_differences(
    model, questions: Sequence[MCQuestion], fmt: PromptFormat, level: str, batch_size: int = 16, progress: bool = False
) -> Tensor:
    """Mean over (true, false) pairs of the last-token activation difference: ``[n_layers, units]``.

    For ``heads`` each head's difference is averaged over ``d_head`` (the code's head score).
    """
    if level not in LEVELS:
        raise ValueError(f"SADI level must be one of {LEVELS}, got {level!r}")
    names = [level_hook(level, layer) for layer in range(model.cfg.n_layers)]
    answers = [(q, c.text) for q in questions for c in q.mc2]
    acts = last_token_activations(
        model, [(fmt.context(q), fmt.continuation(a)) for q, a in answers], names, batch_size, progress
    )
    stacked = torch.stack([acts[n] for n in names], dim=1)  # [answers, layers, units(, d_head)]
    if level == "heads":
        stacked = stacked.mean(-1)
    index = {(q.id, c.text, c.is_true): i for i, (q, c) in enumerate((q, c) for q in questions for c in q.mc2)}
    pos, neg = [], []
    for q in questions:
        for true, false in q.true_false_pairs():
            pos.append(index[(q.id, true, True)])
            neg.append(index[(q.id, false, False)])
    if not pos:
        raise ValueError("SADI needs questions with at least one true and one false answer")
    return (stacked[torch.tensor(pos)] - stacked[torch.tensor(neg)]).mean(0)


def top_k_elements(mean_diff: Tensor, k: int) -> tuple[Element, ...]:
    """The ``k`` (layer, unit) elements with the largest signed mean difference (ties: lower index first)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    flat = mean_diff.flatten()
    k = min(k, len(flat))
    order = sorted(range(len(flat)), key=lambda i: (-float(flat[i]), i))[:k]
    units = mean_diff.shape[1]
    return tuple(sorted((i // units, i % units) for i in order))


def fit_sadi(
    mean_diff: Tensor, k: int, delta: float, level: str = "heads", mode: str = "additive", d_model: int | None = None
) -> SADIEditor:
    """The SADI editor of the top-``k`` elements of ``mean_diff [n_layers, units]``."""
    n_layers, units = mean_diff.shape
    config = SADIConfig(level=level, elements=top_k_elements(mean_diff, k), delta=delta, mode=mode)
    tensors = {"mean_diff": mean_diff.detach().float().cpu().clone(), "units": torch.tensor(units)}
    return SADIEditor(config, tensors, d_model or 0, n_layers)


def scale_masked(a: Tensor, units: Tensor, delta: float, mode: str, level: str) -> Tensor:
    """``a`` with elements ``units`` of its unit axis scaled (float32 math, input dtype out).

    The unit axis is the last one, except for ``heads`` (``[..., n_heads, d_head]``).
    """
    out = a.clone()  # unmasked elements stay bit-identical
    factor = 1.0 + delta if mode == "additive" else delta
    if level == "heads":
        out[..., units, :] = (a[..., units, :].float() * factor).to(a.dtype)
    else:
        out[..., units] = (a[..., units].float() * factor).to(a.dtype)
    return out


@register
class SADIEditor(Editor):
    method = "sadi"
    config_cls = SADIConfig
    strength = "delta"
    integer_tensors = frozenset({"units"})
    selection = "elements"

    def edited_layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.config.elements}))

    def expected_shapes(self) -> dict[str, Shape]:
        """``units`` ``[]`` (elements per layer) and the ``mean_diff`` ``[n_layers, units]`` it ranked."""
        units = self.tensors.get("units")
        width = int(units) if units is not None and units.ndim == 0 else None
        return {"units": (), "mean_diff": (self.n_layers, width)}

    def check_model(self, model) -> None:
        units = int(self.tensors["units"]) if "units" in self.tensors else None
        theirs = (model.cfg.n_layers, level_units(self.config.level, model.cfg))
        if (self.n_layers, units) != theirs:
            raise ValueError(
                f"sadi editor ({self.config.level}) was fitted on a model with n_layers={self.n_layers} and "
                f"{units} units per layer; this model has n_layers={theirs[0]} and {theirs[1]}. "
                f"Fit a new editor for this model."
            )

    def edit(self, layer: int, a: Tensor) -> Tensor:
        units = [u for l, u in self.config.elements if l == layer]
        if not units or self.config.delta == 0 and self.config.mode == "additive":
            return a
        return scale_masked(
            a, torch.tensor(units, device=a.device), self.config.delta, self.config.mode, self.config.level
        )

    def hooks(self, model) -> list[Hook]:
        n_units = level_units(self.config.level, model.cfg)
        bad = [e for e in self.config.elements if e[0] >= model.cfg.n_layers or e[1] >= n_units]
        if bad:
            raise ValueError(f"SADI elements {bad} out of range for {model.cfg.n_layers} layers x {n_units} units")

        def make(layer: int):
            def hook(a, hook):
                return self.edit(layer, a)

            return hook

        layers = sorted({layer for layer, _ in self.config.elements})
        return [(level_hook(self.config.level, layer), make(layer)) for layer in layers]


# ------------------------------------------------------------------------------------------------ in a run

GRIDS = ("small", "released")


@dataclass(frozen=True)
class SADISettings:
    level: str = field(default="heads", metadata={"help": "which elements the mask selects", "choices": LEVELS})
    mode: str = field(
        default="additive",
        metadata={
            "help": "additive: A + delta*M*A (paper) | multiplicative: masked A times delta (released code)",
            "choices": MODES,
        },
    )
    k: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata={"help": "mask sizes tried on val"})
    deltas: tuple[float, ...] = field(default=(0.5, 1.0, 2.0, 5.0), metadata={"help": "deltas tried on val (best MC1)"})
    grid: str = field(
        default="small",
        metadata={
            "help": "(k, delta) tried on val: small (k x deltas) | released (the released script's grid for the level)",
            "choices": GRIDS,
        },
    )
    positions: str = field(
        default="prompt_end",
        metadata={"help": "positions edited (hpr.positions; default: the prompt's last token, as the released code)"},
    )

    def __post_init__(self):
        if self.level not in LEVELS or self.mode not in MODES:
            raise ValueError(
                f"sadi.level must be one of {LEVELS} and sadi.mode one of {MODES}, got {self.level!r} and {self.mode!r}"
            )
        if self.grid not in GRIDS:
            raise ValueError(f"sadi.grid must be 'small' or 'released', got {self.grid!r}")
        for name in ("k", "deltas"):
            if not getattr(self, name):
                raise ValueError(f"sadi.{name} is empty: give at least one value")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.k):
            raise ValueError(f"sadi.k must be whole numbers >= 1, got {self.k!r}")
        object.__setattr__(self, "k", tuple(self.k))
        object.__setattr__(self, "deltas", tuple(check_number(d, "sadi.deltas") for d in self.deltas))
        check_mode(self.positions, "sadi.positions")


def fit_step(fit: FitContext) -> None:
    if fit.done("sadi"):
        return
    settings: SADISettings = fit.settings["sadi"]
    diff = mean_differences(fit.model, fit.parts["train"], fit.fmt, settings.level, fit.batch_size, fit.progress)
    ks, deltas = RELEASED_GRIDS[settings.level] if settings.grid == "released" else (settings.k, settings.deltas)
    candidates = [
        (
            {"k": k, "delta": delta},
            fit_sadi(diff, k, delta, settings.level, settings.mode, fit.model.cfg.d_model).with_positions(
                settings.positions
            ),
        )
        for k in sorted({min(k, diff.numel()) for k in ks})
        for delta in deltas
    ]
    fit.save("sadi", fit.sweep("sadi", candidates, {"level": settings.level, "mode": settings.mode}))


register_method(
    Method(
        name="sadi",
        summary="Semantics-Adaptive Dynamic Intervention: scale the elements most moved by truth",
        labels=("sadi",),
        colours={"sadi": "#999999"},
        order=50,
        fit=fit_step,
        settings=SADISettings,
        flat_settings={
            "sadi_level": "level",
            "sadi_mode": "mode",
            "sadi_k": "k",
            "sadi_deltas": "deltas",
            "sadi_grid": "grid",
            "sadi_positions": "positions",
        },
        absent_means={"positions": "all"},
    )
)
