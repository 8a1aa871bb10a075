"""Representation Tuning (Ackerman 2024; ``cma1114/representation_tuning``): the steering direction goes into
the weights by fine-tuning, instead of being added by hooks at run time.

Objective, per batch of ``(context, answer)`` sequences of the train questions (every MC2 answer):

* representation loss (tune *in*): ``L_rep = mean_{l, t} (1 - cos(resid_post_l[t], v_l)) / 2`` over the
  target blocks ``l`` and the answer (continuation) tokens ``t`` of both the true and the false answers;
  0 when aligned with ``v_l``, 1 when anti-aligned. ``v_l`` is the CAA direction of block ``l``
  (mean ``resid_post`` at true answer tokens minus at false answer tokens, see :func:`hpr.editors.caa.fit_caa`).
* token loss: ``token_loss_scale * CE`` on the continuation tokens of the TRUE answers only (the
  reference divides its CE by 100), so the model keeps producing sensible answers while its
  representations are pulled towards ``v``.

Parameter groups (as the reference's zero-grad hooks): each loss is differentiated only with respect to its
own group, with ``torch.autograd.grad``.

* token group (``token_params``, default every parameter of the target blocks) <- token loss;
* representation group (``rep_params``, default ``attn.W_V``, ``attn.b_V``, ``attn.W_O``, ``attn.b_O`` of the
  target blocks; TL's grouped-query ``attn._W_V``/``attn._b_V`` match the same patterns) <- representation loss.

A parameter in both groups (W_V, W_O, b_V, b_O by default) gets the sum of the two gradients. One AdamW
steps everything: parameters of the representation group at ``lr_rep`` (10x ``lr_token``, as the reference's
1e-5 vs 1e-6), the token-only ones at ``lr_token``, after a linear warmup. Adam is invariant to the scale of a
gradient, so ``token_loss_scale`` matters where both losses reach the same parameter (the token loss is then a
small correction to the representation loss), not on token-only parameters. With ``token_loss_scale=0`` the
token loss is not computed (the forward pass stops after the last target block) and the token-only
parameters get no update at all (no weight decay either). Nothing outside the named parameters of the target
blocks is trained: embeddings, unembedding and other blocks never change.

Positions: the representation loss reads the answer tokens of both true and false answers. The CAA
direction is defined at answer tokens (it is the difference of their means), so that is where pulling the
residual stream towards it is meaningful, and it is where MC1/MC2 scoring reads the model. The reference uses
one prompt position (offset 7 before the label) of an A/B "Is the following claim true or false?" template,
which our multiple-choice format does not have.

Edit: the tuned weights act at every position of every forward pass; with a KV cache each new position is
computed by the tuned weights, so cached and uncached decoding agree. The artifact is the tuned values of the
parameters of the two groups (safetensors keys are TransformerLens state-dict names such as
``blocks.1.attn.W_V``). ``with editor.applied(model):`` checks that every saved tensor exists in the model
with the same shape (before anything changes), copies the tuned values in, and restores the originals on exit,
also on error. There are no hooks.

Deliberate differences from the reference notebook: MC answers (all answer tokens, true and false) instead of
the A/B template at one position; one direction per layer, not per (layer, position); the plain CE on the true
answers, not the 50/50 soft target of its "TuneIn" variants nor the README's "only when CE >= 0.7"; a fixed
number of epochs without early stopping (patience 10 after 80 batches in the reference; choosing epochs and
learning rates on val is the caller's job); linear warmup then a constant rate; only tune-in (no tune-out
``|cos|`` loss); trained in the model's own dtype (float32 for the toy model; the reference trained
Llama-2-13b-chat in fp16 with AdamW eps 1e-4, which ``adam_eps`` allows) with toy-sized learning rates.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from hpr.continuations import shared_prefix_forward
from hpr.data.prompts import PromptFormat
from hpr.data.schema import MCQuestion
from hpr.editors.base import (
    Editor,
    Hook,
    Shape,
    check_layers_in_range,
    distinct_layers,
    exclusive_use,
    register,
)
from hpr.editors.registry import FitContext, Method, register_method
from hpr.encoding import Encoded, encode_all, pad_token_id
from hpr.models import resid_post_hook, weights_put_back

TOKEN_PARAMS: tuple[str, ...] = ("*",)
REP_PARAMS: tuple[str, ...] = ("attn.W_V", "attn.b_V", "attn.W_O", "attn.b_O")


def _patterns(value, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ValueError(f"{name} must be a tuple of patterns, not the string {value!r}")
    out = tuple(str(p) for p in value)
    if any(not p.strip() for p in out):
        raise ValueError(f"{name} contains an empty pattern: {out!r}")
    return out


@dataclass(frozen=True)
class RepTuneConfig:
    layers: tuple[int, ...] = field(
        default=(), metadata={"help": "tuned blocks (0-based); the representation loss is read at their resid_post"}
    )
    token_params: tuple[str, ...] = field(
        default=TOKEN_PARAMS,
        metadata={
            "help": "parameters of each tuned block trained by the token loss (glob patterns of names inside a "
            "block, e.g. 'mlp.*', 'attn.W_V'; '*' = all)"
        },
    )
    rep_params: tuple[str, ...] = field(
        default=REP_PARAMS,
        metadata={
            "help": "parameters of each tuned block trained by the representation loss (glob patterns of names "
            "inside a block)"
        },
    )

    def __post_init__(self):
        layers = distinct_layers(self.layers, "reptune")
        object.__setattr__(self, "layers", tuple(sorted(layers)))
        object.__setattr__(self, "token_params", _patterns(self.token_params, "token_params"))
        object.__setattr__(self, "rep_params", _patterns(self.rep_params, "rep_params"))


@dataclass(frozen=True)
class RepTuneTrainConfig:
    """Defaults measured on the default toy world (val split only; base val MC1 0.542, MC2 0.612).

    lr 1e-5 / 1e-4, 3 epochs (144 steps, ~5 s on 2 CPU cores): val MC1 1.000, MC2 0.990, cos to v at the
    val answer tokens -0.08/-0.24 -> 0.69/0.86 (layers 0/1), train CE on true answers 0.78 -> 1.30.
    10x larger rates: MC1 0.79 and CE 0.71 -> 3.6 (the representation loss swamps W_V/W_O); 30x: MC1 0.54.
    """

    lr_token: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the token-only parameters"})
    lr_rep: float = field(
        default=1e-4,
        metadata={"help": "AdamW learning rate of the representation-group parameters (the reference: 10x lr_token)"},
    )
    epochs: int = field(default=3, metadata={"help": "passes over the train answers"})
    batch_size: int = field(default=16, metadata={"help": "(question, answer) sequences per step"})
    token_loss_scale: float = field(
        default=0.01,
        metadata={"help": "weight of the CE on true answers (the reference: 1/100); 0 turns the token loss off"},
    )
    warmup: int = field(default=10, metadata={"help": "steps of linear warmup, then a constant rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (the reference: 0.1)"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW eps (the reference used 1e-4 in fp16)"})
    seed: int = field(default=0, metadata={"help": "batch order"})

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1 or self.warmup < 0:
            raise ValueError(f"need epochs >= 0, batch_size >= 1, warmup >= 0; got {self}")
        if self.token_loss_scale < 0 or self.lr_token < 0 or self.lr_rep < 0:
            raise ValueError(f"learning rates and token_loss_scale must be >= 0; got {self}")


# --------------------------------------------------------------------------------------------- groups


def _matches(name: str, patterns: Sequence[str]) -> bool:
    # TL's grouped-query attention stores W_K/W_V/b_K/b_V as _W_K/... ; "attn.W_V" names both.
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in (name, name.replace("._", ".")))


def parameter_groups(model, config: RepTuneConfig) -> tuple[list[str], list[str]]:
    """State-dict names of the token group and of the representation group, in the model's order.

    Every pattern must name at least one parameter of some target block (a typo is an error, not a no-op).
    """
    if not config.layers:
        raise ValueError("reptune needs at least one target layer")
    check_layers_in_range("reptune", config.layers, model.cfg.n_layers)
    inside = [
        (f"blocks.{layer}.{name}", name)
        for layer in config.layers
        for name, _ in model.blocks[layer].named_parameters()
    ]
    for group in ("token_params", "rep_params"):
        patterns = getattr(config, group)
        unused = [p for p in patterns if not any(_matches(name, (p,)) for _, name in inside)]
        if unused:
            available = sorted({name for _, name in inside})
            raise ValueError(
                f"reptune {group} {unused} name no parameter of blocks {list(config.layers)}; "
                f"parameters of a block: {available}"
            )
    token = [full for full, name in inside if _matches(name, config.token_params)]
    rep = [full for full, name in inside if _matches(name, config.rep_params)]
    return token, rep


def _check_vectors(model, vectors: Mapping[int, Tensor], layers: Sequence[int]) -> dict[int, Tensor]:
    missing = [layer for layer in layers if layer not in vectors]
    if missing:
        raise ValueError(f"no steering vector for target layers {missing}; vectors cover {sorted(vectors)}")
    out = {}
    for layer in layers:
        v = vectors[layer].detach().float()
        if v.shape != (model.cfg.d_model,):
            raise ValueError(
                f"steering vector of layer {layer} has shape {tuple(v.shape)}, "
                f"expected ({model.cfg.d_model},) (d_model)"
            )
        norm = v.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError(f"steering vector of layer {layer} has norm {norm.item()}; cosine undefined")
        out[layer] = v.to(model.cfg.device)
    return out


# -------------------------------------------------------------------------------------------- fitting


def fit_reptune(
    model,
    questions: Sequence[MCQuestion],
    fmt: PromptFormat,
    vectors: Mapping[int, Tensor],
    cfg: RepTuneTrainConfig = RepTuneTrainConfig(),
    layers: Sequence[int] | None = None,
    token_params: Sequence[str] = TOKEN_PARAMS,
    rep_params: Sequence[str] = REP_PARAMS,
    progress: bool = False,
) -> RepTuneEditor:
    """Representation-tune ``model`` on every MC2 answer of ``questions``; return the tuned weights as an editor.

    ``vectors[l]`` ``[d_model]`` is the steering direction of block ``l`` (CAA: mean resid_post at true minus
    at false answer tokens); ``layers`` defaults to every layer of ``vectors``. The model is trained in place
    and restored exactly in ``finally``: its parameter values, ``requires_grad`` flags and ``.grad`` are as
    before, and no hooks are left. Batches follow ``cfg`` (``cfg.batch_size`` sequences per step).
    """
    seqs = [(fmt.context(q), fmt.continuation(c.text), c.is_true) for q in questions for c in q.mc2]
    if not seqs:
        raise ValueError("no MC2 answers to tune on")
    encoded = encode_all(model, [(ctx, cont) for ctx, cont, _ in seqs])
    return fit_reptune_encoded(
        model, encoded, [t for _, _, t in seqs], vectors, cfg, layers, token_params, rep_params, progress
    )


def _keeper(acts: dict):
    """A hook that keeps each activation it sees (with its graph: the representation loss needs it)."""

    def keep(act, hook):
        acts[hook.name] = act

    return keep


def fit_reptune_encoded(
    model,
    encoded: Sequence[Encoded],
    is_true: Sequence[bool],
    vectors: Mapping[int, Tensor],
    cfg: RepTuneTrainConfig = RepTuneTrainConfig(),
    layers: Sequence[int] | None = None,
    token_params: Sequence[str] = TOKEN_PARAMS,
    rep_params: Sequence[str] = REP_PARAMS,
    progress: bool = False,
) -> RepTuneEditor:
    """:func:`fit_reptune` on already tokenised sequences (the continuation is the last ``n_cont`` tokens).

    ``is_true[i]`` says whether sequence i's continuation is a true answer (only those feed the token loss);
    the representation loss reads the continuation tokens of every sequence.
    """
    from tqdm.auto import tqdm

    if len(encoded) != len(is_true) or not encoded:
        raise ValueError(
            f"need one is_true per sequence and at least one sequence, got {len(encoded)} "
            f"sequences and {len(is_true)} labels"
        )
    config = RepTuneConfig(
        layers=tuple(sorted(vectors)) if layers is None else tuple(layers),
        token_params=tuple(token_params),
        rep_params=tuple(rep_params),
    )
    token_names, rep_names = parameter_groups(model, config)
    params = dict(model.named_parameters())
    step = _Losses(model, config, cfg, _check_vectors(model, vectors, config.layers), params, token_names, rep_names)
    trained = list(dict.fromkeys(token_names + rep_names))  # model order, no duplicates
    labels = torch.tensor([bool(t) for t in is_true])
    history: list[dict[str, float]] = []
    steps = -(-len(encoded) // cfg.batch_size) * cfg.epochs
    with (
        _training_only(params, trained),
        tqdm(total=steps, desc="representation tuning", disable=not progress, unit="step") as bar,
    ):
        opt, sched = _optimiser(
            [params[n] for n in trained if n in rep_names], [params[n] for n in trained if n not in rep_names], cfg
        )
        gen = torch.Generator().manual_seed(cfg.seed)
        for _ in range(cfg.epochs):
            for idx in torch.randperm(len(encoded), generator=gen).split(cfg.batch_size):
                update, record = step.gradients([encoded[i] for i in idx.tolist()], labels[idx])
                for n in trained:  # a parameter no loss reached this step is skipped by AdamW (grad None)
                    params[n].grad = update.get(n)
                opt.step()
                sched.step()
                history.append(record)
                bar.update()
        tuned = {n: params[n].detach().to("cpu", copy=True) for n in trained}
    editor = RepTuneEditor(config, tuned, model.cfg.d_model, model.cfg.n_layers)
    editor.history = history
    return editor


def _optimiser(rep: list[Tensor], token: list[Tensor], cfg: RepTuneTrainConfig):
    """AdamW with one learning rate per group, linear warmup then a constant rate."""
    groups = [{"params": rep, "lr": cfg.lr_rep}, {"params": token, "lr": cfg.lr_token}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) if cfg.warmup else 1.0)
    return opt, sched


@contextlib.contextmanager
def _training_only(params: dict[str, Tensor], trained: Sequence[str]) -> Iterator[None]:
    """Only ``trained`` require gradients inside; on exit (errors too) every parameter's value, flag and
    gradient are as before: the tuned weights live in the editor, never in the model."""
    original = {n: params[n].detach().clone() for n in trained}  # captured before the first change
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
        for n in trained:
            params[n].requires_grad_(True)
        yield
    finally:
        with torch.no_grad():
            for n, value in original.items():
                params[n].copy_(value)
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = grads[n]


@dataclass
class _Losses:
    """The two losses of representation tuning on one batch, and the gradients of each parameter group."""

    model: Any
    config: RepTuneConfig
    cfg: RepTuneTrainConfig
    vecs: dict[int, Tensor]
    params: dict[str, Tensor]
    token_names: list[str]
    rep_names: list[str]

    def gradients(self, batch: list[Encoded], labels: Tensor) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Per parameter, the summed gradient of the representation loss (rep group) and of the scaled
        token loss (token group) on ``batch``; and the losses' values."""
        model, config, cfg, params = self.model, self.config, self.cfg, self.params
        use_token = bool(self.token_names) and cfg.token_loss_scale > 0
        device = model.cfg.device
        names = [resid_post_hook(layer) for layer in config.layers]
        n_cont = torch.tensor([e.n_cont for e in batch])
        acts: dict[str, Tensor] = {}
        keep = _keeper(acts)
        pad_id = pad_token_id(model) if model.tokenizer is not None else 0
        with torch.enable_grad(), model.hooks(fwd_hooks=[(n, keep) for n in names]):
            # Without the token loss nothing after the last target block is needed. The shared prompt
            # prefix runs once, with gradients through its keys and values; ids are the rest.
            last = dict(return_type="logits") if use_token else dict(stop_at_layer=config.layers[-1] + 1)
            out, ids, lengths, _ = shared_prefix_forward(model, batch, pad_id, **last)
            position = torch.arange(ids.shape[1])[None]
            answer = ((position >= (lengths - n_cont)[:, None]) & (position < lengths[:, None])).to(device)
            record: dict[str, float] = {}
            update: dict[str, Tensor] = {}
            true_targets = (answer & labels.to(device)[:, None])[:, 1:]  # logits at t-1 predict t
            token_on = use_token and bool(true_targets.any())
            if self.rep_names:
                cos = [
                    F.cosine_similarity(acts[n][answer].float(), self.vecs[layer][None], dim=-1)
                    for n, layer in zip(names, config.layers, strict=True)
                ]
                rep_loss = torch.stack([((1 - c) / 2).mean() for c in cos]).mean()
                record["rep_loss"] = rep_loss.item()
                g = torch.autograd.grad(
                    rep_loss, [params[n] for n in self.rep_names], retain_graph=token_on, allow_unused=True
                )
                update.update({n: gi for n, gi in zip(self.rep_names, g, strict=True) if gi is not None})
            if token_on:
                ce = F.cross_entropy(out[:, :-1][true_targets].float(), ids[:, 1:][true_targets])
                record["token_loss"] = ce.item()
                g = torch.autograd.grad(
                    cfg.token_loss_scale * ce, [params[n] for n in self.token_names], allow_unused=True
                )
                for n, gi in zip(self.token_names, g, strict=True):
                    if gi is not None:
                        update[n] = update[n] + gi if n in update else gi
        return update, record


