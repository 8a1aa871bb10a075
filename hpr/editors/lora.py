"""LoRA baseline: low-rank adapters on the attention Q and V projections, trained on the true answers.

For each edited layer ``l`` and target ``t`` in ``targets`` (default ``("q", "v")``), with ``x`` the input
the attention of block ``l`` consumes (``ln1(resid_pre)``, after LayerNorm weight and bias):

    t = x W_t + b_t    becomes    t = x (W_t + (alpha / rank) A_t B_t) + b_t

``A_t [d_model, rank]``, ``B_t [rank, n_heads_t * d_head]``; the ``n_heads_t * d_head`` axis is read as
``[n_heads_t, d_head]`` (head-major, the layout of TransformerLens's ``W_Q [n_heads, d_model, d_head]``).
``n_heads_t`` is ``n_heads`` for q, and for k/v the number of heads ``hook_k``/``hook_v`` carry
(``n_key_value_heads`` in grouped-query models unless TL ungroups them).

Where it acts: the adapter is applied through hooks, not merged into the weights. ``x`` is captured at
``blocks.{l}.ln1.hook_normalized`` and the norm's own affine map (``* w + b`` for LN, ``* w`` for RMS, nothing
for LNPre/RMSPre) is applied to it, because TL 3.9 fires that hook *before* the map; a model without
normalisation is captured at ``blocks.{l}.hook_resid_pre``. ``(alpha / rank) (x A_t) B_t`` is then added at
``blocks.{l}.attn.hook_{t}``, which is before rotary embeddings and any QK-norm, exactly where ``x W_t + b_t``
arrives, so the edit equals the dense model with ``W_t`` replaced (tests check this). Math in float32, the
sum cast back to the activation's dtype. Models whose attention input is not ``ln1(resid_pre)`` are refused
(``use_split_qkv_input``, ``use_attn_in``, post-norm architectures, shortformer positions for q/k).

Positions: every position of every forward pass. With a KV cache, keys and values of earlier positions
were computed (and edited) when those positions were new, so cached and uncached decoding agree.

Training (:func:`fit_lora`): the model's weights are frozen; only ``A`` and ``B`` learn. Examples: every
true answer of every training question (MC1 and MC2 true choices, deduplicated), encoded as the scorer
encodes them (``context`` + ``" " + answer``, see :mod:`hpr.scoring`). Loss: token cross-entropy on the
continuation tokens only, averaged over the continuation tokens of each optimiser step. AdamW, linear
warmup then linear decay, gradient-norm clip. Init as LoRA (Hu et al., 2021) and PEFT: ``A`` uniform in
``+-1/sqrt(d_model)`` (seeded), ``B = 0``, so the untrained adapter is exactly the base model.

Choices not taken from the HPR paper (the reference notes record no LoRA hyperparameters): the adapter sits
only on the chosen ``layers`` (those the other editors edit, so methods are compared on the same layers);
the defaults of :class:`LoRATrainConfig` were picked on the toy world's validation split; there is no
dropout on the adapter input.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hpr.continuations import shared_prefix_forward
from hpr.data.prompts import PromptFormat, true_answer_texts
from hpr.data.schema import MCQuestion
from hpr.editors.base import (
    Editor,
    Hook,
    Shape,
    applied_if_any,
    check_layers_in_range,
    check_number,
    distinct_layers,
    recorded_head_shape,
    register,
)
from hpr.editors.registry import FitContext, Method, register_method
from hpr.editors.training import warmup_then_linear_decay
from hpr.encoding import Encoded, encode_all, pad_token_id

TARGETS = ("q", "k", "v")  # the attention projections an adapter can sit on, in the order TL computes them


@dataclass(frozen=True)
class LoRAConfig:
    layers: tuple[int, ...] = field(default=(), metadata={"help": "edited layers (0-based blocks)"})
    rank: int = field(default=8, metadata={"help": "rank r of each adapter A [d_model, r] @ B [r, heads*d_head]"})
    alpha: float = field(default=16.0, metadata={"help": "adapter scale: the update is (alpha / rank) * A @ B"})
    targets: tuple[str, ...] = field(
        default=("q", "v"), metadata={"help": "attention projections adapted: any of q, k, v"}
    )

    def __post_init__(self):
        # JSON round trips give lists; normalise so equality and hashing work.
        layers = distinct_layers(self.layers, "LoRA")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or len(set(targets)) != len(targets) or not set(targets) <= set(TARGETS):
            raise ValueError(f"LoRA targets must be distinct names among {TARGETS}, got {self.targets!r}")
        if isinstance(self.rank, bool) or int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        check_number(self.alpha, "LoRA alpha")
        object.__setattr__(self, "layers", tuple(sorted(layers)))
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))  # canonical order
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class LoRATrainConfig:
    rank: int = field(default=8, metadata={"help": "adapter rank"})
    alpha: float = field(default=16.0, metadata={"help": "adapter scale numerator (update = alpha/rank * A @ B)"})
    targets: tuple[str, ...] = field(default=("q", "v"), metadata={"help": "attention projections adapted"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate"})
    epochs: int = field(default=3, metadata={"help": "passes over the training (question, true answer) pairs"})
    batch_size: int = field(default=16, metadata={"help": "(question, true answer) sequences per optimiser step"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on A and B"})
    warmup: float = field(default=0.05, metadata={"help": "fraction of steps of linear warmup, then linear decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip (0: none)"})
    seed: int = field(default=0, metadata={"help": "initialisation of A and batch order"})

    def __post_init__(self):
        # rank, alpha and targets are validated (and targets normalised) as the LoRAConfig they become
        adapter = LoRAConfig(layers=(), rank=self.rank, alpha=self.alpha, targets=self.targets)
        object.__setattr__(self, "targets", adapter.targets)
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.warmup < 1 or self.grad_clip < 0:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, 0 <= warmup < 1, grad_clip >= 0; got lr={self.lr}, "
                f"weight_decay={self.weight_decay}, warmup={self.warmup}, grad_clip={self.grad_clip}"
            )


# ------------------------------------------------------------------------------------------ model plumbing


def _target_heads(model, target: str) -> int:
    """Heads ``blocks.*.attn.hook_{target}`` carries in TL 3.9 (grouped k/v unless TL ungroups them)."""
    cfg = model.cfg
    if target != "q" and cfg.n_key_value_heads is not None and not cfg.ungroup_grouped_query_attention:
        return int(cfg.n_key_value_heads)
    return int(cfg.n_heads)


def _unsupported(model, targets: Sequence[str]) -> str | None:
    """Why the attention input of this model is not ``ln1(resid_pre)`` for ``targets`` (None if it is)."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = model.cfg
    if cfg.use_split_qkv_input or cfg.use_attn_in:
        return "use_split_qkv_input / use_attn_in give each head its own attention input"
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return f"{cfg.original_architecture} is post-norm: attention reads resid_pre, not ln1(resid_pre)"
    if cfg.positional_embedding_type == "shortformer" and {"q", "k"} & set(targets):
        return "shortformer positions are added to the q/k attention input after ln1"
    if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre", None):
        return f"normalization_type {cfg.normalization_type!r} is not one this editor knows"
    return None


