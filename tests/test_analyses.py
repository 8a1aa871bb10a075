"""The analysis measurements, and every analyses/ script on a tiny toy run (HTML only, no browser)."""

import importlib
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from hpr import activations, measurements, strength

ANALYSES = Path(__file__).resolve().parent.parent / "analyses"


@pytest.fixture(scope="module")
def tiny_run(tiny_run_folder, tmp_path_factory):
    """One tiny toy run for the whole module."""
    folder = tmp_path_factory.mktemp("analyses") / "run"
    with tiny_run_folder(folder, "base,hpr,hpr_no_angle,iti15,iti200,caa,sea") as out:
        yield out


def test_measurements_on_a_tiny_run(tiny_run, tmp_path):
    run = measurements.Run(tiny_run, device="cpu")
    questions = run.questions("test")[:4]
    editors = run.editors(["base", "hpr", "iti200"])
    cap = measurements.capability(run.model, measurements.neutral_texts("toy", n=4), editors)
    base = cap.set_index("method").loc["base"]
    assert base["kl"] == pytest.approx(0.0, abs=1e-6) and base["ppl_change"] == pytest.approx(0.0, abs=1e-6)
    assert (cap.set_index("method")["kl"].drop("base") > 0).all()
    first = min(run.results["selected_layers"])  # HPR's input there is unedited: pure rotation, norm kept
    dm = measurements.direction_magnitude(run.model, questions, run.fmt, {"hpr": editors["hpr"]}, first)
    assert torch.allclose(torch.tensor(dm["norm_ratio"].values), torch.tensor(1.0), atol=1e-5)
    assert (dm["cosine"] <= 1 + 1e-6).all()
    whole = measurements.resid_tokens(run.model, questions, run.fmt, editors["hpr"])
    some = measurements.resid_tokens(run.model, questions, run.fmt, editors["hpr"], layers=[first, 0], max_tokens=5)
    assert some.shape == (5, 2, whole.shape[-1])  # only the answers holding the first 5 tokens were run
    assert torch.allclose(some, whole[:5][:, [first, 0]], atol=1e-5)
    test_acts = tmp_path / "acts"
    activations.collect(run.model, run.questions("test"), run.fmt, test_acts, questions_per_shard=3)
    by_shard = measurements.split_hpr_angles(editors["hpr"], test_acts)
    assert len(list(activations.shard_paths(test_acts))) > 1  # the shards really are read one by one
    pd.testing.assert_frame_equal(by_shard, measurements.hpr_angles(editors["hpr"], activations.load(test_acts).acts))
    norms = measurements.norm_quantiles(run.model, questions, run.fmt, {"base": None, "iti200": editors["iti200"]})
    assert len(norms) == 2 * run.results["n_layers"]
    by = norms.set_index(["group", "layer"])["median"]
    assert by["iti200", run.results["n_layers"] - 1] > by["base", run.results["n_layers"] - 1]


def test_hpr_edit_regions_counts_every_token_once(tiny_run):
    run = measurements.Run(tiny_run, device="cpu")
    questions = run.questions("test")[:3]
    editor = run.editor("hpr")
    df = measurements.hpr_edit_regions(run.model, questions, run.fmt, editor)
    layers = editor.config.layers
    assert len(df) == len(layers) * len(measurements.REGIONS)
    answers = sum(
        len(run.model.tokenizer(" " + c.text, add_special_tokens=False)["input_ids"]) for q in questions for c in q.mc2
    )
    by = df.groupby("layer")["tokens"]
    one_layer = df[df["layer"] == layers[0]].set_index("region")["tokens"]
    assert (by.sum() == by.sum().iloc[0]).all()  # every layer sees the same tokens
    assert one_layer["true answer"] + one_layer["false answer"] == answers
    seen = df[df["tokens"] > 0]
    assert seen["edited_share"].between(0, 1).all()
    edited = seen[seen["edited_share"] > 0]
    assert len(edited) and edited["mean_theta_deg"].between(0, 180).all()
    with pytest.raises(ValueError, match="HPR's probes"):
        measurements.hpr_edit_regions(run.model, questions, run.fmt, run.editor("iti15"))


