"""HPR: Householder Pseudo-Rotation (Pham & Nguyen, EMNLP 2024), and its "no angle" ablation.

Per layer l: a bias-free probe ``w_l`` (``p = sigmoid(w_l . h)``, 1 = positive) and an angle network
``g_l`` (d -> d/2 -> d/4 -> d/8 -> 1, GELU between, ``theta = pi * sigmoid(g_l(h))``).
Training, all layers in one batched pass: ``mean_l [BCE(p, y) + MSE(theta, t)]`` with ``t = 0`` for
positive tokens and ``t = angle(neg, aligned pos)`` for negative tokens. AdamW lr 5e-4, 5 epochs, batch 16
token pairs, 5 % warmup then linear decay, weight decay 0, global grad clip 1.0 (the official defaults).
The schedule is the official code's (HF's default linear decay); the paper's text says cosine. As the
official ``load_best_model_at_end``, the epoch kept is the one with the best probe accuracy pooled over
every layer and token of the validation split (``select_epoch="best_val"``; ``"last"`` keeps the last).
Layers: the top-k (k=5) by validation probe accuracy.

Edit at ``blocks.{l}.hook_resid_post`` of each selected layer: activations with ``w . h <= 0`` are rotated
by ``theta`` towards their reflection (norm preserved, see ``hpr.ops``); ``no_angle`` uses
``theta = gamma``, the plain reflection. Math in float32, cast back. Positions (:mod:`hpr.positions`):
``all`` by default, every position of every forward pass, as the official lm-eval path that gives MC1/MC2.

Deliberate differences from the official code:
- generation: the official ``generate()`` edits only the newest position of each pass, while ``all`` also
  edits the prompt at prefill; ``positions="answer"`` gives the official generation (but then also edits
  only the answer tokens when scoring);
- training activations are read in the run's scoring prompt, not the model's chat template;
- the last layer's probe is trained on the block's output, as every other layer (the official code reads
  HF's last hidden state, which is after the final norm, and applies the probe before it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hpr import ops
from hpr.editors.base import MAX_MAGNITUDE, Editor, Shape, check_number, distinct_layers, load_editor, register
from hpr.editors.halving_mlp import (
    halving_widths,
    mlp,
    stacked_mlp,
    stacked_parameters,
    stored_depth,
    stored_parameters,
    stored_shapes,
)
from hpr.editors.registry import FitContext, Method, register_method
from hpr.editors.training import warmup_then_linear_decay
from hpr.positions import HELP as POSITIONS_HELP
from hpr.positions import check_mode


@dataclass(frozen=True)
class HPRConfig:
    layers: tuple[int, ...] = field(default=(), metadata={"help": "edited layers (0-based blocks)"})
    no_angle: bool = field(default=False, metadata={"help": "ablation: plain Householder reflection"})
    positions: str = field(default="all", metadata={"help": POSITIONS_HELP})
    # Our addition (the official code has none): the rotation angle is scaled by this factor, 0 = the unedited
    # model, 1 = as trained (for no_angle, of the reflection angle gamma). The strength axis of HPR's curves.
    angle_scale: float = field(default=1.0, metadata={"help": "scale on the rotation angle (1 = as trained)"})

    def __post_init__(self):
        layers = distinct_layers(self.layers, "HPR")
        object.__setattr__(self, "layers", layers)
        check_mode(self.positions, "HPR positions")
        check_number(self.angle_scale, "HPR angle_scale", 0.0, MAX_MAGNITUDE)


@dataclass(frozen=True)
class HPRTrainConfig:
    angle_layers: int = field(default=4, metadata={"help": "linear layers in the angle MLP, halving width"})
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate"})
    epochs: int = field(default=5, metadata={"help": "passes over the training token pairs"})
    batch_size: int = field(default=16, metadata={"help": "token pairs per step"})
    warmup: float = field(default=0.05, metadata={"help": "fraction of steps of linear warmup"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip"})
    top_k: int = field(default=5, metadata={"help": "layers edited: top-k by validation probe accuracy"})
    seed: int = field(default=0, metadata={"help": "initialisation and batch order"})
    select_epoch: str = field(
        default="best_val",
        metadata={
            "help": "best_val: the epoch with the best pooled val probe accuracy (official); last: the last epoch"
        },
    )

    def __post_init__(self):
        if self.select_epoch not in ("best_val", "last"):
            raise ValueError(f"select_epoch must be 'best_val' or 'last', got {self.select_epoch!r}")
        # epochs may be 0 (an untrained probe and angle network, for comparisons); the rest must be positive
        for name, least in (("top_k", 1), ("batch_size", 1), ("epochs", 0), ("angle_layers", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"hpr.{name} must be a whole number >= {least}, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"hpr.lr must be positive, got {self.lr!r}")


class LayerwiseHPR(nn.Module):
    """Probes and angle MLPs for ``n_layers`` layers at once: parameters are stacked on a layer axis."""

    def __init__(self, n_layers: int, d_model: int, angle_layers: int = 4):
        super().__init__()
        widths = halving_widths(d_model, angle_layers, 1)
        if min(widths[:-1]) < 1:
            raise ValueError(f"d_model={d_model} too small for {angle_layers} halving angle layers")
        self.probe = nn.Parameter(torch.empty(n_layers, d_model))
        self.weights, self.biases = stacked_parameters(n_layers, widths)
        nn.init.uniform_(self.probe, -1 / math.sqrt(d_model), 1 / math.sqrt(d_model))

    def logits(self, h: Tensor) -> Tensor:
        """``h [layers, n, d]`` -> probe logits ``[layers, n]``."""
        return torch.einsum("lnd,ld->ln", h, self.probe)

    def theta(self, h: Tensor) -> Tensor:
        """``h [layers, n, d]`` -> predicted angles ``[layers, n]`` in (0, pi)."""
        return math.pi * torch.sigmoid(stacked_mlp(h, self.weights, self.biases).squeeze(-1))


def reference_optimizer(net: nn.Module, cfg: HPRTrainConfig, total_steps: int):
    """AdamW with linear warmup over ``cfg.warmup`` of the steps, then linear decay to 0 (the official schedule)."""
    # Fused: one kernel per step over all parameters instead of ~10 passes each (the same update).
    fused = all(p.device.type in ("cpu", "cuda") for p in net.parameters()) or None
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return opt, warmup_then_linear_decay(opt, cfg.warmup, total_steps)


def fit_layerwise(
    pos: Tensor,
    neg: Tensor,
    cfg: HPRTrainConfig,
    progress: bool = False,
    score_epoch: Callable[[LayerwiseHPR], float] | None = None,
) -> LayerwiseHPR:
    """Train probes + angle MLPs for every layer jointly on aligned token pairs ``[N, layers, d]``.

    ``pos``/``neg`` are tensors or :class:`hpr.activations.Rows` (read batch by batch, never copied whole).
    With ``cfg.select_epoch == "best_val"``, ``score_epoch(net)`` (the pooled validation probe accuracy; it
    must read no training or test data) is called after each epoch and the first epoch with the highest
    score is returned, as the official trainer's ``load_best_model_at_end``.
    """
    n_layers, d = pos.shape[1:]

    def loss(net: LayerwiseHPR, p: Tensor, q: Tensor) -> Tensor:
        p, q = p.float(), q.float()
        x = torch.cat([p, q]).transpose(0, 1)  # [layers, 2B, d]
        y = torch.cat([torch.ones(len(p)), torch.zeros(len(p))]).expand(n_layers, -1)
        t = torch.cat([torch.zeros(len(p), n_layers), ops.vector_angle(q, p)]).T  # target angle per layer
        bce = nn.functional.binary_cross_entropy_with_logits(net.logits(x), y, reduction="none").mean(1)
        mse = ((net.theta(x) - t) ** 2).mean(1)
        return (bce + mse).mean()

    select = score_epoch if cfg.select_epoch == "best_val" else None
    return fit_on_pairs(
        lambda: LayerwiseHPR(n_layers, d, cfg.angle_layers), pos, neg, cfg, loss, "training HPR", progress, select
    )


def fit_on_pairs(
    make_net,
    pos,
    neg,
    cfg: HPRTrainConfig,
    loss,
    desc: str,
    progress: bool = False,
    score_epoch: Callable | None = None,
):
    """The training loop HPR and Diff share (the official code's): seeded initialisation and batch order,
    AdamW with linear warmup and decay (:func:`reference_optimizer`), gradient clipping, ``cfg.epochs`` passes
    over the aligned pairs in batches of ``cfg.batch_size``; ``loss(net, pos[idx], neg[idx])`` per batch.

    With ``score_epoch``, the net after the first epoch with the highest score is returned.
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the net's initialisation
    net = make_net()
    n = len(pos)
    total = math.ceil(n / cfg.batch_size) * cfg.epochs
    opt, sched = reference_optimizer(net, cfg, total)
    best_score, best_state = -math.inf, None
    with tqdm(total=total, desc=desc, disable=not progress, unit="step") as bar:
        for _ in range(cfg.epochs):
            for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
                batch_loss = loss(net, pos[idx], neg[idx])  # batch by batch: pos may be Rows
                opt.zero_grad(set_to_none=True)
                batch_loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                bar.update()
            if score_epoch is not None:
                with torch.no_grad():
                    score = float(score_epoch(net.eval()))
                net.train()
                if score > best_score:  # strict: ties keep the earlier epoch
                    best_score, best_state = score, {k: v.detach().clone() for k, v in net.state_dict().items()}
    if best_state is not None:
        net.load_state_dict(best_state)
    return net.eval()


@torch.no_grad()
def probe_accuracy(probe: Tensor, pos: Tensor, neg: Tensor, chunk: int = 1024) -> list[float]:
    """Token-level accuracy per layer: positives need ``w.h > 0``, negatives ``w.h <= 0`` (the edit gate).

    ``pos``/``neg``: ``[N, layers, d]`` tensors or :class:`hpr.activations.Rows`, read ``chunk`` rows at a time.
    """
    correct = torch.zeros(probe.shape[0])
    for a in range(0, len(pos), chunk):
        correct += (torch.einsum("nld,ld->nl", pos[a : a + chunk].float(), probe) > 0).float().sum(0)
    for a in range(0, len(neg), chunk):
        correct += (torch.einsum("nld,ld->nl", neg[a : a + chunk].float(), probe) <= 0).float().sum(0)
    return (correct / (len(pos) + len(neg))).tolist()


def top_k_layers(val_accuracy: list[float], k: int) -> tuple[int, ...]:
    """The k layers with the highest validation accuracy (ties: lower layer first), ascending."""
    order = sorted(range(len(val_accuracy)), key=lambda l: (-val_accuracy[l], l))
    return tuple(sorted(order[: min(k, len(order))]))


@register
class HPREditor(Editor):
    method = "hpr"
    config_cls = HPRConfig
    strength = "angle_scale"

    @classmethod
    def from_layerwise(cls, net: LayerwiseHPR, layers: tuple[int, ...], no_angle: bool = False) -> HPREditor:
        n_layers, d = net.probe.shape
        tensors = {f"layer{l}.probe": net.probe[l].detach().clone() for l in layers}
        if not no_angle:
            for l in layers:
                for i, (w, b) in enumerate(zip(net.weights, net.biases, strict=True)):
                    tensors[f"layer{l}.angle.{i}.weight"] = w[l].detach().clone()
                    tensors[f"layer{l}.angle.{i}.bias"] = b[l, 0].detach().clone()
        return cls(HPRConfig(layers=tuple(layers), no_angle=no_angle), tensors, d, n_layers)

    def expected_shapes(self) -> dict[str, Shape]:
        """Per layer: the probe ``[d_model]`` and, unless ``no_angle``, the angle MLP of :class:`LayerwiseHPR`
        (weights ``[d/2**i, d/2**(i+1)]``, the last ``[., 1]``, biases their output width), as deep as stored."""
        shapes: dict[str, Shape] = {}
        for layer in self.config.layers:
            shapes[f"layer{layer}.probe"] = (self.d_model,)
            depth = stored_depth(self.tensors, f"layer{layer}.angle")
            if self.config.no_angle and depth == 0:
                continue
            shapes |= stored_shapes(f"layer{layer}.angle", halving_widths(self.d_model, max(depth, 1), 1))
        return shapes

    def _angle_params(self, layer: int) -> list[tuple[Tensor, Tensor]]:
        return stored_parameters(self.tensors, f"layer{layer}.angle")

    def edit_fn(self, layer: int, device):
        """The HPR edit of activations ``h [..., d]`` at ``layer`` (float32 math, input dtype out)."""
        normal = ops.unit(self.tensors[f"layer{layer}.probe"].to(device, torch.float32))
        params = [(w.to(device, torch.float32), b.to(device, torch.float32)) for w, b in self._angle_params(layer)]

        scale = self.config.angle_scale

        def theta(rows: Tensor) -> Tensor:  # evaluated on the negative-side rows only
            if self.config.no_angle:
                return scale * ops.reflection_angle(rows, normal)
            angle = math.pi * torch.sigmoid(mlp(rows, params).squeeze(-1))
            return angle if scale == 1.0 else scale * angle

        def edit(h: Tensor) -> Tensor:
            x = h.float()
            plain_reflection = self.config.no_angle and scale == 1.0  # the ablation as the paper defines it
            return ops.hpr_edit(x, normal, None if plain_reflection else theta, unit_normal=True).to(h.dtype)

        return edit

    def hooks(self, model):
        missing = [l for l in self.config.layers if f"layer{l}.probe" not in self.tensors]
        if missing or not self.config.no_angle and any(not self._angle_params(l) for l in self.config.layers):
            raise ValueError(f"HPR editor state is missing tensors for layers {missing or self.config.layers}")
        return self.resid_post_hooks(model, self.config.layers)


# ------------------------------------------------------------------------------------------------ in a run


def split_probe_accuracy(probe: Tensor, folder) -> list[float]:
    """:func:`probe_accuracy` over every aligned pair of a split, read one shard at a time (pairs never cross
    shards): the same counts as on the whole split, in one shard's memory."""
    from hpr import activations

    correct: Tensor | float = 0.0
    total = 0
    for shard in activations.load_shards(folder):
        pos, neg, _ = shard.token_pair_rows()
        correct = correct + torch.tensor(probe_accuracy(probe, pos, neg)) * (2 * len(pos))
        total += 2 * len(pos)
    return torch.as_tensor(correct / total).tolist()


# A variant run label, asked for by name: HPR editing only the answer tokens when scoring and, in generation,
# only the newest token of each pass, as the official generate() does (the default edits every position of
# every pass, the official MC path; in generation that includes the whole prompt at prefill).
ANSWER_ONLY = "hpr_answer"


def fit_step(fit: FitContext) -> None:
    """Train the probes and angle networks of every layer, keep the best validation epoch, select the top-k
    layers by validation probe accuracy (every other method edits those layers too) and write ``probes.json``.

    ``hpr_all_layers`` (every layer's probe and angle network) serves the top-k sweep of the analyses. Asked
    for, ``hpr_answer`` is the same trained editor at ``positions="answer"``.
    """
    labels = ("hpr", "hpr_no_angle", "hpr_all_layers")
    if not (all([fit.done(label) for label in labels]) and (fit.out / "probes.json").exists()):
        _train(fit)
    if ANSWER_ONLY in fit.labels and not fit.done(ANSWER_ONLY):  # the trained editor, at other positions
        fit.save(ANSWER_ONLY, load_editor(fit.editors_dir / "hpr").with_positions("answer"))


def _train(fit: FitContext) -> None:
    """HPR's training and layer selection (see :func:`fit_step`): saves its three labels and ``probes.json``."""
    settings: HPRTrainConfig = fit.settings["hpr"]
    pos, neg, _ = fit.train_token_pairs()
    epoch_val: list[float] = []  # pooled val probe accuracy after each epoch: picks the epoch kept

    def score_epoch(net):
        per_layer = split_probe_accuracy(net.probe.detach(), fit.acts_dir / "val")
        epoch_val.append(sum(per_layer) / len(per_layer))  # every layer has the same tokens: pooled
        return epoch_val[-1]

    net = fit_layerwise(pos, neg, settings, progress=fit.progress, score_epoch=score_epoch)
    del pos, neg
    probe = net.probe.detach()
    acc = {name: split_probe_accuracy(probe, fit.acts_dir / name) for name in ("train", "val", "test")}
    layers = top_k_layers(acc["val"], settings.top_k)
    fit.save("hpr", HPREditor.from_layerwise(net, layers))
    fit.save("hpr_no_angle", HPREditor.from_layerwise(net, layers, no_angle=True))
    fit.save("hpr_all_layers", HPREditor.from_layerwise(net, tuple(range(fit.model.cfg.n_layers))))
    best_epoch = 1 + max(range(len(epoch_val)), key=lambda i: (epoch_val[i], -i)) if epoch_val else settings.epochs
    fit.write_json(
        "probes.json",
        {"accuracy": acc, "selected_layers": list(layers), "epoch_val_accuracy": epoch_val, "kept_epoch": best_epoch},
    )


register_method(
    Method(
        name="hpr",
        summary="Householder Pseudo-Rotation: reflect about the probe's hyperplane, rotate to a learned angle",
        labels=("hpr", "hpr_no_angle"),
        label_pattern=ANSWER_ONLY,
        colours={"hpr": "#0072B2", "hpr_no_angle": "#56B4E9", ANSWER_ONLY: "#332288"},
        order=0,
        fit=fit_step,
        settings=HPRTrainConfig,
        absent_means={"select_epoch": "last"},
    )
)
