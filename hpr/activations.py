"""Residual-stream activations at the answer tokens, for probes and editors.

For every question and every answer of its MC2 set we run ``context + " " + answer`` once and keep
``blocks.{l}.hook_resid_post`` for every layer at the answer's tokens. Contrastive pairs are built from
these on load: for each (true, false) answer pair of a question, the i-th answer token of the true
answer is aligned with the i-th of the false one, truncated to the shorter (as the official HPR code).

On disk: ``<dir>/shard-00000.safetensors``, ... Each shard holds the answers of a block of questions:
``acts [tokens, layers, d_model]`` (float32 or float16) and ``offsets [answers + 1]``, with the answers'
(question id, is_true) in the safetensors metadata. Shards are written atomically and skipped on rerun,
so an interrupted collection resumes where it stopped.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from hpr.continuations import continuation_batches
from hpr.data.prompts import PromptFormat
from hpr.data.schema import MCQuestion
from hpr.encoding import Encoded, encode_all
from hpr.files import atomic_write

log = logging.getLogger(__name__)


def resid_names(n_layers: int) -> list[str]:
    return [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]


@torch.inference_mode()
def answer_activations(
    model, pairs: Sequence[tuple[str, str]], batch_size: int = 16, out: Tensor | None = None
) -> list[Tensor]:
    """For each ``(context, continuation)``: resid_post at its continuation tokens, ``[n_cont, layers, d]``.

    The answers' tokens are written, in order, into ``out`` (``[total answer tokens, layers, d]``, CPU, any
    float dtype; float32 allocated here if not given) and views of it are returned. Hooks copy only the
    answer positions of each layer as it is computed and the forward stops after the last block, so memory
    is one batch's activations plus ``out``: no cache of every position, no logits. Shared contexts run once
    (:mod:`hpr.continuations`).
    """
    encoded = encode_all(model, pairs)
    counts = [e.n_cont for e in encoded]
    starts = torch.tensor([0] + counts).cumsum(0).tolist()
    shape = (starts[-1], model.cfg.n_layers, model.cfg.d_model)
    if out is None:
        out = torch.empty(shape)
    if tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
    gather_continuations(model, encoded, resid_names(model.cfg.n_layers), out, batch_size)
    return [out[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]


def _copy_cells(into: Tensor, targets: Tensor, rows: Tensor, cols: Tensor):
    """A hook copying the activation at cells ``(rows, cols)`` into rows ``targets`` of ``into`` (a copy on the
    CPU: nothing keeps the batch alive)."""

    def hook(act, hook):
        into.index_copy_(0, targets, act[rows, cols].to("cpu", into.dtype))

    return hook


def gather_continuations(
    model,
    encoded: Sequence[Encoded],
    names: Sequence[str],
    out: Tensor,
    batch_size: int = 16,
    last_only: bool = False,
    progress=False,
) -> Tensor:
    """Write hook ``names[k]``'s activations at the continuation tokens of ``encoded`` into ``out[:, k]``.

    ``out`` is ``[total continuation tokens, len(names), *act_shape]`` (every token of every continuation,
    in order) or, with ``last_only``, ``[len(encoded), len(names), *act_shape]`` (each continuation's last
    token). Values are copied out of the hooks (``index_copy_``), so nothing keeps a batch alive; ``out`` may
    be any float dtype and lives on the CPU. Stops after the last hooked block: no logits. ``progress``: a
    bool (a bar of its own) or a tqdm bar to advance by answers done.
    """
    from tqdm.auto import tqdm

    if not torch.is_inference_mode_enabled() and torch.is_grad_enabled():
        raise RuntimeError("gather_continuations must run under torch.inference_mode() or torch.no_grad()")
    counts = [e.n_cont for e in encoded]
    starts = torch.tensor([0] + counts).cumsum(0)
    expected = len(encoded) if last_only else int(starts[-1])
    if len(out) != expected or out.shape[1] != len(names):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected ({expected}, {len(names)}, ...)")
    stop = 1 + max(_block_of(name) for name in names)
    own_bar = isinstance(progress, bool)
    bar = tqdm(total=len(encoded), disable=not progress, desc="activations", unit="answer") if own_bar else progress
    for batch in continuation_batches(model, encoded, batch_size, progress=bar):
        if last_only:
            rows, cols = batch.last_cells()
            targets = torch.tensor(batch.index)
        else:
            rows, cols = batch.continuation_cells(predicting=False)
            targets = torch.cat([torch.arange(int(starts[i]), int(starts[i + 1])) for i in batch.index])
        hooks = [(name, _copy_cells(out[:, k], targets, rows, cols)) for k, name in enumerate(names)]
        with model.hooks(fwd_hooks=hooks):
            batch.run(model, stop_at_layer=stop)
        del batch  # its row cache is freed before the next batch's is built
    if own_bar:
        bar.close()
    return out


def _block_of(hook_name: str) -> int:
    """``blocks.3.hook_resid_post`` -> 3: hooks beyond the last block are not supported here."""
    parts = hook_name.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise ValueError(f"{hook_name!r} is not a hook inside a transformer block")
    return int(parts[1])


@torch.inference_mode()
def last_token_activations(
    model, pairs: Sequence[tuple[str, str]], names: Sequence[str], batch_size: int = 16, progress: bool = False
) -> dict[str, Tensor]:
    """For each ``(context, continuation)``, every hook in ``names`` at the last continuation token.

    Returns ``{name: [len(pairs), *act_shape]}`` (float32, CPU). SEA and SADI fit on these, as their
    reference code does (the last token of prompt + answer). Identical pairs run once.
    """
    unique = list(dict.fromkeys(pairs))
    encoded = encode_all(model, unique)
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name in names:  # hooks of one shape are gathered in one pass
        by_shape.setdefault(_act_shape(model, name), []).append(name)
    where = {p: i for i, p in enumerate(unique)}
    rows = torch.tensor([where[p] for p in pairs])
    result = {}
    for shape, group in by_shape.items():
        stacked = gather_continuations(
            model,
            encoded,
            group,
            torch.empty(len(unique), len(group), *shape),
            batch_size,
            last_only=True,
            progress=progress,
        )
        result.update({name: stacked[rows, k] for k, name in enumerate(group)})  # copies: no view of stacked
    return {name: result[name] for name in names}


def _act_shape(model, name: str) -> tuple[int, ...]:
    """Per-token shape of a hook's activation (``d_model``, ``(n_heads, d_head)``, ``d_mlp``)."""
    cfg = model.cfg
    leaf = name.split(".", 2)[2]
    if leaf in ("attn.hook_z", "attn.hook_result"):
        return (cfg.n_heads, cfg.d_head)
    if leaf.startswith("mlp.hook_"):
        return (cfg.d_mlp,)
    return (cfg.d_model,)


