"""Additive steering baselines: ITI (per-head shifts at ``attn.hook_z``) and CAA (one residual vector).

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

CAA, Contrastive Activation Addition / mean-difference steering (Rimsky et al., ACL 2024). Per layer l:
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
- option: ``caa_layers="hpr_layers"`` adds the vectors at all of HPR's layers at once.

Both: math in float32, result cast back to the activation's dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from hpr.activations import gather_continuations
from hpr.data.prompts import PromptFormat
from hpr.data.schema import MCQuestion
from hpr.editors.base import Editor, Hook, distinct_layers, register
from hpr.encoding import encode_all
from hpr.models import head_z_hook, resid_post_hook
from hpr.positions import HELP as POSITIONS_HELP
from hpr.positions import check_mode

Head = tuple[int, int]
HeadActs = tuple[Tensor, Tensor]  # z [N, n_layers, n_heads, d_head], is_true [N]

# alpha values compared in the HPR paper (15 is ITI's own default).
ITI_PRESETS: dict[str, float] = {"iti15": 15.0, "iti200": 200.0}
# Where ITI's probe, direction and std features are read: the last token of each (question, answer), as
# honest_llama, or every answer token (this workbench's earlier variant, kept for comparison).
ITI_FEATURES = ("last_token", "answer_tokens")


# --------------------------------------------------------------------------------------------------- ITI


@dataclass(frozen=True)
class ITIConfig:
    heads: tuple[Head, ...] = field(default=(), metadata={"help": "edited heads as (layer, head), 0-based"})
    alpha: float = field(default=15.0, metadata={"help": "shift strength in units of the head's std"})
    positions: str = field(default="answer", metadata={"help": POSITIONS_HELP})

    def __post_init__(self):
        # JSON round trips give lists of lists; normalise so equality and hashing work.
        heads = []
        for head in self.heads:
            if len(head) != 2 or any(int(i) < 0 for i in head):
                raise ValueError(f"ITI heads must be (layer, head) pairs of non-negative ints, got {head!r}")
            heads.append((int(head[0]), int(head[1])))
        if len(set(heads)) != len(heads):
            raise ValueError(f"ITI heads contain duplicates: {heads}")
        object.__setattr__(self, "heads", tuple(heads))
        object.__setattr__(self, "alpha", float(self.alpha))
        check_mode(self.positions, "ITI positions")


@torch.inference_mode()
def answer_head_activations(model, questions: Sequence[MCQuestion], fmt: PromptFormat,
                            batch_size: int = 16, progress: bool = False,
                            features: str = "last_token") -> HeadActs:
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
    labels = torch.cat([torch.full((n,), c.is_true, dtype=torch.bool) for n, c in zip(rows, choices)])
    return z, labels


def _check_head_acts(acts: HeadActs, name: str, both_classes: bool) -> tuple[Tensor, Tensor]:
    z, is_true = acts
    if z.ndim != 4 or is_true.ndim != 1 or len(z) != len(is_true) or len(z) == 0:
        raise ValueError(f"{name}: expected z [N, n_layers, n_heads, d_head] and is_true [N] with N > 0, "
                         f"got {tuple(z.shape)} and {tuple(is_true.shape)}")
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
        raise ValueError(f"train and val head activations differ in shape: {tuple(z_tr.shape[1:])} "
                         f"vs {tuple(z_va.shape[1:])}")
    n_layers, n_heads = z_tr.shape[1:3]
    y_tr_np, y_va_np = y_tr.numpy(), y_va.numpy()
    acc = np.zeros((n_layers, n_heads))
    # One probe is a small problem: BLAS/OpenMP threads cost more than they save (measured 2-4x slower).
    with threadpool_limits(1), tqdm(total=n_layers * n_heads, desc="ITI head probes", disable=not progress,
                                    unit="head") as bar:
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
    sums, counts = 0.0, 0.0
    for z, is_true in parts:
        onehot = torch.stack([is_true.bool(), ~is_true.bool()], dim=1).float()  # [N, 2]: true, false
        for a in range(0, len(z), 4096):  # z may be float16 and GBs: cast block by block
            sums = sums + onehot[a : a + 4096].T @ z[a : a + 4096].float().flatten(1)  # [2, layers*heads*d_head]
        counts = counts + onehot.sum(0)
    if not (counts > 0).all():
        raise ValueError("mass-mean directions need both true and false answer tokens")
    means = sums / counts[:, None]
    diff = (means[0] - means[1]).view(parts[0][0].shape[1:])
    return diff / diff.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def fit_iti(train_heads: HeadActs, val_heads: HeadActs, alpha: float, k: int = 48,
            d_model: int | None = None, progress: bool = False) -> tuple[ITIEditor, np.ndarray]:
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
    integer_tensors = frozenset({"head_shape"})

    @classmethod
    def from_heads(cls, directions: Mapping[Head, Tensor], sigmas: Mapping[Head, float], alpha: float,
                   n_layers: int, n_heads: int, d_model: int | None = None) -> ITIEditor:
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

    def with_alpha(self, alpha: float) -> ITIEditor:
        """The same fitted heads with another alpha (e.g. the values of :data:`ITI_PRESETS`)."""
        return self._derived(dataclasses.replace(self.config, alpha=alpha), self.tensors, self.d_model, self.n_layers)

    @property
    def head_shape(self) -> tuple[int, int]:
        """``(n_heads, d_head)`` of the model the editor was fitted on."""
        if "head_shape" not in self.tensors:
            raise ValueError("ITI editor state has no 'head_shape' tensor (n_heads, d_head)")
        n_heads, d_head = (int(x) for x in self.tensors["head_shape"])
        return n_heads, d_head

    def check_model(self, model) -> None:
        # The edit lives on hook_z, so n_layers, n_heads and d_head are what must match (d_model need not).
        n_heads, d_head = self.head_shape
        ours = (self.n_layers, n_heads, d_head)
        theirs = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
        if ours != theirs:
            raise ValueError(
                f"iti editor was fitted on a model with n_layers={ours[0]}, n_heads={ours[1]}, d_head={ours[2]}; "
                f"this model has n_layers={theirs[0]}, n_heads={theirs[1]}, d_head={theirs[2]}. "
                f"Fit a new editor for this model.")

    def shifts(self, layer: int) -> tuple[Tensor, Tensor]:
        """Edited head indices ``[k]`` of ``layer`` and their shifts ``alpha * sigma * theta`` ``[k, d_head]``.

        Shifts are float32; they are added in float32 and the sum cast back to the activation's dtype.
        """
        heads = [h for l, h in self.config.heads if l == layer]
        missing = [f"L{layer}.H{h}.{t}" for h in heads for t in ("direction", "sigma")
                   if f"L{layer}.H{h}.{t}" not in self.tensors]
        if missing:
            raise ValueError(f"ITI editor state is missing tensors {missing}")
        shift = [self.config.alpha * self.tensors[f"L{layer}.H{h}.sigma"].float()
                 * self.tensors[f"L{layer}.H{h}.direction"].float() for h in heads]
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


# --------------------------------------------------------------------------------------------------- CAA


@dataclass(frozen=True)
class CAAConfig:
    layers: tuple[int, ...] = field(default=(), metadata={"help": "edited layers (0-based blocks)"})
    multiplier: float = field(default=1.0, metadata={"help": "scale of the added mean-difference vector"})
    positions: str = field(default="from_prompt_end", metadata={"help": POSITIONS_HELP})

    def __post_init__(self):
        layers = distinct_layers(self.layers, "CAA")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "multiplier", float(self.multiplier))
        check_mode(self.positions, "CAA positions")


def fit_caa(pos: Tensor, neg: Tensor, layers: Sequence[int], multiplier: float) -> CAAEditor:
    """``v_l = mean_i pos[i, l] - mean_i neg[i, l]`` for each of ``layers``, from ``[N, n_layers, d_model]``.

    ``pos``/``neg`` are the aligned true/false answer tokens of
    :meth:`hpr.activations.AnswerActivations.pairs` (so ``v_l`` is also the mean pairwise difference).
    """
    if pos.ndim != 3 or pos.shape != neg.shape or len(pos) == 0:
        raise ValueError(f"pos and neg must both be [N, n_layers, d_model] with N > 0, "
                         f"got {tuple(pos.shape)} and {tuple(neg.shape)}")
    n_layers = pos.shape[1]
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"CAA layers {bad} out of range for {n_layers} layers")
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

    @classmethod
    def from_vectors(cls, vectors: Mapping[int, Tensor], multiplier: float, n_layers: int) -> CAAEditor:
        """Build from per-layer steering vectors ``[d_model]`` (used as given, not normalised)."""
        shapes = {tuple(v.shape) for v in vectors.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"CAA needs at least one vector, all 1-D of length d_model; got shapes {shapes}")
        tensors = {f"layer{layer}.vector": v.detach().float().cpu().clone() for layer, v in vectors.items()}
        d_model = next(iter(shapes))[0]
        return cls(CAAConfig(layers=tuple(sorted(vectors)), multiplier=multiplier), tensors, d_model, n_layers)

    def with_multiplier(self, multiplier: float) -> CAAEditor:
        """The same vectors with another multiplier."""
        config = dataclasses.replace(self.config, multiplier=multiplier)
        return self._derived(config, self.tensors, self.d_model, self.n_layers)

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
        bad = [layer for layer in self.config.layers if layer >= model.cfg.n_layers]
        if bad:
            raise ValueError(f"CAA layers {bad} out of range for a {model.cfg.n_layers}-layer model")
        device = model.cfg.device

        def make(layer: int):
            shift = self.shift(layer).to(device)  # built once, before any hook attaches

            def hook(x, hook):
                return (x.float() + shift.to(x.device)).to(x.dtype)
            return hook

        return [(resid_post_hook(layer), make(layer)) for layer in self.config.layers]
