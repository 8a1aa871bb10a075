"""ITI: additive per-head shifts at ``attn.hook_z`` along probe directions (CAA is :mod:`hpr.editors.caa`).

ITI, Inference-Time Intervention (Li et al., NeurIPS 2023; ``likenneth/honest_llama``). Per head (l, h):
a logistic-regression probe on the head output ``z`` ranks the heads by validation accuracy, the top K
(K = 48) are edited. ``theta`` = unit mass-mean shift ``mean(z | true) - mean(z | false)`` (train + val),
``sigma`` = std of the train ``z . theta``. Features: ``z`` at the last token of each (question, MC2
answer), as honest_llama's ``tqa_mc2`` bank. Edit ``z[:, t, h] <- z[:, t, h] + alpha * sigma * theta`` at
the positions ``positions`` selects (:mod:`hpr.positions`); the default ``answer`` is the legacy
honest_llama semantics: in MC scoring the answer tokens (its scorer shifts from the answer on), in
generation the newest position of each pass.

ITI, deliberate differences from the released code:
- features are read in the run's scoring prompt (6-shot primer, ``Q: ... A:``), not a bare ``Q: ... A: ...``;
- sigma comes from the train features, not from the ``tqa_gen_end_q`` bank (which includes the test fold);
- one train/val/test split by question instead of 2-fold cross-validation;
- options: ``features="answer_tokens"`` (every answer token a feature row) and ``positions="all"`` (every
  position, as the "baked-in" honest_* models) give this workbench's earlier ITI, for comparison.

Math in float32, result cast back to the activation's dtype.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from hpr.activations import gather_continuations
from hpr.data.prompts import PromptFormat
from hpr.data.schema import MCQuestion
from hpr.editors.base import Editor, Hook, Shape, check_number, recorded_head_shape, register, whole_numbers
from hpr.editors.registry import FitContext, Method, register_method
from hpr.encoding import encode_all
from hpr.models import head_z_hook
from hpr.positions import HELP as POSITIONS_HELP
from hpr.positions import check_mode

Head = tuple[int, int]
HeadActs = tuple[Tensor, Tensor]  # z [N, n_layers, n_heads, d_head], is_true [N]

# alpha values compared in the HPR paper (15 is ITI's own default).
ITI_PRESETS: dict[str, float] = {"iti15": 15.0, "iti200": 200.0}
# Where ITI's probe, direction and std features are read: the last token of each (question, answer), as
# honest_llama, or every answer token (this workbench's earlier variant, kept for comparison).
ITI_FEATURES = ("last_token", "answer_tokens")


@dataclass(frozen=True)
class ITIConfig:
    heads: tuple[Head, ...] = field(default=(), metadata={"help": "edited heads as (layer, head), 0-based"})
    alpha: float = field(default=15.0, metadata={"help": "shift strength in units of the head's std"})
    positions: str = field(default="answer", metadata={"help": POSITIONS_HELP})

    def __post_init__(self):
        # JSON round trips give lists of lists; normalise so equality and hashing work.
        heads = []
        for head in self.heads:
            pair = whole_numbers(head, "ITI heads (layer, head)")
            if len(pair) != 2:
                raise ValueError(f"ITI heads must be (layer, head) pairs of non-negative ints, got {head!r}")
            heads.append(pair)
        if len(set(heads)) != len(heads):
            raise ValueError(f"ITI heads contain duplicates: {heads}")
        object.__setattr__(self, "heads", tuple(heads))
        object.__setattr__(self, "alpha", check_number(self.alpha, "ITI alpha"))
        check_mode(self.positions, "ITI positions")


@torch.inference_mode()
def answer_head_activations(
    model,
    questions: Sequence[MCQuestion],
    fmt: PromptFormat,
    batch_size: int = 16,
    progress: bool = False,
    features: str = "last_token",
) -> HeadActs:
    """Head outputs of every MC2 choice of every question, from ``blocks.{l}.attn.hook_z``.

    ``features="last_token"`` (honest_llama's): one row per choice, at the last token of context + answer.
    ``"answer_tokens"``: one row per answer token (the tokens of :func:`hpr.activations.answer_activations`).
    Returns ``z [rows, n_layers, n_heads, d_head]`` (float16, CPU) and ``is_true [rows]`` (bool, the
    choice's label). The result is allocated once and filled from the hooks, so memory is the result plus
    one batch, whatever the number of questions.
    """
    if features not in ITI_FEATURES:
        raise ValueError(f"ITI features must be one of {ITI_FEATURES}, got {features!r}")
    choices = [c for q in questions for c in q.mc2]
    pairs = [(fmt.context(q), fmt.continuation(c.text)) for q in questions for c in q.mc2]
    if not pairs:
        raise ValueError("no MC2 choices to collect head activations from")
    names = [head_z_hook(layer) for layer in range(model.cfg.n_layers)]
    encoded = encode_all(model, pairs)
    last = features == "last_token"
    rows = [1 if last else e.n_cont for e in encoded]
    # float16, as honest_llama's own activations (its model runs in float16): every head of every answer
    # token is ~70 KB in float32 on a 30-layer model, GBs for a training split.
    z = torch.empty(sum(rows), len(names), model.cfg.n_heads, model.cfg.d_head, dtype=torch.float16)
    gather_continuations(model, encoded, names, z, batch_size, last_only=last, progress=progress)
    labels = torch.cat([torch.full((n,), c.is_true, dtype=torch.bool) for n, c in zip(rows, choices, strict=True)])
    return z, labels


def _check_head_acts(acts: HeadActs, name: str, both_classes: bool) -> tuple[Tensor, Tensor]:
    z, is_true = acts
    if z.ndim != 4 or is_true.ndim != 1 or len(z) != len(is_true) or len(z) == 0:
        raise ValueError(
            f"{name}: expected z [N, n_layers, n_heads, d_head] and is_true [N] with N > 0, "
            f"got {tuple(z.shape)} and {tuple(is_true.shape)}"
        )
    y = is_true.bool()
    if both_classes and (y.all() or not y.any()):
        raise ValueError(f"{name}: the probes need both true and false answer tokens")
    return z.detach().cpu(), y.cpu()  # never copied whole (z can be GBs); consumers cast slices to float32


def head_probe_accuracy(train: HeadActs, val: HeadActs, progress: bool = False) -> np.ndarray:
    """Validation accuracy ``[n_layers, n_heads]`` of a probe ``sigmoid(w . z + b)`` fitted per head on train.

    sklearn ``LogisticRegression(max_iter=1000, random_state=0)`` (default L2, C=1), as honest_llama.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    z_tr, y_tr = _check_head_acts(train, "train", both_classes=True)
    z_va, y_va = _check_head_acts(val, "val", both_classes=False)
    if z_tr.shape[1:] != z_va.shape[1:]:
        raise ValueError(
            f"train and val head activations differ in shape: {tuple(z_tr.shape[1:])} vs {tuple(z_va.shape[1:])}"
        )
    n_layers, n_heads = z_tr.shape[1:3]
    y_tr_np, y_va_np = y_tr.numpy(), y_va.numpy()
    acc = np.zeros((n_layers, n_heads))
    # One probe is a small problem: BLAS/OpenMP threads cost more than they save (measured 2-4x slower).
    with (
        threadpool_limits(1),
        tqdm(total=n_layers * n_heads, desc="ITI head probes", disable=not progress, unit="head") as bar,
    ):
        for layer in range(n_layers):
            for head in range(n_heads):
                bar.update()
                x_tr, x_va = (z[:, layer, head].float().numpy() for z in (z_tr, z_va))  # one head's copy
                probe = LogisticRegression(max_iter=1000, random_state=0).fit(x_tr, y_tr_np)
                acc[layer, head] = probe.score(x_va, y_va_np)
    return acc


def top_k_heads(val_accuracy: np.ndarray, k: int) -> tuple[Head, ...]:
    """The k heads with the highest accuracy (ties: lower (layer, head) first), sorted ascending.

    k is capped at ``n_layers * n_heads``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    acc = np.asarray(val_accuracy)
    ranked = sorted(np.ndindex(*acc.shape), key=lambda lh: (-acc[lh], lh))
    return tuple(sorted((int(l), int(h)) for l, h in ranked[:k]))


def mass_mean_directions(*parts: HeadActs) -> Tensor:
    """``theta = mean(z | true) - mean(z | false)`` per head over all ``(z, is_true)`` parts, unit-normalised.

    Returns ``[n_layers, n_heads, d_head]``; a head with no mean difference gets a zero vector (from_heads
    refuses it if selected). Class sums are matrix products, so no part is copied or concatenated.
    """
    sums: Tensor | float = 0.0
    counts: Tensor | float = 0.0
    for z, is_true in parts:
        onehot = torch.stack([is_true.bool(), ~is_true.bool()], dim=1).float()  # [N, 2]: true, false
        for a in range(0, len(z), 4096):  # z may be float16 and GBs: cast block by block
            sums = sums + onehot[a : a + 4096].T @ z[a : a + 4096].float().flatten(1)  # [2, layers*heads*d_head]
        counts = counts + onehot.sum(0)
    if not isinstance(counts, Tensor) or not (counts > 0).all():
        raise ValueError("mass-mean directions need both true and false answer tokens")
    means = sums / counts[:, None]
    diff = (means[0] - means[1]).view(parts[0][0].shape[1:])
    return diff / diff.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def fit_iti(
    train_heads: HeadActs,
    val_heads: HeadActs,
    alpha: float,
    k: int = 48,
    d_model: int | None = None,
    progress: bool = False,
) -> tuple[ITIEditor, np.ndarray]:
    """Fit ITI: top-k heads by val probe accuracy, mass-mean directions, train std along them.

    Each argument is ``(z [N, n_layers, n_heads, d_head], is_true [N])`` as from
    :func:`answer_head_activations`. ``theta`` uses train + val; ``sigma = std(z_train . theta)`` (ddof 0,
    as ``np.std``). ``d_model`` is only recorded in the saved config (default ``n_heads * d_head``);
    the shape check uses n_layers, n_heads and d_head. Returns the editor and the per-head val accuracy
    ``[n_layers, n_heads]``.
    """
    val_acc = head_probe_accuracy(train_heads, val_heads, progress)
    heads = top_k_heads(val_acc, k)
    z_tr, y_tr = _check_head_acts(train_heads, "train", both_classes=True)
    z_va, y_va = _check_head_acts(val_heads, "val", both_classes=False)
    theta = mass_mean_directions((z_tr, y_tr), (z_va, y_va))
    sigma = {(l, h): float((z_tr[:, l, h].float() @ theta[l, h]).std(correction=0)) for l, h in heads}
    _, n_layers, n_heads, _ = z_tr.shape
    editor = ITIEditor.from_heads({lh: theta[lh] for lh in heads}, sigma, alpha, n_layers, n_heads, d_model)
    return editor, val_acc


def _add_to_heads(z: Tensor, idx: Tensor, shift: Tensor) -> Tensor:
    """``z [..., n_heads, d_head]`` with ``shift [k, d_head]`` added to heads ``idx [k]``; other heads copied."""
    out = z.clone()  # heads not in idx stay bit-identical (adding 0.0 would turn -0.0 into +0.0)
    out[..., idx, :] = (z[..., idx, :].float() + shift.to(z.device)).to(z.dtype)
    return out


@register
class ITIEditor(Editor):
    method = "iti"
    config_cls = ITIConfig
    strength = "alpha"
    integer_tensors = frozenset({"head_shape"})
    selection = "heads"

    def edited_layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.config.heads}))

    def expected_shapes(self) -> dict[str, Shape]:
        """``head_shape`` ``[2]`` (n_heads, d_head), and per head a unit direction ``[d_head]`` and its std ``[]``."""
        shape = self.tensors.get("head_shape")
        d_head = int(shape[1]) if shape is not None and tuple(shape.shape) == (2,) else None
        shapes: dict[str, Shape] = {"head_shape": (2,)}
        for layer, head in self.config.heads:
            shapes[f"L{layer}.H{head}.direction"] = (d_head,)
            shapes[f"L{layer}.H{head}.sigma"] = ()
        return shapes

    @classmethod
    def from_heads(
        cls,
        directions: Mapping[Head, Tensor],
        sigmas: Mapping[Head, float],
        alpha: float,
        n_layers: int,
        n_heads: int,
        d_model: int | None = None,
    ) -> ITIEditor:
        """Build from per-head directions (normalised here) and stds. ``d_model`` defaults to n_heads * d_head."""
        if not directions:
            raise ValueError("ITI needs at least one head")
        if set(directions) != set(sigmas):
            raise ValueError(f"directions and sigmas name different heads: {sorted(directions)} vs {sorted(sigmas)}")
        heads = tuple(sorted(directions))
        d_heads = {tuple(directions[lh].shape) for lh in heads}
        if len(d_heads) > 1 or any(len(s) != 1 for s in d_heads):
            raise ValueError(f"ITI directions must all be 1-D of the same length d_head, got shapes {d_heads}")
        d_head = d_heads.pop()[0]
        tensors = {"head_shape": torch.tensor([n_heads, d_head])}
        for layer, head in heads:
            theta = directions[(layer, head)].detach().float().cpu()
            norm = theta.norm()
            if not torch.isfinite(norm) or norm == 0:
                raise ValueError(f"ITI direction of head L{layer}.H{head} has norm {norm.item()}; cannot normalise")
            tensors[f"L{layer}.H{head}.direction"] = theta / norm
            tensors[f"L{layer}.H{head}.sigma"] = torch.tensor(float(sigmas[(layer, head)]))
        return cls(ITIConfig(heads=heads, alpha=alpha), tensors, d_model or n_heads * d_head, n_layers)

    @property
    def head_shape(self) -> tuple[int, int]:
        """``(n_heads, d_head)`` of the model the editor was fitted on."""
        return recorded_head_shape(self)

    def check_model(self, model) -> None:
        # The edit lives on hook_z, so n_layers, n_heads and d_head are what must match (d_model need not).
        n_heads, d_head = self.head_shape
        ours = (self.n_layers, n_heads, d_head)
        theirs = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
        if ours != theirs:
            raise ValueError(
                f"iti editor was fitted on a model with n_layers={ours[0]}, n_heads={ours[1]}, d_head={ours[2]}; "
                f"this model has n_layers={theirs[0]}, n_heads={theirs[1]}, d_head={theirs[2]}. "
                f"Fit a new editor for this model."
            )

    def shifts(self, layer: int) -> tuple[Tensor, Tensor]:
        """Edited head indices ``[k]`` of ``layer`` and their shifts ``alpha * sigma * theta`` ``[k, d_head]``.

        Shifts are float32; they are added in float32 and the sum cast back to the activation's dtype.
        """
        heads = [h for l, h in self.config.heads if l == layer]
        missing = [
            f"L{layer}.H{h}.{t}"
            for h in heads
            for t in ("direction", "sigma")
            if f"L{layer}.H{h}.{t}" not in self.tensors
        ]
        if missing:
            raise ValueError(f"ITI editor state is missing tensors {missing}")
        shift = [
            self.config.alpha
            * self.tensors[f"L{layer}.H{h}.sigma"].float()
            * self.tensors[f"L{layer}.H{h}.direction"].float()
            for h in heads
        ]
        d_head = self.head_shape[1]
        return torch.tensor(heads, dtype=torch.long), torch.stack(shift) if shift else torch.zeros(0, d_head)

    def edit(self, layer: int, z: Tensor) -> Tensor:
        """``z [..., n_heads, d_head]`` of ``layer`` after the edit: ``z[..., h, :] + alpha * sigma_h * theta_h``."""
        idx, shift = self.shifts(layer)
        return _add_to_heads(z, idx.to(z.device), shift)

    def hooks(self, model) -> list[Hook]:
        n_heads = self.head_shape[0]
        bad = [lh for lh in self.config.heads if lh[0] >= self.n_layers or lh[1] >= n_heads]
        if bad:
            raise ValueError(f"ITI heads {bad} out of range for {self.n_layers} layers x {n_heads} heads")
        device = model.cfg.device

        def make(layer: int):
            idx, shift = (t.to(device) for t in self.shifts(layer))  # built once, before any hook attaches

            def hook(z, hook):
                return _add_to_heads(z, idx.to(z.device), shift)

            return hook

        layers = sorted({layer for layer, _ in self.config.heads})
        return [(head_z_hook(layer), make(layer)) for layer in layers]


# ------------------------------------------------------------------------------------------------ in a run


@dataclass(frozen=True)
class ITISettings:
    k: int = field(default=48, metadata={"help": "heads edited: the top K by validation probe accuracy"})
    positions: str = field(
        default="answer",
        metadata={"help": "positions edited (hpr.positions; default: the answer tokens, as honest_llama's scorer)"},
    )
    features: str = field(
        default="last_token",
        metadata={
            "help": "probe/direction/std features: last_token (honest_llama) | answer_tokens (every answer token)",
            "choices": ITI_FEATURES,
        },
    )

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"iti.k must be a whole number >= 1, got {self.k!r}")
        check_mode(self.positions, "iti.positions")
        if self.features not in ITI_FEATURES:
            raise ValueError(f"iti.features must be one of {ITI_FEATURES}, got {self.features!r}")


ALPHA_LABEL = r"iti(\d+(?:\.\d+)?)"


def iti_alpha(label: str) -> float | None:
    """``iti15`` -> 15.0, ``iti2.5`` -> 2.5: ITI at any alpha, named by it; None for other labels."""
    match = re.fullmatch(ALPHA_LABEL, label)
    return float(match.group(1)) if match else None


def fit_step(fit: FitContext) -> None:
    """One fit (heads, directions, stds) for every alpha asked for, the two presets always."""
    settings: ITISettings = fit.settings["iti"]
    alphas = {label: alpha for label in set(fit.labels) | set(ITI_PRESETS) if (alpha := iti_alpha(label)) is not None}
    if all(fit.done(label) for label in alphas):
        return
    if fit.done("iti15"):
        from hpr.editors.base import load_editor

        iti = load_editor(fit.editors_dir / "iti15")
        assert isinstance(iti, ITIEditor)
    else:
        heads = {
            name: answer_head_activations(
                fit.model, fit.parts[name], fit.fmt, fit.batch_size, fit.progress, settings.features
            )
            for name in ("train", "val")
        }
        iti, head_acc = fit_iti(
            heads["train"],
            heads["val"],
            ITI_PRESETS["iti15"],
            k=settings.k,
            d_model=fit.model.cfg.d_model,
            progress=fit.progress,
        )
        iti = iti.with_positions(settings.positions)
        fit.write_json("iti_heads.json", {"val_accuracy": head_acc.tolist(), "heads": list(iti.config.heads)})
    for label, alpha in sorted(alphas.items()):
        if not fit.done(label):
            fit.save(label, iti.with_strength(alpha))


register_method(
    Method(
        name="iti",
        summary="Inference-Time Intervention: per-head shifts along probe directions (alpha 15 and 200)",
        labels=tuple(ITI_PRESETS),
        colours={"iti15": "#E69F00", "iti200": "#D55E00"},
        order=10,
        fit=fit_step,
        settings=ITISettings,
        label_pattern=ALPHA_LABEL,
        flat_settings={"iti_k": "k", "iti_positions": "positions", "iti_features": "features"},
        absent_means={"positions": "all", "features": "answer_tokens"},
    )
)