@torch.inference_mode()
def answer_cosines(
    model, questions: Sequence[MCQuestion], fmt: PromptFormat, vectors: Mapping[int, Tensor], batch_size: int = 16
) -> dict[int, float]:
    """Mean ``cos(resid_post_l, v_l)`` over the answer tokens of every MC2 answer, per layer of ``vectors``.

    ``1 - 2 * mean`` over the layers is the representation loss on these questions; run it inside
    ``editor.applied(model)`` to read the tuned model.
    """
    from hpr.activations import answer_activations

    pairs = [(fmt.context(q), fmt.continuation(c.text)) for q in questions for c in q.mc2]
    acts = torch.cat(answer_activations(model, pairs, batch_size))  # [tokens, layers, d]
    return {
        layer: F.cosine_similarity(acts[:, layer], v.detach().float().cpu()[None], dim=-1).mean().item()
        for layer, v in sorted(vectors.items())
    }


# --------------------------------------------------------------------------------------------- editor


@register
class RepTuneEditor(Editor):
    method = "reptune"
    config_cls = RepTuneConfig

    def __init__(self, config, tensors: dict[str, Tensor], d_model: int, n_layers: int, fitted_on: str | None = None):
        super().__init__(config, tensors, d_model, n_layers, fitted_on)
        self.history: list[dict[str, float]] = []  # per-step losses of fit_reptune (not saved)

    def expected_shapes(self) -> dict[str, Shape]:
        """Tuned parameters of its blocks, any shape here: each is checked against the model's when applied."""
        return {f"blocks.{layer}.*": None for layer in self.config.layers}

    def hooks(self, model) -> list[Hook]:
        return []  # the edit lives in the weights

    def check_model(self, model) -> None:
        super().check_model(model)
        if not self.tensors:
            raise ValueError("reptune editor holds no tuned parameters")
        prefixes = tuple(f"blocks.{layer}." for layer in self.config.layers)
        stray = [n for n in self.tensors if not n.startswith(prefixes)]
        if stray:
            raise ValueError(
                f"reptune editor state has tensors {stray[:5]} outside its blocks {list(self.config.layers)}"
            )
        params = dict(model.named_parameters())
        problems = []
        for name, t in self.tensors.items():
            if name not in params:
                problems.append(f"{name} is not a parameter of this model")
            elif params[name].shape != t.shape:
                problems.append(
                    f"{name} has shape {tuple(t.shape)} in the editor but {tuple(params[name].shape)} in this model"
                )
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(
                "reptune editor does not fit this model: "
                + "; ".join(problems[:5])
                + more
                + ". Fit a new editor for this model."
            )

    @contextlib.contextmanager
    def applied(self, model) -> Iterator[None]:
        """Tuned weights in the model inside the block, the original ones back on exit (also on error); as
        :meth:`Editor.applied`, a second thread's ``applied`` on the same model raises ``RuntimeError``."""
        with exclusive_use(model, self.method), weights_put_back(model), self._swapped(model):
            yield

    @contextlib.contextmanager
    def _swapped(self, model) -> Iterator[None]:
        self.check_model(model)
        self.check_identity(model)
        params = dict(model.named_parameters())
        targets = {n: params[n] for n in self.tensors}
        # Built before anything changes: the originals, and the tuned values in each parameter's dtype/device.
        original = {n: p.detach().clone() for n, p in targets.items()}
        tuned = {n: self.tensors[n].to(device=p.device, dtype=p.dtype) for n, p in targets.items()}
        try:
            with torch.no_grad():
                for n, p in targets.items():
                    p.copy_(tuned[n])
            yield
        finally:
            with torch.no_grad():
                for n, p in targets.items():
                    p.copy_(original[n])


# ------------------------------------------------------------------------------------------------ in a run


def fit_step(fit: FitContext) -> None:
    if fit.done("reptune"):
        return
    from hpr.editors.caa import fit_caa

    pos, neg, _ = fit.train_token_pairs()
    layers = fit.layers
    caa = fit_caa(pos, neg, layers, 1.0)  # the steering vectors: CAA's, from the train split
    vectors = {layer: caa.tensors[f"layer{layer}.vector"] for layer in layers}
    del pos, neg, caa  # the train split is freed before training
    fit.save(
        "reptune",
        fit_reptune(
            fit.model, fit.parts["train"], fit.fmt, vectors, fit.settings["reptune"], layers, progress=fit.progress
        ),
    )


register_method(
    Method(
        name="reptune",
        summary="Representation tuning: fine-tune the weights towards CAA's vectors at HPR's layers",
        labels=("reptune",),
        colours={"reptune": "#17BECF"},
        order=70,
        fit=fit_step,
        settings=RepTuneTrainConfig,
    )
)
