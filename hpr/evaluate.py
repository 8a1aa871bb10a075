"""Evaluation under an editor: per-choice log-likelihoods (MC1/MC2) and activation-norm statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import pandas as pd
import torch
from torch import Tensor

from hpr.activations import resid_names
from hpr.continuations import continuation_batches
from hpr.data.prompts import PromptFormat, best_answer_texts
from hpr.data.schema import MCQuestion
from hpr.editors.base import applied_if_any
from hpr.encoding import Encoded, encode_all
from hpr.scoring import score


def predictions(
    model,
    questions: Sequence[MCQuestion],
    fmt: PromptFormat,
    method: str,
    editor=None,
    batch_size: int = 16,
    progress: bool = False,
    alongside=None,
) -> pd.DataFrame:
    """One row per (question, task, choice): ``method, question_id, task, choice, is_true, loglik``.
    ``alongside``: as :func:`hpr.scoring.score`'s."""
    rows = [(q, task, c) for q in questions for task in ("mc1", "mc2") for c in getattr(q, task)]
    pairs = [(fmt.context(q), fmt.continuation(c.text)) for q, _, c in rows]
    with applied_if_any(editor, model):
        ll = score(model, pairs, batch_size, progress, alongside=alongside)
    return pd.DataFrame(
        {
            "method": method,
            "question_id": [q.id for q, _, _ in rows],
            "task": [t for _, t, _ in rows],
            "choice": [c.text for _, _, c in rows],
            "is_true": [c.is_true for _, _, c in rows],
            "loglik": ll,
        }
    )


class _NormRecorder:
    """``||h||`` at ``hook_resid_post`` of every layer, at the tokens of the continuations of ``encoded``, both
    as the block computed it (``before``) and as it leaves the hook after an editor's own hook (``after``);
    only while :meth:`read` runs a batch, so other passes through the same hooks record nothing."""

    def __init__(self, model, encoded: Sequence[Encoded]):
        self.names = resid_names(model.cfg.n_layers)
        self.starts = torch.tensor([0] + [e.n_cont for e in encoded]).cumsum(0)
        self.before = torch.empty(int(self.starts[-1]), len(self.names))
        self.after = torch.empty_like(self.before)
        self.reading: dict = {}  # the batch's cells while it runs; empty otherwise

    def _hook(self, store: Tensor, k: int):
        def hook(act, hook):
            if self.reading:
                norms = act[self.reading["rows"], self.reading["cols"]].float().norm(dim=-1)
                store[:, k].index_copy_(0, self.reading["targets"], norms.cpu())

        return hook

    @contextlib.contextmanager
    def around(self, model, editor) -> Iterator[None]:
        """The recorders attached with ``editor``'s hooks between them, so they see its input and its output."""
        with model.hooks(fwd_hooks=[(n, self._hook(self.before, k)) for k, n in enumerate(self.names)]):
            with applied_if_any(editor, model):
                with model.hooks(fwd_hooks=[(n, self._hook(self.after, k)) for k, n in enumerate(self.names)]):
                    yield

    def read(self, model, batch) -> None:
        """Run ``batch`` (built ``for_scoring=False``) and record its continuation tokens' norms."""
        rows, cols = batch.continuation_cells(predicting=False)
        starts = self.starts
        targets = torch.cat([torch.arange(int(starts[i]), int(starts[i + 1])) for i in batch.index])
        self.reading.update(rows=rows, cols=cols, targets=targets)
        try:
            batch.run(model, stop_at_layer=model.cfg.n_layers)
        finally:
            self.reading.clear()


@torch.inference_mode()
def answer_norms(
    model, questions: Sequence[MCQuestion], fmt: PromptFormat, editor=None, batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """``||h||`` at ``hook_resid_post`` of every layer at each true answer's tokens, ``(before, after)``.

    Both ``[tokens, layers]`` from one pass with ``editor`` applied: ``before`` is what the block computed at
    the hook, ``after`` what leaves it after the editor's own hook there (equal where the editor does not
    act at ``hook_resid_post``). Contexts run once each (:mod:`hpr.continuations`) and the norms are taken
    at the answer tokens only: the tokens that are scored, and the ones every editor edits.
    """
    encoded = encode_all(model, best_answer_texts(questions, fmt))
    recorder = _NormRecorder(model, encoded)
    with recorder.around(model, editor):
        for batch in continuation_batches(model, encoded, batch_size):
            recorder.read(model, batch)
    return recorder.before, recorder.after


@torch.inference_mode()
def predictions_and_norms(
    model,
    questions: Sequence[MCQuestion],
    fmt: PromptFormat,
    method: str,
    editor=None,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[pd.DataFrame, Tensor, Tensor]:
    """:func:`predictions` and :func:`answer_norms` from one run of the contexts: each chunk of contexts goes
    through the model once for the choices' scores and the best answers' norms (``score``'s ``alongside``).
    The same chunks, rows and caches as the two calls apart, so the same values to the bit, with the contexts'
    passes done once instead of twice."""
    best = encode_all(model, best_answer_texts(questions, fmt))
    recorder = _NormRecorder(model, best)
    with recorder.around(model, editor):  # the editor goes on between the recorders, not in predictions()
        df = predictions(
            model,
            questions,
            fmt,
            method,
            None,
            batch_size,
            progress,
            alongside=(best, lambda b: recorder.read(model, b)),
        )
    return df, recorder.before, recorder.after


def _mean_relative_change(new: torch.Tensor, old: torch.Tensor) -> list[float]:
    """Per layer: mean over tokens of ``|new - old| / old`` (norms ``[tokens, layers]``)."""
    return ((new.double() - old.double()).abs() / old.double().clamp_min(1e-12)).mean(0).tolist()


def edit_norm_change(
    model, questions: Sequence[MCQuestion], fmt: PromptFormat, editor, batch_size: int = 16
) -> list[float]:
    """Per layer: mean over true-answer tokens of ``| ||h_out|| - ||h_in|| | / ||h_in||`` at ``hook_resid_post``.

    ``h_in`` is what the block computed at that hook in the edited forward pass, ``h_out`` what leaves the
    hook after the editor's own hook there: the norm change *caused by the edit at that layer*. Layers the
    editor does not touch at ``hook_resid_post`` read 0.
    """
    before, after = answer_norms(model, questions, fmt, editor, batch_size)
    return _mean_relative_change(after, before)


def norm_change_vs_base(
    model,
    questions: Sequence[MCQuestion],
    fmt: PromptFormat,
    editor,
    batch_size: int = 16,
    base_norms: torch.Tensor | None = None,
) -> list[float]:
    """Per layer: mean over true-answer tokens of ``| ||h_edit|| - ||h_base|| | / ||h_base||`` at ``hook_resid_post``.

    ``h_base`` comes from an unedited pass (``base_norms``: its ``answer_norms(...)[1]``, computed here if not
    given), ``h_edit`` from the edited pass on the same tokens, so this counts everything the edit does to the
    residual norm at that layer, including edits made inside attention (ITI) and the downstream effect of
    earlier edited layers. The base itself reads 0.
    """
    if editor is None:
        return [0.0] * model.cfg.n_layers
    if base_norms is None:
        base_norms = answer_norms(model, questions, fmt, None, batch_size)[1]
    return _mean_relative_change(answer_norms(model, questions, fmt, editor, batch_size)[1], base_norms)