@dataclass
class AnswerActivations:
    """All answers of a split: ``acts[offsets[j]:offsets[j+1]]`` are answer j's tokens."""

    acts: Tensor  # [tokens, layers, d_model], float32
    offsets: Tensor  # [answers + 1]
    question_ids: list[str]
    is_true: list[bool]

    def answer(self, j: int) -> Tensor:
        return self.acts[int(self.offsets[j]) : int(self.offsets[j + 1])]

    def token_is_true(self) -> Tensor:
        """``[tokens]``: whether each row of ``acts`` belongs to a true answer."""
        lengths = self.offsets[1:] - self.offsets[:-1]
        return torch.tensor(self.is_true, dtype=torch.bool).repeat_interleave(lengths)

    def token_pairs(self) -> tuple[Tensor, Tensor, Tensor]:
        """Aligned token pairs: ``pos [N, layers, d]``, ``neg [N, layers, d]`` and each row's question index.

        Materialised copies (a token is copied once per pair it is in): for small data. :meth:`token_pair_rows`
        gives the same rows without copying anything.
        """
        pos, neg, question = self.token_pair_rows()
        return pos[:], neg[:], question

    def token_pair_rows(self) -> tuple[Rows, Rows, Tensor]:
        """Aligned token pairs as :class:`Rows` of ``acts`` (no copies) and each pair's question index.

        For each (true, false) answer pair of a question, the i-th answer token of the true answer is aligned
        with the i-th of the false one, truncated to the shorter (as the official HPR code).
        """
        by_question: dict[str, tuple[list[int], list[int]]] = {}
        for j, (qid, truth) in enumerate(zip(self.question_ids, self.is_true, strict=True)):
            by_question.setdefault(qid, ([], []))[0 if truth else 1].append(j)
        pos_rows, neg_rows, q_rows = [], [], []
        for q, (trues, falses) in enumerate(by_question.values()):
            for t in trues:
                for f in falses:
                    a, b = int(self.offsets[t]), int(self.offsets[f])
                    n = min(int(self.offsets[t + 1]) - a, int(self.offsets[f + 1]) - b)
                    pos_rows.append(torch.arange(a, a + n))
                    neg_rows.append(torch.arange(b, b + n))
                    q_rows.append(torch.full((n,), q))
        if not pos_rows:
            raise ValueError("no (true, false) answer pairs: every question needs a true and a false answer")
        return Rows(self.acts, torch.cat(pos_rows)), Rows(self.acts, torch.cat(neg_rows)), torch.cat(q_rows)