def _attention_input(model, layer: int) -> tuple[str, Callable[[Tensor], Tensor]]:
    """The hook to capture at and the map from its value to what block ``layer``'s attention consumes.

    TL's ``LayerNorm``/``RMSNorm`` fire ``hook_normalized`` on ``x / scale`` (float32 for low-precision
    models) and then compute ``.to(dtype) * w (+ b)``: the map repeats those operations with the block's
    own parameters, so it is bit-identical to the module's output.
    """
    norm = model.cfg.normalization_type
    if norm is None:
        return f"blocks.{layer}.hook_resid_pre", lambda h: h
    ln1, dtype = model.blocks[layer].ln1, model.cfg.dtype
    name = f"blocks.{layer}.ln1.hook_normalized"
    if norm == "LN":
        return name, lambda h: h.to(dtype) * ln1.w + ln1.b
    if norm == "RMS":
        return name, lambda h: h.to(dtype) * ln1.w
    return name, lambda h: h.to(dtype)  # LNPre / RMSPre: no weights


# ------------------------------------------------------------------------------------------------ editor


@register
class LoRAEditor(Editor):
    method = "lora"
    config_cls = LoRAConfig
    integer_tensors = frozenset({"head_shape"})

    def expected_shapes(self) -> dict[str, Shape]:
        """``head_shape`` ``[2]``, and per layer and target ``A [d_model, rank]`` and ``B [rank, heads * d_head]``
        (the heads of a grouped-query k or v are checked against the model when applied)."""
        shapes: dict[str, Shape] = {"head_shape": (2,)}
        for layer in self.config.layers:
            for t in self.config.targets:
                shapes[f"layer{layer}.{t}.A"] = (self.d_model, self.config.rank)
                shapes[f"layer{layer}.{t}.B"] = (self.config.rank, None)
        return shapes

    @classmethod
    def initialise(cls, model, config: LoRAConfig, seed: int = 0) -> LoRAEditor:
        """Untrained adapters for ``model``: ``A`` uniform in ``+-1/sqrt(d_model)`` (seeded), ``B = 0``."""
        cfg = model.cfg
        if not config.layers:
            raise ValueError("LoRA needs at least one layer to adapt")
        check_layers_in_range("LoRA", config.layers, cfg.n_layers)
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(cfg.d_model)
        tensors = {"head_shape": torch.tensor([cfg.n_heads, cfg.d_head])}
        for layer in config.layers:
            for t in config.targets:
                a = torch.rand(cfg.d_model, config.rank, generator=gen, dtype=torch.float32)
                tensors[f"layer{layer}.{t}.A"] = (2 * a - 1) * bound
                tensors[f"layer{layer}.{t}.B"] = torch.zeros(config.rank, _target_heads(model, t) * cfg.d_head)
        return cls(config, tensors, cfg.d_model, cfg.n_layers)

    @property
    def head_shape(self) -> tuple[int, int]:
        """``(n_heads, d_head)`` of the model the editor was fitted on."""
        return recorded_head_shape(self)

    def factors(self, layer: int, target: str) -> tuple[Tensor, Tensor]:
        """``A [d_model, rank]`` and ``B [rank, n_heads_t * d_head]`` of one adapter (as stored)."""
        keys = (f"layer{layer}.{target}.A", f"layer{layer}.{target}.B")
        missing = [k for k in keys if k not in self.tensors]
        if missing:
            raise ValueError(f"LoRA editor state is missing tensors {missing}")
        return self.tensors[keys[0]], self.tensors[keys[1]]

    def weight_delta(self, layer: int, target: str) -> Tensor:
        """The dense update ``(alpha / rank) A @ B`` in TL's layout ``[n_heads_t, d_model, d_head]`` (float32)."""
        a, b = self.factors(layer, target)
        d_head = self.head_shape[1]
        delta = self.config.scale * (a.detach().float() @ b.detach().float())  # [d_model, n_heads_t * d_head]
        return delta.view(self.d_model, -1, d_head).permute(1, 0, 2)

    def check_model(self, model) -> None:
        cfg = model.cfg
        n_heads, d_head = self.head_shape
        ours = (self.d_model, self.n_layers, n_heads, d_head)
        theirs = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_head)
        if ours != theirs:
            raise ValueError(
                f"lora editor was fitted on a model with d_model={ours[0]}, n_layers={ours[1]}, n_heads={ours[2]}, "
                f"d_head={ours[3]}; this model has d_model={theirs[0]}, n_layers={theirs[1]}, n_heads={theirs[2]}, "
                f"d_head={theirs[3]}. Fit a new editor for this model."
            )
        why = _unsupported(model, self.config.targets)
        if why:
            raise ValueError(f"lora editor cannot adapt this model: {why}")
        rank = self.config.rank
        check_layers_in_range("LoRA", self.config.layers, cfg.n_layers)
        for layer in self.config.layers:
            for t in self.config.targets:
                a, b = self.factors(layer, t)
                width = _target_heads(model, t) * d_head
                if tuple(a.shape) != (self.d_model, rank) or tuple(b.shape) != (rank, width):
                    raise ValueError(
                        f"lora adapter layer{layer}.{t} has A {tuple(a.shape)} and B {tuple(b.shape)}; this model "
                        f"needs A ({self.d_model}, {rank}) and B ({rank}, {width}) ({width // d_head} heads at "
                        f"hook_{t}). Fit a new editor for this model."
                    )

    def hooks(self, model) -> list[Hook]:
        """Per layer: capture the attention input, then add the adapter output at each target's hook.

        ``A``/``B`` are used as they are when already float32 on the model's device (so :func:`fit_lora`
        trains through these very hooks); the product is formed inside the hook, every forward pass.
        """
        self.check_model(model)
        device, scale, d_head = model.cfg.device, self.config.scale, self.head_shape[1]
        hooks: list[Hook] = []
        for layer in self.config.layers:
            capture_name, attn_input = _attention_input(model, layer)
            store: dict[str, Tensor] = {}

            def capture(h, hook, store=store):
                store["h"] = h  # ln1 fires for the q, k and v inputs in turn: identical values, keep the last

            hooks.append((capture_name, capture))
            last = self.config.targets[-1]  # TL computes q, k, v in that order
            for t in self.config.targets:
                a, b = (p.to(device=device, dtype=torch.float32) for p in self.factors(layer, t))

                def add(act, hook, store=store, attn_input=attn_input, a=a, b=b, done=(t == last)):
                    if "h" not in store:
                        raise RuntimeError(f"{hook.name} ran before the attention input of its block was captured")
                    x = attn_input(store["h"]).float()
                    if done:
                        store.clear()  # never reuse an input captured for another forward pass
                    delta = scale * ((x @ a) @ b)  # [batch, pos, n_heads_t * d_head]
                    return (act.float() + delta.view(*act.shape[:-2], -1, d_head)).to(act.dtype)

                hooks.append((f"blocks.{layer}.attn.hook_{t}", add))
        return hooks


