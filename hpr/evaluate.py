"""Evaluation under an editor: per-choice log-likelihoods (MC1/MC2) and activation-norm statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import pandas as pd
import torch

from hpr.activations import resid_names
from hpr.data.prompts import PromptFormat
from hpr.data.schema import MCQuestion
from hpr.scoring import encode_all, pad_batch, pad_token_id, score


def _applied(editor, model):
    return editor.applied(model) if editor is not None else contextlib.nullcontext()


def predictions(model, questions: Sequence[MCQuestion], fmt: PromptFormat, method: str, editor=None,
                batch_size: int = 16, progress: bool = False) -> pd.DataFrame:
    """One row per (question, task, choice): ``method, question_id, task, choice, is_true, loglik``."""
    rows = [(q, task, c) for q in questions for task in ("mc1", "mc2") for c in getattr(q, task)]
    with _applied(editor, model):
        ll = score(model, [(fmt.context(q), fmt.continuation(c.text)) for q, _, c in rows], batch_size, progress)
    return pd.DataFrame({
        "method": method,
        "question_id": [q.id for q, _, _ in rows],
        "task": [t for _, t, _ in rows],
        "choice": [c.text for _, _, c in rows],
        "is_true": [c.is_true for _, _, c in rows],
        "loglik": ll,
    })


@torch.inference_mode()
def edit_norm_change(model, questions: Sequence[MCQuestion], fmt: PromptFormat, editor,
                     batch_size: int = 16) -> list[float]:
    """Per layer: mean over tokens of ``| ||h_out|| - ||h_in|| | / ||h_in||`` at ``hook_resid_post``.

    ``h_in`` is what the block computed at that hook in the edited forward pass, ``h_out`` what leaves the
    hook after the editor's own hook there: the norm change *caused by the edit at that layer*. Layers the
    editor does not touch at ``hook_resid_post`` read 0. Tokens: every position of prompt + true answer.
    """
    names = resid_names(model.cfg.n_layers)
    encoded = encode_all(model, [(fmt.context(q), fmt.continuation(q.mc1[0].text)) for q in questions])
    pad_id = pad_token_id(model)
    sums = torch.zeros(len(names), dtype=torch.float64)
    count = 0
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        ids, lengths = pad_batch(batch, pad_id)
        mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
        norms_in: dict[str, torch.Tensor] = {}
        change: dict[str, torch.Tensor] = {}

        def before(act, hook):
            norms_in[hook.name] = act.float().norm(dim=-1)

        def after(act, hook):
            n_in = norms_in[hook.name]
            change[hook.name] = (act.float().norm(dim=-1) - n_in).abs() / n_in.clamp_min(1e-12)

        with model.hooks(fwd_hooks=[(n, before) for n in names]):
            with _applied(editor, model):
                with model.hooks(fwd_hooks=[(n, after) for n in names]):
                    model(ids.to(model.cfg.device), return_type=None)
        for i, n in enumerate(names):
            sums[i] += change[n].cpu()[mask].double().sum()
        count += int(mask.sum())
    return (sums / count).tolist()


@torch.inference_mode()
def norm_change_vs_base(model, questions: Sequence[MCQuestion], fmt: PromptFormat, editor,
                        batch_size: int = 16) -> list[float]:
    """Per layer: mean over tokens of ``| ||h_edit|| - ||h_base|| | / ||h_base||`` at ``hook_resid_post``.

    ``h_base`` comes from an unedited pass, ``h_edit`` from the edited pass on the same tokens (every
    position of prompt + true answer), so this counts everything the edit does to the residual norm at that
    layer, including edits made inside attention (ITI) and the downstream effect of earlier edited layers.
    The base itself reads 0.
    """
    if editor is None:
        return [0.0] * model.cfg.n_layers
    names = resid_names(model.cfg.n_layers)
    encoded = encode_all(model, [(fmt.context(q), fmt.continuation(q.mc1[0].text)) for q in questions])
    pad_id = pad_token_id(model)
    sums = torch.zeros(len(names), dtype=torch.float64)
    count = 0
    for start in range(0, len(encoded), batch_size):
        ids, lengths = pad_batch(encoded[start : start + batch_size], pad_id)
        mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
        norms: dict[str, dict[str, torch.Tensor]] = {"base": {}, "edit": {}}

        def recorder(kind):
            def hook(act, hook):
                norms[kind][hook.name] = act.float().norm(dim=-1).cpu()
            return hook

        for kind in ("base", "edit"):
            # The editor's hooks attach first, so at a layer it edits the recorder sees the edited value.
            with _applied(editor if kind == "edit" else None, model):
                with model.hooks(fwd_hooks=[(n, recorder(kind)) for n in names]):
                    model(ids.to(model.cfg.device), return_type=None)
        for i, n in enumerate(names):
            base = norms["base"][n]
            rel = (norms["edit"][n] - base).abs() / base.clamp_min(1e-12)
            sums[i] += rel[mask].double().sum()
        count += int(mask.sum())
    return (sums / count).tolist()