def test_every_analysis_script_writes_its_outputs(tiny_run, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ANALYSES))
    reproduce_paper = importlib.import_module("reproduce_paper")
    out = tmp_path / "paper"
    argv = ["--run", str(tiny_run), "--out", str(out), "--formats", "--prompts", "2", "--max-new-tokens", "4"]
    argv += ["--gen-questions", "3"]
    assert measurements.script_main(reproduce_paper.make, "test", argv) == 0
    figures = {p.stem for p in (out / "figures").glob("*.html")}
    assert {
        "probe_accuracy",
        "norms_true_vs_false",
        "norms_by_method",
        "mc_scores",
        "topk_sweep",
        "direction_magnitude",
        "hpr_angles",
        "capability",
        "tradeoff",
        "strength_hpr",
        "strength_iti200",
        "strength_caa",
        "hpr_edit_regions",
    } <= figures
    assert "strength_sea" not in figures  # SEA has no strength
    tables = {p.name for p in (out / "tables").iterdir()}
    for name in (
        "probe_accuracy",
        "mc_scores",
        "flip_rates",
        "topk_sweep",
        "generations",
        "generations_settings",
        "capability",
        "norm_change_vs_base",
        "strength_curves",
        "hpr_edit_regions",
    ):
        assert {f"{name}.csv", f"{name}.md", f"{name}.tex"} <= tables
    # each script also runs alone
    alone = tmp_path / "alone"
    assert (
        measurements.script_main(
            importlib.import_module("flip_table").make, "t", ["--run", str(tiny_run), "--out", str(alone), "--formats"]
        )
        == 0
    )
    assert (alone / "tables" / "flip_rates.csv").exists()
    sys.modules.pop("reproduce_paper", None)
    curves = pd.read_csv(out / "tables" / "strength_curves.csv")
    assert set(curves["method"]) == {"hpr", "hpr_no_angle", "iti15", "iti200", "caa"}
    at_zero = curves[curves["strength"] == 0]
    assert (at_zero["kl"] == 0).all() and at_zero["mc1"].nunique() == 1  # strength 0 is the base model
    for metric in strength.ANSWER_METRICS:  # greedy val answers at every strength; at 0, the base model's
        assert curves[metric].between(0, 1).all() and at_zero[metric].nunique() == 1
    fitted = curves[curves["fitted"]].set_index("method")
    assert fitted.loc["iti200", "strength"] == 200 and fitted.loc["hpr", "strength"] == 1
    val_mc1 = {m: g.set_index("strength")["mc1"] for m, g in curves.groupby("method")}
    assert val_mc1["iti15"].equals(val_mc1["iti200"])  # one ITI fit: the same curve through both alphas


def test_scripts_refuse_a_folder_that_is_no_run(tmp_path, capsys):
    sys.path.insert(0, str(ANALYSES))
    try:
        module = importlib.import_module("mc_table")
    finally:
        sys.path.remove(str(ANALYSES))
    assert measurements.script_main(module.make, "t", ["--run", str(tmp_path), "--formats"]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_flip_table_gives_counts_beside_fractions():
    results = {
        "splits": {"test": 30},
        "flip_rates": {"base": {}, "hpr": {"false_to_true": 0.1, "true_to_false": 0.0333, "remains_true": 0.5}},
        "methods": {"base": {"mc1": 0.2}, "hpr": {"mc1": 0.3}},
    }
    row = measurements.flip_frame(results).iloc[0]
    assert row["false_to_true"] == 0.1 and row["false_to_true_n"] == 3 and row["true_to_false_n"] == 1
    assert row["remains_true_n"] == 15 and row["method"] == "hpr"


def test_generations_show_no_special_tokens(tiny_lm, monkeypatch):
    from hpr import generation

    model = tiny_lm("gpt2-like")
    eos = model.tokenizer.eos_token_id
    word = model.tokenizer.convert_tokens_to_ids("w3")
    monkeypatch.setattr(generation, "greedy_batch", lambda model, ids, *a, **k: [[word, eos] for _ in ids])
    df = measurements.generations(model, ["w1 w2"], {"base": None}, max_new_tokens=4, stop_at_newline=False)
    assert df["text"].tolist() == ["w3"]  # the end-of-sequence token is not shown as text