# ---------------------------------------------------------------------------------------------- training


def _answer_nll(model, batch: Sequence[Encoded], pad_id: int) -> tuple[Tensor, int]:
    """Summed token cross-entropy of the continuation tokens of ``batch`` (one forward pass) and their count.

    The batch's shared prompt prefix (the few-shot primer) runs once, with gradients through its keys and
    values (:func:`hpr.continuations.shared_prefix_forward`): the same loss and gradients as whole sequences.
    """
    logits, _, _, shared = shared_prefix_forward(model, batch, pad_id, return_type="logits")
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for i, e in enumerate(batch):
        total = len(e.tokens)
        rows += [i] * e.n_cont
        cols += range(total - e.n_cont - 1 - shared, total - 1 - shared)  # logits at p predict token p + 1
        targets += e.tokens[total - e.n_cont :]
    rows_t, cols_t, targets_t = (torch.tensor(v, device=logits.device) for v in (rows, cols, targets))
    picked = logits[rows_t, cols_t].float()  # only the positions the loss reads
    nll = torch.nn.functional.cross_entropy(picked, targets_t, reduction="sum")
    return nll, len(targets)


@torch.no_grad()
def true_answer_loss(
    model, questions: Sequence[MCQuestion], fmt: PromptFormat, editor: Editor | None = None, batch_size: int = 16
) -> float:
    """Mean token cross-entropy of the true answers' continuation tokens (the training objective), under ``editor``."""
    encoded = encode_all(model, true_answer_texts(questions, fmt))
    if not encoded:
        raise ValueError("no true answers to compute a loss on")
    pad_id = pad_token_id(model)
    total, count = 0.0, 0
    with applied_if_any(editor, model):
        for start in range(0, len(encoded), batch_size):
            nll, n = _answer_nll(model, encoded[start : start + batch_size], pad_id)
            total, count = total + nll.item(), count + n
    return total / count


