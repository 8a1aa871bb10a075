"""End to end: ``hpr reproduce`` on a tiny toy world writes a complete, self-consistent run folder."""

import json

import pandas as pd
import pytest
import torch

from hpr import metrics
from hpr.cli import main
from hpr.editors import default_labels


def test_reproduce_tiny_toy(tiny_toy, tmp_path):
    out = tmp_path / "run"
    assert main(["reproduce", "--model", "toy", "--dataset", "toy", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert sum(results["splits"].values()) == 32 and results["splits"]["test"] == 16
    assert results["n_layers"] == 2
    assert len(results["probe_accuracy"]["val"]) == 2 and len(results["probe_accuracy"]["test"]) == 2
    assert results["selected_layers"] == [0, 1]  # top-5 capped by the layer count
    assert results["toy_world"]["key"] == tiny_toy.key()  # which world (version, seed, config) built the model
    assert results["toy_world"]["config"]["seed"] == tiny_toy.seed
    methods = set(default_labels())
    assert {"base", "hpr", "hpr_no_angle", "iti15", "iti200", "caa", "diff", "sea", "sadi"} <= methods
    assert set(results["methods"]) == methods
    assert 0 <= results["toy_ceiling"]["mc1"] <= 1  # the base model scored after a truthful-source header
    assert set(results["flip_rates"]["hpr"]) == {"false_to_true", "true_to_false", "remains_true", "remains_false"}
    assert sum(results["flip_rates"]["hpr"].values()) == pytest.approx(1.0)
    # Norms: the base is untouched; HPR preserves norms at the layers it edits; against the base pass,
    # ITI at alpha 200 moves norms more than at alpha 15 (same heads, same directions).
    assert results["norm_change"]["base"] == [0.0, 0.0]
    for method in ("hpr", "hpr_no_angle", "sea"):  # norm-preserving edits at their own hook
        assert max(results["norm_change"][method]) <= 1e-5
    vs_base = results["norm_change_vs_base"]
    assert set(vs_base) == methods and vs_base["base"] == [0.0, 0.0]
    assert vs_base["hpr"][0] <= 1e-5  # the first edited layer has an unedited input
    assert all(a > b for a, b in zip(vs_base["iti200"], vs_base["iti15"], strict=True))
    probes = json.loads((out / "probes.json").read_text())  # HPR keeps its best epoch on val, as the official code
    kept = probes["epoch_val_accuracy"][probes["kept_epoch"] - 1]
    assert len(probes["epoch_val_accuracy"]) == 5 and kept == max(probes["epoch_val_accuracy"])
    assert sum(probes["accuracy"]["val"]) / 2 == pytest.approx(kept)  # the kept probe is the one reported
    heads = json.loads((out / "iti_heads.json").read_text())
    assert len(heads["heads"]) == 4  # K = 48 capped by 2 layers x 2 heads
    caa_layers = json.loads((out / "caa_layer_sweep.json").read_text())  # CAA: one layer, chosen on val
    caa = json.loads((out / "editors" / "caa" / "config.json").read_text())["config"]
    assert caa["layers"] == [caa_layers["chosen"]["layer"]] and caa["positions"] == "from_prompt_end"
    assert {row["layer"] for row in caa_layers["val"]} == set(results["selected_layers"])
    for method in ("caa", "sadi"):  # tuned on val only; the sweep is kept
        sweep = json.loads((out / f"{method}_sweep.json").read_text())
        assert sweep["chosen"] in sweep["val"] and len(sweep["val"]) > 1

    preds = pd.read_parquet(out / "predictions.parquet")
    assert list(preds.columns) == ["method", "question_id", "task", "choice", "is_true", "loglik"]
    assert set(preds.method) == methods
    recomputed = metrics.summarize(metrics.question_scores(preds))
    for method, row in results["methods"].items():
        for key in ("mc1", "mc2", "mc1_stderr", "mc2_stderr"):
            assert row[key] == pytest.approx(recomputed[method][key])
    for name in methods - {"base"}:
        assert (out / "editors" / name / "config.json").exists()
        assert (out / "editors" / name / "state.safetensors").exists()

    # What each edit costs on neutral text (the toy model's held-out corpus): the base is the reference.
    costs = results["capability"]
    assert set(costs) == methods and costs["base"]["kl"] == 0.0 and costs["base"]["ppl_change"] == 0.0
    assert all(costs[m]["kl"] > 0 for m in methods - {"base"})
    assert results["neutral_text"]["passages"] == 32 and results["neutral_text"]["path"] == "toy world corpus"
    assert all(c["tokens"] == results["neutral_text"]["predictions"] for c in costs.values())

    # Greedy test answers of every method, scored as lm-eval's truthfulqa_gen, beside how informative they are.
    gen = results["generation"]
    assert set(gen) == methods and all(
        0 <= g["rougeL_acc"] <= 1 and 0 <= g["non_answer_rate"] <= 1 for g in gen.values()
    )
    assert all(g["n"] == 16 for g in gen.values())
    answers = pd.read_parquet(out / "answers.parquet")
    assert len(answers) == 16 * len(methods) and {"completion", "bleu_acc", "rougeL_max", "non_answer"} <= set(answers)
    assert answers.groupby("method")["rougeL_acc"].mean().to_dict() == pytest.approx(
        {m: gen[m]["rougeL_acc"] for m in methods}
    )
    assert results["generation_settings"]["stop"][0] == "\n"  # the toy primer's delimiter between examples

    # A rerun resumes: finished steps are skipped and give the same results.
    before = (out / "predictions" / "hpr.parquet").stat().st_mtime_ns
    answered = (out / "predictions" / "hpr.answers.parquet").stat().st_mtime_ns
    assert main(["reproduce", "--model", "toy", "--dataset", "toy", "--out", str(out), "--quiet"]) == 0
    assert (out / "predictions" / "hpr.parquet").stat().st_mtime_ns == before
    assert (out / "predictions" / "hpr.answers.parquet").stat().st_mtime_ns == answered
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]
    assert json.loads((out / "results.json").read_text())["capability"] == costs


def test_reproduce_refuses_other_settings_in_same_folder(tiny_toy, tmp_path):
    out = tmp_path / "run"
    assert main(["reproduce", "--out", str(out), "--quiet", "--methods", "base"]) == 0
    assert main(["reproduce", "--out", str(out), "--quiet", "--seed", "3"]) == 2


def test_a_rerun_with_more_methods_extends_the_run(tiny_toy, tmp_path):
    out = tmp_path / "run"
    assert main(["reproduce", "--out", str(out), "--quiet", "--methods", "base,hpr"]) == 0
    probes = (out / "probes.json").stat().st_mtime_ns
    hpr_preds = (out / "predictions" / "hpr.parquet").stat().st_mtime_ns
    hpr_norms = (out / "predictions" / "hpr.norms.safetensors").stat().st_mtime_ns
    hpr_cost = (out / "capability" / "hpr.json").stat().st_mtime_ns
    first = json.loads((out / "results.json").read_text())
    assert main(["reproduce", "--out", str(out), "--quiet", "--methods", "base,hpr,caa"]) == 0
    assert (out / "probes.json").stat().st_mtime_ns == probes  # shared steps are not redone
    assert (out / "predictions" / "hpr.parquet").stat().st_mtime_ns == hpr_preds
    assert (out / "predictions" / "hpr.norms.safetensors").stat().st_mtime_ns == hpr_norms
    assert (out / "capability" / "hpr.json").stat().st_mtime_ns == hpr_cost  # only CAA's cost is measured
    again = json.loads((out / "results.json").read_text())
    assert again["capability"]["hpr"] == first["capability"]["hpr"] and again["capability"]["caa"]["kl"] > 0
    assert again["norm_change_vs_base"]["hpr"] == first["norm_change_vs_base"]["hpr"]
    assert set(json.loads((out / "results.json").read_text())["methods"]) == {"base", "hpr", "caa"}


def test_hpr_answer_is_the_trained_hpr_at_the_answer_tokens(tiny_toy, tmp_path):
    """Asked for by name, ``hpr_answer`` joins a finished run without retraining: HPR's own tensors, edited only at
    the answer tokens (scoring) and the newest token (generation), scored, answered and costed like any label."""
    from hpr.editors.base import load_editor

    out = tmp_path / "run"
    assert main(["reproduce", "--out", str(out), "--quiet", "--methods", "base,hpr"]) == 0
    probes = (out / "probes.json").stat().st_mtime_ns
    assert main(["reproduce", "--out", str(out), "--quiet", "--methods", "base,hpr,hpr_answer"]) == 0
    assert (out / "probes.json").stat().st_mtime_ns == probes  # HPR is not trained again
    hpr, variant = load_editor(out / "editors" / "hpr"), load_editor(out / "editors" / "hpr_answer")
    assert hpr.config.positions == "all" and variant.config.positions == "answer"
    assert variant.config.layers == hpr.config.layers
    assert (
        all(torch.equal(variant.tensors[k], hpr.tensors[k]) for k in hpr.tensors)
        and variant.tensors.keys() == hpr.tensors.keys()
    )
    results = json.loads((out / "results.json").read_text())
    assert {"hpr", "hpr_answer"} <= set(results["methods"]) & set(results["capability"]) & set(results["generation"])
    preds = pd.read_parquet(out / "predictions.parquet").set_index(["method", "question_id", "choice"])["loglik"]
    # the context is left alone: the last context token's output (the first answer token's logit) is unedited,
    # so the variant's scores differ from full HPR's
    assert not preds.loc["hpr_answer"].equals(preds.loc["hpr"])


def test_reproduce_runs_iti_at_any_alpha_and_refuses_unknown_methods(tiny_toy, tmp_path):
    out = tmp_path / "run"
    assert main(["reproduce", "--out", str(out), "--quiet", "--methods", "base,iti7.5"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"base", "iti7.5"}
    assert json.loads((out / "editors" / "iti7.5" / "config.json").read_text())["config"]["alpha"] == 7.5
    assert main(["reproduce", "--out", str(tmp_path / "other"), "--quiet", "--methods", "base,magic"]) == 2