class Rows:
    """Chosen rows of an activation tensor, gathered (as float32) only when indexed.

    ``rows[idx]`` is ``acts[index[idx]]``: it behaves like the ``[N, layers, d]`` tensor of those rows for
    indexing, ``len`` and ``shape``, without copying every row (a token is in many pairs; on a real model the
    copies of a training split's pairs alone would be several GB).
    """

    def __init__(self, acts: Tensor, index: Tensor):
        self.acts, self.index = acts, index

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.index), *self.acts.shape[1:]))

    @property
    def ndim(self) -> int:
        return self.acts.ndim

    def __getitem__(self, idx) -> Tensor:
        return self.acts[self.index[idx]].float()


QUESTIONS_PER_SHARD = 64


def shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.safetensors"


def shard_count(n_questions: int, questions_per_shard: int = QUESTIONS_PER_SHARD) -> int:
    """How many shards :func:`collect` writes for ``n_questions``."""
    return -(-n_questions // questions_per_shard)


def collect(
    model,
    questions: Sequence[MCQuestion],
    fmt: PromptFormat,
    folder: Path,
    questions_per_shard: int = QUESTIONS_PER_SHARD,
    batch_size: int = 16,
    fp16: bool = False,
    progress: bool = False,
    load_result: bool = True,
) -> AnswerActivations | None:
    """Collect (or resume collecting) the answer activations of ``questions`` into ``folder``.

    Returns them loaded (:func:`load`), or None with ``load_result=False`` (only the shards are written).
    """
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    blocks = [questions[i : i + questions_per_shard] for i in range(0, len(questions), questions_per_shard)]
    buffer = acts = tensors = None
    bar = tqdm(
        total=sum(len(q.mc2) for q in questions), desc=f"activations {folder.name}", disable=not progress, unit="answer"
    )
    for k, block in enumerate(blocks):
        path = shard_path(folder, k)
        expected = [q.id for q in block for _ in q.mc2]
        if path.exists() and _shard_is_intact(path, expected, model.cfg):
            bar.update(len(expected))
            continue
        pairs = [(fmt.context(q), fmt.continuation(c.text)) for q in block for c in q.mc2]
        encoded = encode_all(model, pairs)
        counts = [e.n_cont for e in encoded]
        # Written straight into the stored dtype (no float32 copy on the way), in one buffer reused by every
        # shard (a fresh shard-sized allocation each time fragments the heap and holds on to its memory).
        if buffer is None or len(buffer) < sum(counts):
            buffer = None
            buffer = torch.empty(
                sum(counts), model.cfg.n_layers, model.cfg.d_model, dtype=torch.float16 if fp16 else torch.float32
            )
        acts = buffer[: sum(counts)]
        with torch.inference_mode():  # no graph: collection only reads the model
            gather_continuations(model, encoded, resid_names(model.cfg.n_layers), acts, batch_size, progress=bar)
        meta = {"question_ids": expected, "is_true": [c.is_true for q in block for c in q.mc2]}
        tensors = {"acts": acts, "offsets": torch.tensor([0] + counts).cumsum(0)}
        atomic_write(path, functools.partial(save_file, tensors, metadata={"answers": json.dumps(meta)}))
    bar.close()
    buffer = acts = tensors = None  # freed before load allocates the result
    for stale in range(len(blocks), 1 << 30):  # shards of a longer earlier run
        if not shard_path(folder, stale).exists():
            break
        shard_path(folder, stale).unlink()
    return load(folder) if load_result else None


def _shard_is_intact(path: Path, expected_ids: list[str], cfg) -> bool:
    """Whether a shard on disk is readable and holds ``expected_ids``'s answers for a model of ``cfg``'s shape.

    A damaged shard (truncated, garbage, another model's) is a cache: it is reported and rebuilt."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["answers"])
            shape = f.get_slice("acts").get_shape()
            offsets = f.get_tensor("offsets")
        intact = (
            meta["question_ids"] == expected_ids
            and len(offsets) == len(expected_ids) + 1
            and list(shape[1:]) == [cfg.n_layers, cfg.d_model]
            and int(offsets[-1]) == shape[0]
        )
    except Exception as e:  # noqa: BLE001 - safetensors' own error types, JSON, missing keys: all mean damaged
        log.warning("%s is damaged (%s); collecting it again", path, e)
        return False
    if not intact and meta["question_ids"] == expected_ids:
        log.warning("%s does not match this model's shape; collecting it again", path)
    return intact


def _shard_meta(path: Path) -> dict:
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["answers"])


_READ_BYTES = 16 << 20  # per read when loading a shard


def shard_paths(folder: Path) -> list[Path]:
    """The shards of ``folder`` in order; each holds whole questions (every pair of a question is in one)."""
    paths: list[Path] = []
    while shard_path(folder, len(paths)).exists():
        paths.append(shard_path(folder, len(paths)))
    if not paths:
        raise FileNotFoundError(f"no activation shards in {folder}")
    return paths


def load_shards(folder: Path):
    """Each shard of ``folder`` loaded on its own, one at a time: for statistics that need no more than a
    question's answers together (probe accuracy), so memory is one shard, not the split."""
    for path in shard_paths(folder):
        yield _load_paths([path])


def load(folder: Path) -> AnswerActivations:
    """Every shard of ``folder`` in one float32 tensor, allocated once (memory: the result + one shard's pages)."""
    return _load_paths(shard_paths(folder))


def _load_paths(paths: list[Path]) -> AnswerActivations:
    shapes = []
    for path in paths:
        with safe_open(path, framework="pt") as f:
            shapes.append(f.get_slice("acts").get_shape())
    acts = torch.empty(sum(s[0] for s in shapes), *shapes[0][1:])
    offsets, qids, truths = [], [], []
    base = 0
    for path, shape in zip(paths, shapes, strict=True):
        step = max(1, _READ_BYTES // (acts[0].numel() * acts.element_size()))
        for a in range(0, shape[0], step):
            # The file is memory-mapped while open and the pages read count as ours until it closes: one
            # open per slice keeps that to a slice, not a shard.
            with safe_open(path, framework="pt") as f:
                acts[base + a : base + min(shape[0], a + step)].copy_(f.get_slice("acts")[a : a + step])
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["answers"])
            offsets.append(f.get_tensor("offsets")[:-1] + base)
        base += shape[0]
        qids += meta["question_ids"]
        truths += meta["is_true"]
    offsets.append(torch.tensor([base]))
    return AnswerActivations(acts, torch.cat(offsets), qids, truths)