@contextlib.contextmanager
def _frozen(model) -> Iterator[None]:
    """The model's parameters frozen inside (only the adapters train); their flags restored on exit, errors too."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _accumulate(step: list[Encoded], model, pad_id: int, batch_size: int) -> float:
    """Backpropagate one optimiser step's loss (mean NLL over all its answer tokens) in forward passes of
    ``batch_size`` sequences; returns the loss."""
    n_tokens = sum(e.n_cont for e in step)
    step_loss = 0.0
    for start in range(0, len(step), batch_size):
        nll, _ = _answer_nll(model, step[start : start + batch_size], pad_id)
        (nll / n_tokens).backward()
        step_loss += nll.item() / n_tokens
    return step_loss


def fit_lora(
    model,
    questions: Sequence[MCQuestion],
    fmt: PromptFormat,
    layers: Sequence[int],
    cfg: LoRATrainConfig,
    batch_size: int = 16,
    progress: bool = False,
) -> LoRAEditor:
    """Train LoRA adapters on the true answers of ``questions``; the model itself is left unchanged.

    ``cfg.batch_size`` sequences make one optimiser step; ``batch_size`` is how many go through one forward
    pass (gradients are accumulated, the loss is normalised over the whole step's tokens), so it bounds
    memory without changing what is optimised. The model's parameters are frozen for the duration and their
    ``requires_grad`` flags restored afterwards, also on error; their ``.grad`` is never touched.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = LoRAConfig(layers=tuple(layers), rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets)
    encoded = encode_all(model, true_answer_texts(questions, fmt))
    if not encoded:
        raise ValueError("LoRA needs at least one true answer to train on")
    editor = LoRAEditor.initialise(model, config, seed=cfg.seed)
    editor.check_model(model)  # refuse unsupported models before anything changes
    device = model.cfg.device
    params = {k: v.to(device).requires_grad_(True) for k, v in editor.tensors.items() if k != "head_shape"}
    editor.tensors.update(params)

    gen = torch.Generator().manual_seed(cfg.seed)
    pad_id = pad_token_id(model)
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_then_linear_decay(opt, cfg.warmup, total)

    with _frozen(model), torch.enable_grad(), model.hooks(fwd_hooks=editor.hooks(model)):
        with tqdm(total=total, desc="training LoRA", disable=not progress, unit="step") as bar:
            for _ in range(cfg.epochs):
                for idx in torch.randperm(len(encoded), generator=gen).split(cfg.batch_size):
                    opt.zero_grad(set_to_none=True)
                    step_loss = _accumulate([encoded[i] for i in idx.tolist()], model, pad_id, batch_size)
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
                    opt.step()
                    sched.step()
                    bar.update()
                    bar.set_postfix(loss=f"{step_loss:.3f}")
    editor.tensors.update({k: v.detach().cpu().clone() for k, v in params.items()})
    return editor


# ------------------------------------------------------------------------------------------------ in a run


def fit_step(fit: FitContext) -> None:
    if fit.done("lora"):
        return
    fit.save(
        "lora",
        fit_lora(
            fit.model, fit.parts["train"], fit.fmt, fit.layers, fit.settings["lora"], fit.batch_size, fit.progress
        ),
    )


register_method(
    Method(
        name="lora",
        summary="LoRA: low-rank adapters on the attention projections, fine-tuned on true answers",
        labels=("lora",),
        colours={"lora": "#8C564B"},
        order=60,
        fit=fit_step,
        settings=LoRATrainConfig,
    )
)
