"""Diagnostics of a built toy world: does it hold what activation editing needs?

For the default (or any) :class:`ToyWorldConfig` this measures, on the seeded 40/10/50 question split:

* the build: time per step (corpus, tokenizer, training), final training loss;
* base MC1/MC2, overall and on contested / uncontested entities, and how often a wrong contested answer
  is the popular falsehood (imitative falsehood);
* the knowledge ceiling: the same questions after the truthful source's header;
* per-layer accuracy of the bias-free probe at the answer tokens (fitted on train, read on val and test).

World design is tuned on ``val`` only; ``test`` is reported, never used to choose.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from hpr import activations, evaluate, metrics
from hpr.data import apply_split, split_groups, split_ids
from hpr.sources import prompt_format
from hpr.toyworld.world import ToyWorldConfig, build_world, mc_dataset

FRACTIONS = (0.4, 0.1, 0.5)
SPLIT_SEED = 0


def toy_split(config: ToyWorldConfig, seed: int = SPLIT_SEED) -> dict:
    questions = mc_dataset(build_world(config))
    return apply_split(questions, split_ids([q.id for q in questions], FRACTIONS, seed, split_groups(questions)))


def mc_breakdown(predictions: pd.DataFrame, questions) -> dict:
    """MC1/MC2 overall, on contested and on uncontested questions, and the popular-falsehood share.

    ``popular_false_share``: among contested questions answered wrongly (MC1), the fraction whose top
    choice is the popular falsehood (the toy dataset puts it second, right after the true answer).
    """
    contested = {q.id: bool(q.meta.get("contested")) for q in questions}
    popular = {q.id: q.mc1[1].text for q in questions if contested[q.id]}
    scores = metrics.question_scores(predictions)
    scores["contested"] = scores["question_id"].map(contested)
    out: dict[str, object] = {}
    for name, rows in (
        ("all", scores),
        ("contested", scores[scores.contested]),
        ("uncontested", scores[~scores.contested]),
    ):
        out[name] = {"mc1": float(rows.mc1.mean()), "mc2": float(rows.mc2.mean()), "n": len(rows)}
    mc1 = predictions[predictions.task == "mc1"]
    top = mc1.loc[mc1.groupby(["method", "question_id"], sort=False)["loglik"].idxmax()]
    wrong = top[~top.is_true & top.question_id.isin(popular)]
    out["popular_false_share"] = (
        float((wrong.choice == wrong.question_id.map(popular)).mean()) if len(wrong) else float("nan")
    )
    return out


def diagnose(config: ToyWorldConfig, progress: bool = True, batch_size: int = 32) -> dict:
    """Build (or find) the world's model and measure it. Returns a JSON-ready dict."""
    from hpr.editors.hpr import HPREditor, HPRTrainConfig, fit_layerwise, probe_accuracy, top_k_layers
    from hpr.toyworld.build import ensure_built, load_built

    folder = ensure_built(config, progress=progress)
    build = json.loads((folder / "build.json").read_text())
    t0 = time.perf_counter()
    model = load_built(folder)
    load_s = time.perf_counter() - t0
    parts = toy_split(config)
    neutral, truthful = prompt_format("toy"), prompt_format("toy", truthful=True)

    report: dict = {
        "world_key": config.key(),
        "config": build["config"],
        "build_timings_s": {k: round(v, 1) for k, v in build["timings"].items()},
        "final_loss": round(build["final_loss"], 4),
        "load_s": round(load_s, 2),
    }
    for name in ("val", "test"):
        qs = parts[name]
        report[f"base_{name}"] = mc_breakdown(evaluate.predictions(model, qs, neutral, "base", None, batch_size), qs)
        report[f"ceiling_{name}"] = mc_breakdown(
            evaluate.predictions(model, qs, truthful, "base", None, batch_size), qs
        )

    with tempfile.TemporaryDirectory() as tmp:
        pairs = {}
        for name in ("train", "val", "test"):
            activations.collect(model, parts[name], neutral, Path(tmp) / name, batch_size=batch_size, load_result=False)
            pos, neg, _ = activations.load(Path(tmp) / name).token_pairs()
            pairs[name] = (pos, neg)
        net = fit_layerwise(*pairs["train"], HPRTrainConfig(), progress=progress)
        report["probe_accuracy"] = {
            name: [round(a, 3) for a in probe_accuracy(net.probe.detach(), *pairs[name])]
            for name in ("train", "val", "test")
        }
    layers = top_k_layers(report["probe_accuracy"]["val"], HPRTrainConfig().top_k)
    report["hpr_layers"] = list(layers)
    for method, no_angle in (("hpr", False), ("hpr_no_angle", True)):
        editor = HPREditor.from_layerwise(net, layers, no_angle=no_angle)
        for name in ("val", "test"):
            qs = parts[name]
            preds = pd.concat(
                [
                    evaluate.predictions(model, qs, neutral, "base", None, batch_size),
                    evaluate.predictions(model, qs, neutral, method, editor, batch_size),
                ]
            )
            row = mc_breakdown(preds[preds.method == method], qs)
            row["flips"] = metrics.flip_rates(metrics.question_scores(preds))[method]
            report[f"{method}_{name}"] = row
    return report


