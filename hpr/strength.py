"""Strength curves: what each method gains and costs as its strength goes from 0 (the unedited model) up, on the
validation split only (the test split is scored once per method, at the strength its fit chose).

Each method's strength is the config field behind :meth:`hpr.editors.base.Editor.with_strength`: ITI's alpha,
CAA's multiplier, Diff's scale, SADI's delta, and for HPR and its ablation a scale on the rotation angle (our
addition: the official code has none; 0 = the unedited model, 1 = as trained). At each strength: val MC1 and
MC2, KL(base || edited) on the run's neutral text (:mod:`hpr.capability`), and, when asked for
(:func:`answers_scorer`), the truthfulness of greedy val answers as lm-eval's ``truthfulqa_gen`` scores them
(BLEU and ROUGE-L ``acc``) with their informativeness (:data:`ANSWER_METRICS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from hpr import capability, evaluate, metrics
from hpr.editors.base import Editor

# Per label pattern, the strengths of its curve (the fitted editor's own strength is added to them).
STRENGTHS: dict[str, tuple[float, ...]] = {
    "hpr": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25),
    "hpr_answer": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25),
    "hpr_no_angle": (0.0, 0.25, 0.5, 0.75, 1.0),
    "iti": (0.0, 5.0, 15.0, 50.0, 100.0, 200.0),
    "caa": (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
    "diff": (0.0, 0.25, 0.5, 1.0, 1.5, 2.0),
    "sadi": (0.0, 1.0, 2.0, 5.0, 10.0, 20.0),
}


# What :func:`answers_scorer` records per strength, from :func:`hpr.gen_scoring.summarize`.
ANSWER_METRICS = ("bleu_acc", "rougeL_acc", "rougeL_acc_informative", "non_answer_rate", "degenerate_rate")


def answers_scorer(model, questions: Sequence, fmt, max_new_tokens: int = 64, batch_size: int = 16):
    """A function ``(label, editor) -> {metric: value}`` for :func:`curves`' ``answers_score``: greedy answers to
    ``questions`` under the editor (:func:`hpr.answers.greedy_answers`), scored as the run's generation step
    scores its test answers, :data:`ANSWER_METRICS` kept."""
    from hpr import answers, gen_scoring

    def score(label: str, editor: Editor | None) -> dict[str, float]:
        completions = answers.greedy_answers(model, questions, fmt, editor, max_new_tokens, batch_size)
        summary = gen_scoring.summarize(answers.scored(completions.assign(method=label), questions))[label]
        return {k: summary[k] for k in ANSWER_METRICS}

    return score


def grid_of(label: str, editor) -> tuple[float, ...]:
    """The strengths of ``label``'s curve, with the fitted editor's own strength among them; () when its editor
    has no strength (LoRA, representation tuning, SEA)."""
    if editor is None or editor.strength is None:
        return ()
    key = "iti" if label.startswith("iti") else label
    return tuple(sorted({*STRENGTHS.get(key, ()), fitted_strength(editor)}))


def fitted_strength(editor: Editor) -> float:
    """The strength an editor was fitted (or chosen on val) at."""
    assert editor.strength is not None
    return float(getattr(editor.config, editor.strength))


def curves(
    model,
    questions: Sequence,
    fmt,
    editors: Mapping[str, Editor],
    neutral: Sequence[Sequence[int]],
    batch_size: int = 16,
    answers_score=None,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per (method, strength): ``method, strength, fitted`` (the fit's own strength), ``mc1, mc2`` on
    ``questions`` (the val split), ``kl`` on the encoded ``neutral`` passages and, with ``answers_score``
    (a function ``(label, editor) -> dict`` of generation metrics), its columns."""
    from tqdm.auto import tqdm

    points = {
        f"{label}@{s:g}": (label, s, editor.with_strength(s))
        for label, editor in editors.items()
        for s in grid_of(label, editor)
    }
    kls = capability.measure(model, neutral, {key: edited for key, (_, _, edited) in points.items()})  # base once
    rows = []
    for key, (label, s, edited) in tqdm(points.items(), disable=not progress, desc="strength curves", unit="setting"):
        preds = evaluate.predictions(model, questions, fmt, label, edited, batch_size)
        mc = metrics.summarize(metrics.question_scores(preds))[label]
        row = {"method": label, "strength": s, "fitted": s == fitted_strength(editors[label])}
        row |= {"mc1": mc["mc1"], "mc2": mc["mc2"], "kl": kls[key]["kl"]}
        if answers_score is not None:
            row |= answers_score(label, edited)
        rows.append(row)
    return pd.DataFrame(rows)
