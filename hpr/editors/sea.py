"""SEA: Spectral Editing of Activations (Qiu et al., NeurIPS 2024; ``yfqiu-nlp/sea-llm``), linear SEA.

Fit, per edited layer, from three row-aligned activation sets ``[N, d]`` at the last token:
``H`` (prompt + the model's own greedy answer), ``H+`` (prompt + a true answer), ``H-`` (prompt + a false
answer); row i of each comes from the same prompt::

    Omega+ = H^T H+ / N,   Omega- = H^T H- / N                  (d x d cross-covariances)
    U+ S+ V+^T = svd(Omega+),   U- S- V-^T = svd(Omega-)
    k = smallest k with  sum_{i<k} s_i^2 / sum_i s_i^2 >= k_ratio   (k+ and k-, default ratio 0.998)
    keep = U+[:, :k+]   (the top positive directions)
    tail = U-[:, k-:]   (everything but the top negative directions)

Edit at ``blocks.{l}.hook_resid_post``, every position (the released adapter's, after every layer's MLP;
``positions``, :mod:`hpr.positions`, can restrict it): ``h' = keep keep^T h + tail tail^T h``, then
``normalize="l2_norm"`` rescales each token to its own norm ``||h||`` (the default), ``"average"`` halves
the sum. Math in float32 (the SVD in float64), cast back.

Deliberate differences from the released code (the paper's reading is the default):
- site: the code fits on residual hidden states but appends the projection after each layer's MLP (it
  edits ``mlp_out``); we fit and edit the same site, the residual stream after the block;
- norm: the code's ``l2_norm`` takes the norm per feature across tokens; we restore each token's norm;
- layers: the code edits the last 21 of 32 layers; :func:`last_layers` gives that proportion for any
  depth, and the run uses it;
- no mean subtraction (as the shipped scripts);
- each (true, false) pair of a question is one row, with the question's one greedy answer as its ``H`` row;
  greedy answers are at most ``max_new_tokens`` (32; the paper allows 256) and end at the first newline.
Not implemented: non-linear Phi-SEA. Its feature maps have no faithful inverse after projection (tanh's
inverse is undefined once a projected feature leaves (-1, 1), ELU's below -1, and the squared exponential
is not invertible), and the released adapter discards the feature map's output; we found no reading of it
that is both faithful and well defined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hpr.activations import last_token_activations, resid_names
from hpr.data.prompts import PromptFormat
from hpr.data.schema import MCQuestion
from hpr.editors.base import Editor, Hook, Shape, check_layers_in_range, distinct_layers, register
from hpr.editors.registry import FitContext, Method, register_method
from hpr.positions import HELP as POSITIONS_HELP
from hpr.positions import check_mode

NORMALIZE = ("l2_norm", "average")


@dataclass(frozen=True)
class SEAConfig:
    layers: tuple[int, ...] = field(default=(), metadata={"help": "edited layers (0-based blocks)"})
    normalize: str = field(default="l2_norm", metadata={"help": "l2_norm: keep each token's norm; average: halve"})
    positions: str = field(default="all", metadata={"help": POSITIONS_HELP})

    def __post_init__(self):
        layers = distinct_layers(self.layers, "SEA")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"SEA normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        object.__setattr__(self, "layers", layers)
        check_mode(self.positions, "SEA positions")


def last_layers(n_layers: int, fraction: float = 21 / 32) -> tuple[int, ...]:
    """The last ``ceil(fraction * n_layers)`` layers (the released code edits the last 21 of Llama-2-7B's 32)."""
    k = max(1, math.ceil(fraction * n_layers))
    return tuple(range(n_layers - k, n_layers))


def explained_rank(singular_values: Tensor, ratio: float) -> int:
    """The smallest k whose top-k singular values explain at least ``ratio`` of ``sum s^2``."""
    if not 0 < ratio <= 1:
        raise ValueError(f"k_ratio must be in (0, 1], got {ratio}")
    energy = singular_values.double() ** 2
    if energy.sum() == 0:
        raise ValueError("SEA cross-covariance is zero: the activations carry no signal")
    cumulative = energy.cumsum(0) / energy.sum()
    k = int(torch.searchsorted(cumulative, torch.tensor(ratio, dtype=cumulative.dtype) - 1e-12)) + 1
    return min(k, len(singular_values))


def spectral_projections(base: Tensor, pos: Tensor, neg: Tensor, k_ratio: float = 0.998) -> tuple[Tensor, Tensor]:
    """``(keep [d, k+], tail [d, d - k-])`` from row-aligned ``[N, d]`` activations (see the module doc)."""
    if not base.shape == pos.shape == neg.shape or base.ndim != 2 or len(base) == 0:
        raise ValueError(
            f"SEA needs base, pos and neg of one shape [N, d] with N > 0, got "
            f"{tuple(base.shape)}, {tuple(pos.shape)}, {tuple(neg.shape)}"
        )
    h = base.double()
    u_pos, s_pos, _ = torch.linalg.svd(h.T @ pos.double() / len(h))
    u_neg, s_neg, _ = torch.linalg.svd(h.T @ neg.double() / len(h))
    k_pos = explained_rank(s_pos, k_ratio)
    k_neg = explained_rank(s_neg, k_ratio)
    return u_pos[:, :k_pos].float().contiguous(), u_neg[:, k_neg:].float().contiguous()


def fit_sea(
    base: Tensor, pos: Tensor, neg: Tensor, layers: Sequence[int], k_ratio: float = 0.998, normalize: str = "l2_norm"
) -> SEAEditor:
    """Fit SEA on row-aligned ``[N, n_layers, d]`` activations (as from :func:`sea_activations`)."""
    if base.ndim != 3 or not base.shape == pos.shape == neg.shape:
        raise ValueError(
            f"SEA needs base, pos and neg of one shape [N, n_layers, d], got "
            f"{tuple(base.shape)}, {tuple(pos.shape)}, {tuple(neg.shape)}"
        )
    n_layers, d = base.shape[1:]
    check_layers_in_range("SEA", layers, n_layers)
    tensors = {}
    for layer in layers:
        keep, tail = spectral_projections(base[:, layer], pos[:, layer], neg[:, layer], k_ratio)
        tensors[f"layer{layer}.keep"] = keep
        tensors[f"layer{layer}.tail"] = tail
    return SEAEditor(SEAConfig(layers=tuple(sorted(layers)), normalize=normalize), tensors, d, n_layers)


def newline_ids(tokenizer) -> list[int]:
    """Token ids that end an answer line (the last token of "\\n" and "\\n\\n")."""
    ids = {tokenizer(s, add_special_tokens=False)["input_ids"][-1] for s in ("\n", "\n\n")}
    return sorted(ids)


@torch.inference_mode()
def greedy_answers(
    model, questions: Sequence[MCQuestion], fmt: PromptFormat, max_new_tokens: int = 32, progress: bool = False
) -> list[str]:
    """The model's own greedy answer to each question: the text after ``A:`` up to the first newline.

    An answer that ends at once (a newline first) keeps its first generated token, so it is never empty.
    """
    from tqdm.auto import tqdm

    from hpr.generation import greedy_batch
    from hpr.scoring import encode_context

    tok = model.tokenizer
    prompts = [encode_context(model, fmt.context(q), max_new_tokens) for q in questions]
    with tqdm(total=len(prompts), desc="SEA base answers", disable=not progress, unit="q") as bar:
        generated = greedy_batch(model, prompts, max_new_tokens, stop_ids=newline_ids(tok), progress=bar)
    answers = []
    for new in generated:
        text = tok.decode(new).split("\n")[0]
        answers.append(text if text.strip() else tok.decode(new[:1]))
    return answers


def sea_activations(
    model,
    questions: Sequence[MCQuestion],
    fmt: PromptFormat,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Row-aligned last-token resid_post ``(base, pos, neg)``, each ``[N, n_layers, d]``.

    One row per (true, false) answer pair of each question; its base row is the question's greedy answer.
    """
    answers = greedy_answers(model, questions, fmt, max_new_tokens, progress)
    names = resid_names(model.cfg.n_layers)

    base_rows, pos_pairs, neg_pairs = [], [], []
    for i, q in enumerate(questions):
        for true, false in q.true_false_pairs():
            base_rows.append(i)
            pos_pairs.append((fmt.context(q), fmt.continuation(true)))
            neg_pairs.append((fmt.context(q), fmt.continuation(false)))
    if not base_rows:
        raise ValueError("SEA needs questions with at least one true and one false answer")
    # Greedy answers are scored as generated (they already start with the model's own space, if any).
    base_pairs = [(fmt.context(q), a) for q, a in zip(questions, answers, strict=True)]
    # Each distinct answer runs once; a pair's rows are gathered from those (an answer is in many pairs).
    unique = list(dict.fromkeys(base_pairs + pos_pairs + neg_pairs))
    acts = last_token_activations(model, unique, names, batch_size, progress=progress)
    stacked = torch.stack([acts.pop(n) for n in names], dim=1)  # [unique, layers, d]
    where = {p: i for i, p in enumerate(unique)}

    def rows(pairs):
        return stacked[torch.tensor([where[p] for p in pairs])]

    return rows(base_pairs)[torch.tensor(base_rows)], rows(pos_pairs), rows(neg_pairs)


@register
class SEAEditor(Editor):
    method = "sea"
    config_cls = SEAConfig

    def expected_shapes(self) -> dict[str, Shape]:
        """Per layer, the kept and the tail spectral bases, each ``[d_model, rank]`` (any rank)."""
        return {
            f"layer{layer}.{name}": (self.d_model, None) for layer in self.config.layers for name in ("keep", "tail")
        }

    def projections(self, layer: int) -> tuple[Tensor, Tensor]:
        keys = (f"layer{layer}.keep", f"layer{layer}.tail")
        missing = [k for k in keys if k not in self.tensors]
        if missing:
            raise ValueError(f"SEA editor state is missing tensors {missing}")
        return self.tensors[keys[0]], self.tensors[keys[1]]

    def edit_fn(self, layer: int, device):
        """``h [..., d]`` after the spectral edit (float32 math, input dtype out)."""
        keep, tail = (t.to(device, torch.float32) for t in self.projections(layer))
        d = keep.shape[0]
        if keep.shape[1] + tail.shape[1] > d // 2:
            # Ranks past d/2: one d x d matmul with the summed projection costs less than four thin ones.
            dense = keep @ keep.T + tail @ tail.T

            def project(x):
                return x @ dense
        else:

            def project(x):
                return (x @ keep) @ keep.T + (x @ tail) @ tail.T

        l2 = self.config.normalize == "l2_norm"

        def edit(h: Tensor) -> Tensor:
            x = h.float()
            edited = project(x)
            if l2:
                edited = edited * (x.norm(dim=-1, keepdim=True) / edited.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            else:
                edited = edited / 2
            return edited.to(h.dtype)

        return edit

    def hooks(self, model) -> list[Hook]:
        for layer in self.config.layers:
            self.projections(layer)  # fail before anything attaches
        return self.resid_post_hooks(model, self.config.layers)


# ------------------------------------------------------------------------------------------------ in a run


@dataclass(frozen=True)
class SEASettings:
    k_ratio: float = field(default=0.998, metadata={"help": "explained-variance cutoff of the spectra"})
    max_new_tokens: int = field(default=32, metadata={"help": "length limit of the greedy base answers"})

    def __post_init__(self):
        if not 0 < self.k_ratio <= 1:
            raise ValueError(f"sea.k_ratio must be in (0, 1], got {self.k_ratio!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"sea.max_new_tokens must be a whole number >= 1, got {self.max_new_tokens!r}")


def fit_step(fit: FitContext) -> None:
    if fit.done("sea"):
        return
    settings: SEASettings = fit.settings["sea"]
    base, pos, neg = sea_activations(
        fit.model, fit.parts["train"], fit.fmt, settings.max_new_tokens, fit.batch_size, fit.progress
    )
    fit.save("sea", fit_sea(base, pos, neg, last_layers(fit.model.cfg.n_layers), settings.k_ratio))


register_method(
    Method(
        name="sea",
        summary="Spectral Editing of Activations: project onto the positive and off the negative spectra",
        labels=("sea",),
        colours={"sea": "#F0E442"},
        order=40,
        fit=fit_step,
        settings=SEASettings,
        flat_settings={"sea_k_ratio": "k_ratio", "sea_max_new_tokens": "max_new_tokens"},
    )
)