def format_report(report: dict) -> str:
    """The diagnostics as a short human-readable table."""

    def mc(d):
        return (
            f"MC1 {d['all']['mc1']:.3f}  MC2 {d['all']['mc2']:.3f}  "
            f"(contested {d['contested']['mc1']:.2f} / uncontested {d['uncontested']['mc1']:.2f}; "
            f"popular falsehood {d['popular_false_share']:.2f} of contested errors)"
        )

    timings = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in report["build_timings_s"].items())
    lines = [
        f"toy world {report['world_key']} (seed {report['config']['seed']})",
        f"  build: {timings}; final loss {report['final_loss']:.3f}; load {report['load_s']:.1f} s",
    ]
    for split in ("val", "test"):
        lines.append(f"  {split}:")
        lines.append(f"    base      {mc(report[f'base_{split}'])}")
        lines.append(f"    ceiling   {mc(report[f'ceiling_{split}'])}")
        for method in ("hpr", "hpr_no_angle"):
            row = report[f"{method}_{split}"]
            flips = row["flips"]
            lines.append(
                f"    {method:<9} {mc(row)}  f->t {flips['false_to_true']:.3f}  t->f {flips['true_to_false']:.3f}"
            )
    acc = report["probe_accuracy"]
    lines.append(
        "  probe accuracy by layer: "
        + "; ".join(f"{s} " + " ".join(f"{a:.2f}" for a in acc[s]) for s in ("train", "val", "test"))
    )
    lines.append(f"  HPR layers (top-k by val): {report['hpr_layers']}")
    return "\n".join(lines)


def seed_table(reports: list[dict]) -> str:
    """One markdown row per world seed: build time, base, ceiling, best val probe, HPR (test unless noted)."""
    head = (
        "| seed | build s | base MC1 | contested errors -> popular | ceiling MC1 | best val probe "
        "| HPR MC1 | HPR f->t / t->f | no-angle MC1 |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in reports:
        hpr_row, flips = r["hpr_test"], r["hpr_test"]["flips"]
        rows.append(
            f"| {r['config']['seed']} | {sum(r['build_timings_s'].values()):.0f} "
            f"| {r['base_test']['all']['mc1']:.3f} | {r['base_test']['popular_false_share']:.2f} "
            f"| {r['ceiling_test']['all']['mc1']:.3f} | {max(r['probe_accuracy']['val']):.3f} "
            f"| {hpr_row['all']['mc1']:.3f} | {flips['false_to_true']:.3f} / {flips['true_to_false']:.3f} "
            f"| {r['hpr_no_angle_test']['all']['mc1']:.3f} |"
        )
    return "\n".join(rows)
