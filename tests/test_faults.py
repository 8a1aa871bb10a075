"""Fault injection on ``hpr reproduce`` (tiny toy model, JSONL data): bad options, changed data, damaged run
folders and devices that are not there. Each fails with one line naming what to fix, exit code 2, and
leaves nothing behind that a corrected rerun would trip over."""

import json
import re

import pytest

from hpr.cli import main
from hpr.data.jsonl import load_jsonl
from hpr.data.schema import DataError


def _write_jsonl(path, invert: bool = False, n: int | None = None, context: str | None = None):
    """The tiny toy world's questions as a JSONL file (labels flipped with ``invert``; each with a passage
    ``context`` before it when given)."""
    from hpr.toyworld import toy_dataset

    rows = []
    for q in toy_dataset()[:n]:
        row = {
            "id": q.id,
            "question": q.question,
            "choices": [{"text": c.text, "label": int(c.is_true != invert)} for c in q.mc2],
        }
        if context is not None:
            row["context"] = f"{context} ({q.id})"
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(out, *extra, data=None):
    args = ["reproduce", "--out", str(out), "--quiet", "--methods", "base"]
    if data is not None:
        args += ["--dataset", "jsonl", "--data-path", str(data)]
    return main(args + list(extra))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()  # progress bars (the tiny toy's first build) come before it
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("hpr: error:"), err
    return last


def test_resuming_on_changed_data_is_refused_naming_the_dataset(tiny_toy, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "q.jsonl")
    assert _run(tmp_path / "run", data=data) == 0
    results = (tmp_path / "run" / "results.json").read_text()
    _write_jsonl(data, invert=True)  # every label inverted, same ids
    assert _run(tmp_path / "run", data=data) == 2
    assert "another dataset" in _one_line_error(capsys)
    assert (tmp_path / "run" / "results.json").read_text() == results  # nothing of the old run touched


def test_resuming_on_changed_contexts_is_refused_naming_the_dataset(tiny_toy, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "q.jsonl", context="A passage.")
    assert _run(tmp_path / "run", data=data) == 0
    results = (tmp_path / "run" / "results.json").read_text()
    _write_jsonl(data, context="Another passage.")  # only the contexts change
    assert _run(tmp_path / "run", "--methods", "base,iti15", data=data) == 2  # one more method
    assert "another dataset" in _one_line_error(capsys)
    assert (tmp_path / "run" / "results.json").read_text() == results


def _edit_one_value_between_samples(model):
    """+5 on one weight that the old strided fingerprint never sampled (the campaign's sparse edit)."""
    import torch

    from hpr.models import sampled_model_fingerprint

    before = sampled_model_fingerprint(model)
    name, param = max(model.named_parameters(), key=lambda item: item[1].numel())
    with torch.no_grad():
        param.view(-1)[1] += 5.0  # the stride's second sample is at numel // 64
    assert sampled_model_fingerprint(model) == before, name  # the gap the full fingerprint closes
    return model


def test_resuming_on_weights_changed_in_one_value_is_refused(tiny_toy, tmp_path, monkeypatch, capsys):
    import hpr.runs.pipeline

    assert _run(tmp_path / "run") == 0
    results = (tmp_path / "run" / "results.json").read_text()
    load = hpr.runs.pipeline.load_model
    monkeypatch.setattr(hpr.runs.pipeline, "load_model", lambda *a, **k: _edit_one_value_between_samples(load(*a, **k)))
    assert _run(tmp_path / "run", "--methods", "base,iti15") == 2
    assert "another model's weights" in _one_line_error(capsys)
    assert (tmp_path / "run" / "results.json").read_text() == results


def test_a_folder_recorded_with_the_old_sampled_fingerprint_resumes_and_is_upgraded(tiny_toy, tmp_path):
    from hpr.models import FINGERPRINT_PREFIX, sampled_model_fingerprint
    from hpr.sources import load_model

    assert _run(tmp_path / "run") == 0
    path = tmp_path / "run" / "config.json"
    record = json.loads(path.read_text())
    full = record["inputs"]["model_fingerprint"]
    assert full.startswith(FINGERPRINT_PREFIX)
    record["inputs"]["model_fingerprint"] = sampled_model_fingerprint(load_model("toy", device="cpu"))
    path.write_text(json.dumps(record))
    assert _run(tmp_path / "run") == 0
    assert json.loads(path.read_text())["inputs"]["model_fingerprint"] == full


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d.joinpath("results.json").write_text("{}"), "already holds files that are not a run folder"),
        (lambda d: d.rmdir() or d.write_text("notes"), "is a file, not a folder"),
    ],
)
def test_an_out_that_holds_something_else_is_refused_and_left_as_it_was(make, message, tiny_toy, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    make(out)
    before = sorted((p.name, p.read_bytes()) for p in ([out] if out.is_file() else out.iterdir()))
    assert _run(out) == 2
    assert message in _one_line_error(capsys)
    assert sorted((p.name, p.read_bytes()) for p in ([out] if out.is_file() else out.iterdir())) == before


def test_an_empty_out_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--out", "", "--quiet"])
    assert e.value.code == 2
    assert "--out: is empty" in capsys.readouterr().err


def test_the_fingerprint_of_data_without_contexts_is_unchanged():
    """Contexts count only where there are some: old run folders (TruthfulQA, the toy world) still resume."""
    import hashlib

    from hpr.runs import dataset_fingerprint
    from hpr.toyworld import toy_dataset

    questions = toy_dataset()
    before = [
        [q.id, q.question, [[c.text, c.is_true] for c in q.mc1], [[c.text, c.is_true] for c in q.mc2]]
        for q in questions
    ]
    assert dataset_fingerprint(questions) == hashlib.sha256(json.dumps(before, ensure_ascii=False).encode()).hexdigest()


def test_a_trimmed_splits_file_is_refused(tiny_toy, tmp_path, capsys):
    assert _run(tmp_path / "run") == 0
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    splits["test"] = splits["test"][: len(splits["test"]) // 2]
    (tmp_path / "run" / "splits.json").write_text(json.dumps(splits))
    assert _run(tmp_path / "run") == 2
    assert "splits.json does not hold the split" in _one_line_error(capsys)


@pytest.mark.parametrize(
    "option, message",
    [
        (["--batch-size", "-1"], "batch_size must be a whole number >= 1"),
        (["--top-k", "0"], "hpr.top_k must be a whole number >= 1"),
        (["--top-k", "-1"], "hpr.top_k must be a whole number >= 1"),
        (["--limit", "-5"], "limit must be a whole number >= 1"),
        (["--limit", "0"], "limit must be a whole number >= 1"),
        (["--iti-k", "0"], "iti.k must be a whole number >= 1"),
        (["--sea-k-ratio", "1.5"], "sea.k_ratio must be in (0, 1]"),
        (["--methods", ""], "methods is empty"),
        (["--methods", "base,hpr,base"], "methods named twice"),
        (["--methods", "hrp"], "unknown methods ['hrp']"),
        (["--limit", "3"], "3 question(s) in 2 group(s) leave the val split(s) empty"),
        (["--methods", "base,caa", "--caa-multipliers", "1", "nan"], "caa.multipliers must be a finite number"),
        (["--methods", "base,sadi", "--sadi-deltas", "inf"], "sadi.deltas must be a finite number"),
    ],
)
def test_bad_options_fail_at_once_and_write_nothing(option, message, tiny_toy, tmp_path, capsys):
    args = ["reproduce", "--out", str(tmp_path / "run"), "--quiet"] + option
    if option[0] != "--methods":
        args += ["--methods", "base"]
    assert main(args) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda", "CUDA is not available on this machine"),
        ("cuda:1", "CUDA is not available"),
        ("mps", "not supported"),
        ("meta", "not supported"),
        ("nonsense", "unknown device 'nonsense'"),
    ],
)
def test_devices_that_are_not_there_get_one_line(device, message, tiny_toy, tmp_path, capsys):
    import torch

    if torch.cuda.is_available() and device.startswith("cuda"):
        pytest.skip("this machine has CUDA")
    assert _run(tmp_path / "run", "--device", device) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_a_failed_first_attempt_leaves_nothing_that_blocks_the_corrected_rerun(tiny_toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--model", str(tmp_path / "no-such-model")) == 2  # a typo in --model
    _one_line_error(capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert _run(out, data=empty) == 2
    assert "holds no questions" in _one_line_error(capsys)
    assert not out.exists()
    assert _run(out) == 0  # the corrected command


def test_a_refusal_names_the_setting_that_differs(tiny_toy, tmp_path, capsys):
    assert _run(tmp_path / "run") == 0
    assert _run(tmp_path / "run", "--seed", "3") == 2
    err = _one_line_error(capsys)
    assert "seed: 0 -> 3" in err and "hpr.seed: 0 -> 3" in err


def test_a_damaged_config_is_named(tiny_toy, tmp_path, capsys):
    assert _run(tmp_path / "run") == 0
    config = tmp_path / "run" / "config.json"
    config.write_text(config.read_text()[:40])
    assert _run(tmp_path / "run") == 2
    assert f"{config}: the run config file is damaged" in _one_line_error(capsys)


def test_damaged_caches_are_rebuilt_on_resume_with_the_same_results(tiny_toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--methods", "base,hpr,iti15") == 0
    results = json.loads((out / "results.json").read_text())
    for path in (
        out / "activations" / "train" / "shard-00000.safetensors",
        out / "editors" / "hpr" / "state.safetensors",
        out / "editors" / "iti15" / "state.safetensors",
        out / "predictions" / "hpr.parquet",
        out / "predictions" / "hpr.norms.safetensors",
    ):
        assert path.exists(), path
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    assert _run(out, "--methods", "base,hpr,iti15") == 0
    again = json.loads((out / "results.json").read_text())
    assert again["methods"] == results["methods"] and again["norm_change"] == results["norm_change"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda df: df.rename(columns={"loglik": "ll"}),  # other columns
        lambda df: df.iloc[: len(df) // 2],  # rows missing
        lambda df: df.assign(loglik=float("nan")),  # no scores
        lambda df: df.assign(method="base"),  # another label's
    ],
)
def test_saved_predictions_that_are_not_this_runs_are_scored_again(damage, tiny_toy, tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "run"
    assert _run(out, "--methods", "base,hpr") == 0
    results = json.loads((out / "results.json").read_text())
    path = out / "predictions" / "hpr.parquet"
    damage(pd.read_parquet(path)).to_parquet(path, index=False)
    assert _run(out, "--methods", "base,hpr") == 0
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]


def test_ctrl_c_says_how_to_resume(monkeypatch, tmp_path, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hpr.runs.reproduce", interrupted)
    assert _run(tmp_path / "run") == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err


def test_unreadable_data_files_name_the_file_and_line(tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes('{"question": "caf\xe9?", "choices": []}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl, line 1: not UTF-8 text \(byte 0xe9"):
        load_jsonl(data)
    with pytest.raises(DataError, match="is a folder"):
        load_jsonl(tmp_path)


_CSV_HEADER = "Question,Best Answer,Correct Answers,Incorrect Answers"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("tqa.csv", f"{_CSV_HEADER}\nWhy caf\xe9?,a,a,b\n".encode("latin-1"), r"tqa.csv, line 2: not UTF-8 .*column 8"),
        ("tqa.json", '[\n{"question": "caf\xe9?"}]'.encode("latin-1"), r"tqa.json, line 2: not UTF-8 text"),
        ("tqa.jsonl", '{"question": "caf\xe9?"}\n'.encode("latin-1"), r"tqa.jsonl, line 1: not UTF-8 text"),
        ("tqa.csv", f'{_CSV_HEADER}\n"{"x" * 140_000}",a,a,b\n'.encode(), r"tqa.csv, line 2: not readable as CSV"),
        ("tqa.csv", f"{_CSV_HEADER},Question\nq1,a,a,b,q2\n".encode(), r"field 'Question': column is given 2 times"),
    ],
)
def test_truthfulqa_files_that_cannot_be_read_name_the_file_and_line(name, content, message, tmp_path):
    from hpr.data.truthfulqa import load_truthfulqa

    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_truthfulqa(tmp_path / name)


# ------------------------------------------------------------------------------------- editors' state


def _saved_hpr(tmp_path, model=None):
    import torch

    from hpr.editors.hpr import HPREditor, LayerwiseHPR

    torch.manual_seed(0)
    editor = HPREditor.from_layerwise(LayerwiseHPR(3, 32), (1, 2))
    editor.save(tmp_path / "hpr", model)
    return tmp_path / "hpr"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: r["config"].update(no_angle="false"), "no_angle must be a bool"),
        (lambda r: r["config"].update(layers=[1, 1]), "distinct"),
        (lambda r: r.pop("config"), "lacks"),
        (lambda r: r["config"].update(positions="everywhere"), "positions must be one of"),
    ],
)
def test_an_editor_record_of_the_wrong_type_is_refused(damage, message, tmp_path):
    from hpr.editors import load_editor

    folder = _saved_hpr(tmp_path)
    record = json.loads((folder / "config.json").read_text())
    damage(record)
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=message):
        load_editor(folder)


@pytest.mark.parametrize(
    "value, message",
    [(float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"), (None, "not floating point")],
)
def test_editor_tensors_that_are_not_finite_floats_are_refused(value, message, tmp_path):
    from safetensors.torch import load_file, save_file

    from hpr.editors import load_editor

    folder = _saved_hpr(tmp_path)
    tensors = load_file(folder / "state.safetensors")
    probe = tensors["layer1.probe"]
    tensors["layer1.probe"] = probe.long() if value is None else probe.clone().fill_(value)
    save_file(tensors, folder / "state.safetensors")
    with pytest.raises(ValueError, match=message):
        load_editor(folder)
    (folder / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read"):
        load_editor(folder)


def _saved_caa(tmp_path):
    import torch

    from hpr.editors.caa import CAAEditor

    editor = CAAEditor.from_vectors({1: torch.randn(32, generator=torch.Generator().manual_seed(0))}, 2.0, 3)
    editor.save(tmp_path / "caa")
    return tmp_path / "caa"


def _damage_state(folder, damage):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "state.safetensors")
    damage(tensors)
    save_file({k: v.clone() for k, v in tensors.items()}, folder / "state.safetensors")


@pytest.mark.parametrize(
    "saved, damage, message",
    [
        (
            _saved_caa,
            lambda t: t.update({"layer1.vector": t["layer1.vector"][:1]}),
            r"'layer1.vector' has shape \[1\], expected \[32\]",
        ),
        (
            _saved_caa,
            lambda t: t.update({"layer1.vector": t["layer1.vector"].expand(5, 32).clone()}),
            r"has shape \[5, 32\], expected \[32\]",
        ),
        (_saved_caa, lambda t: t.pop("layer1.vector"), r"lacks tensor\(s\) layer1.vector \(1 in all\)"),
        (
            _saved_caa,
            lambda t: t.update({"layer2.vector": t["layer1.vector"]}),
            r"holds unexpected tensor\(s\) layer2.vector",
        ),
        (
            _saved_hpr,
            lambda t: t.update({"layer1.angle.0.bias": t["layer1.angle.0.bias"][:1]}),
            r"'layer1.angle.0.bias' has shape \[1\], expected \[16\]",
        ),
        (
            _saved_hpr,
            lambda t: t.update({"layer2.angle.3.bias": t["layer2.angle.0.bias"]}),
            r"'layer2.angle.3.bias' has shape \[16\], expected \[1\]",
        ),
        (
            _saved_hpr,
            lambda t: t.update({"layer2.probe": t["layer2.probe"][:16]}),
            r"'layer2.probe' has shape \[16\], expected \[32\]",
        ),
    ],
)
def test_editor_tensors_of_the_wrong_shape_are_refused_naming_the_file(saved, damage, message, tmp_path):
    from hpr.editors import load_editor

    folder = saved(tmp_path)
    _damage_state(folder, damage)
    with pytest.raises(ValueError, match=message) as raised:
        load_editor(folder)
    assert str(raised.value).startswith(str(folder / "state.safetensors")) and "refit the editor" in str(raised.value)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e308", "true"])
def test_editor_config_numbers_that_are_not_finite_or_sane_are_refused(value, tmp_path):
    from hpr.editors import load_editor

    folder = _saved_caa(tmp_path)
    text = (folder / "config.json").read_text()
    assert '"multiplier": 2.0' in text
    (folder / "config.json").write_text(text.replace('"multiplier": 2.0', f'"multiplier": {value}'))
    with pytest.raises(ValueError, match=r"config.json: (CAA )?multiplier must be a (float|finite number)"):
        load_editor(folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e308, True])
def test_with_strength_refuses_numbers_that_are_not_finite_or_sane(value, tmp_path):
    from hpr.editors import load_editor

    for folder in (_saved_caa(tmp_path), _saved_hpr(tmp_path)):
        with pytest.raises(ValueError, match="must be a finite number"):
            load_editor(folder).with_strength(value)


@pytest.mark.parametrize(
    "layers, message",
    [
        ([1.5], "layers must be non-negative ints, got 1.5"),
        ([1.0], "layers must be non-negative ints, got 1.0"),
        ([True], "layers must be non-negative ints, got True"),
        (["1"], "layers must be non-negative ints, got '1'"),
        ([], "layers is empty, so this caa editor would edit nothing"),
        ([3], r"layers \[3\] are out of range for the 3-layer model it records"),
    ],
)
def test_editor_layers_that_are_not_ints_in_range_are_refused(layers, message, tmp_path):
    from hpr.editors import load_editor

    folder = _saved_caa(tmp_path)
    record = json.loads((folder / "config.json").read_text())
    record["config"]["layers"] = layers
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=message) as raised:
        load_editor(folder)
    assert str(raised.value).startswith(str(folder / "config.json"))


def test_editors_of_every_selection_refuse_an_empty_one(tmp_path):
    """ITI's heads and SADI's elements are what they edit; none edits nothing."""
    import torch

    from hpr.editors import load_editor
    from hpr.editors.iti import ITIEditor
    from hpr.editors.sadi import fit_sadi

    g = torch.Generator().manual_seed(0)
    ITIEditor.from_heads({(1, 0): torch.randn(8, generator=g)}, {(1, 0): 1.0}, 5.0, 3, 4).save(tmp_path / "iti")
    fit_sadi(torch.randn(3, 4, generator=g), 2, 1.0).save(tmp_path / "sadi")
    for name, selection in (("iti", "heads"), ("sadi", "elements")):
        record = json.loads((tmp_path / name / "config.json").read_text())
        record["config"][selection] = []
        (tmp_path / name / "config.json").write_text(json.dumps(record))
        with pytest.raises(ValueError, match=f"{selection} is empty, so this {name} editor would edit nothing"):
            load_editor(tmp_path / name)


def test_an_editor_refuses_another_model_of_the_same_shape(tmp_path, tiny_tl_model):
    from hpr.editors import load_editor

    fitted_on, other = tiny_tl_model(seed=0).eval(), tiny_tl_model(seed=1).eval()
    editor = load_editor(_saved_hpr(tmp_path, fitted_on))
    with editor.applied(fitted_on):
        pass
    with pytest.raises(ValueError, match="fitted on another model"), editor.applied(other):
        pass
    assert all(not hp.fwd_hooks for hp in other.hook_dict.values())
    with editor.for_any_model().applied(other):  # a deliberate transfer
        pass
    assert editor.with_positions("answer").fitted_on == editor.fitted_on  # derived editors keep the record


def test_an_editor_refuses_its_model_with_one_weight_changed(tmp_path, tiny_tl_model):
    from hpr.editors import load_editor

    model = tiny_tl_model(seed=0).eval()
    editor = load_editor(_saved_hpr(tmp_path, model))
    with editor.applied(model):
        pass
    _edit_one_value_between_samples(model)  # in place, through torch: the cached fingerprint is recomputed
    with pytest.raises(ValueError, match="fitted on another model"), editor.applied(model):
        pass


def test_an_editor_recorded_with_the_old_sampled_fingerprint_still_applies(tmp_path, tiny_tl_model):
    from hpr.editors import load_editor
    from hpr.models import sampled_model_fingerprint

    model, other = tiny_tl_model(seed=0).eval(), tiny_tl_model(seed=1).eval()
    folder = _saved_hpr(tmp_path, model)
    record = json.loads((folder / "config.json").read_text())
    record["model_fingerprint"] = sampled_model_fingerprint(model)
    (folder / "config.json").write_text(json.dumps(record))
    editor = load_editor(folder)
    with editor.applied(model):
        pass
    with pytest.raises(ValueError, match="fitted on another model"), editor.applied(other):
        pass


def test_a_checkpoint_without_a_tokenizer_says_so(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from hpr.sources import load_model

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no tokenizer files"):
        load_model(str(tmp_path), device="cpu")


def test_a_tiny_test_split_is_flagged(tiny_toy, tmp_path, capsys):
    assert _run(tmp_path / "run", "--limit", "12") == 0
    assert "warning: only" in capsys.readouterr().out


def test_analyses_refuse_results_of_the_wrong_shape_and_changed_data(tiny_toy, tmp_path):
    from hpr.measurements import Run

    data = _write_jsonl(tmp_path / "q.jsonl")
    out = tmp_path / "run"
    assert _run(out, data=data) == 0
    assert len(Run(out).questions("test")) > 0
    _write_jsonl(data, invert=True)
    with pytest.raises(ValueError, match="changed since"):
        Run(out).questions("test")
    results = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps({**results, "methods": [1, 2]}))
    with pytest.raises(ValueError, match="'methods' is missing or not a dict"):
        Run(out)
    (out / "results.json").write_text("[]")
    with pytest.raises(ValueError, match="not a results file"):
        Run(out)


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"garbage" * 10])
def test_unreadable_weights_name_the_checkpoint(damage, tmp_path, word_tokenizer):
    """A truncated or garbage model.safetensors in an otherwise complete checkpoint folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hpr.sources import load_model

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)).save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ValueError, match="the checkpoint cannot be read"):
        load_model(str(tmp_path), device="cpu")


def _saved_checkpoint(folder, word_tokenizer, family: str = "gpt2", vocab_size: int = 64):
    """A tiny random 2-layer checkpoint saved by transformers (Llama with tied embeddings: no lm_head in it)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=16))
    else:
        config = LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=64,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    word_tokenizer.save_pretrained(folder)
    return folder / "model.safetensors"


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda t: {k: v for k, v in t.items() if ".h.1." not in k},
            r"lacks 12 tensor\(s\) the model needs \(transformer\.h\.1\.attn\.c_attn\.bias, .*, \.\.\.\)",
        ),
        (
            lambda t: {**t, "transformer.h.7.mlp.extra": t["transformer.wte.weight"]},
            r"holds 1 tensor\(s\) the model does not know \(transformer\.h\.7\.mlp\.extra\)",
        ),
    ],
)
def test_a_checkpoint_with_missing_or_unknown_tensors_is_refused(damage, message, tmp_path, word_tokenizer):
    """Layer 1 deleted from model.safetensors loaded with random weights and no word; now it is refused."""
    from safetensors.torch import load_file, save_file

    from hpr.sources import load_model

    weights = _saved_checkpoint(tmp_path, word_tokenizer)
    save_file({k: v.clone() for k, v in damage(load_file(weights)).items()}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message) as raised:
        load_model(str(tmp_path), device="cpu")
    assert str(raised.value).startswith(f"{weights}: the checkpoint")


def test_a_checkpoint_with_tied_embeddings_loads(tmp_path, word_tokenizer):
    from safetensors.torch import load_file

    from hpr.sources import load_model

    weights = _saved_checkpoint(tmp_path, word_tokenizer, family="llama")
    assert not any(k.startswith("lm_head") for k in load_file(weights))  # the unembedding is the embedding
    model = load_model(str(tmp_path), device="cpu")
    assert model.cfg.n_layers == 2


def test_a_header_only_csv_says_it_holds_no_questions(tmp_path):
    from hpr.sources import load_dataset

    csv = tmp_path / "TruthfulQA.csv"
    csv.write_text("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n")
    with pytest.raises(DataError, match="holds no questions"):
        load_dataset("truthfulqa", csv)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"", "holds no text"),
        (b"\n\n  \n\n", "holds no text"),
        (b"PK\x03\x04\x00\x00binary", "is binary"),
        (b"caf\xe9 latin-1", "is not UTF-8"),
    ],
)
def test_a_bad_neutral_text_file_is_named_before_anything_is_written(content, message, tiny_toy, tmp_path, capsys):
    path = tmp_path / "neutral.txt"
    if content is not None:
        path.write_bytes(content)
    assert _run(tmp_path / "run", "--neutral-text", str(path)) == 2
    err = _one_line_error(capsys)
    assert message in err and str(path) in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- threads


def test_a_second_thread_applying_an_editor_to_the_same_model_is_refused(tiny_tl_model):
    """Hooks act on every forward pass of the model, whichever thread runs it: two threads each applying an editor
    to one model got each other's edits (49 of 60 passes wrong, no error). The second is now refused at once."""
    import threading

    import torch

    from hpr.editors.caa import CAAEditor
    from hpr.editors.reptune import RepTuneConfig, RepTuneEditor

    model = tiny_tl_model().eval()
    g = torch.Generator().manual_seed(0)
    caa = CAAEditor.from_vectors({1: torch.randn(32, generator=g)}, 2.0, 3).with_positions("all")
    other = CAAEditor.from_vectors({2: torch.randn(32, generator=g)}, 1.0, 3).with_positions("all")
    w_v = dict(model.named_parameters())["blocks.1.attn.W_V"]
    reptune = RepTuneEditor(RepTuneConfig(layers=(1,)), {"blocks.1.attn.W_V": w_v.detach() + 0.1}, 32, 3)
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad(), caa.applied(model), other.applied(model):  # nested in one thread: both edits
        nested = model(tokens)
    entered, release, errors = threading.Event(), threading.Event(), []

    def hold():
        with caa.applied(model):
            entered.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert entered.wait(30)
        for editor in (other, reptune, caa):
            try:
                with editor.applied(model):
                    errors.append(None)
            except RuntimeError as e:
                errors.append(str(e))
    finally:
        release.set()
        holder.join(30)
    assert all(e is not None and "another thread is applying an editor to this model" in e for e in errors), errors
    assert torch.equal(dict(model.named_parameters())["blocks.1.attn.W_V"], w_v)  # reptune swapped nothing
    with torch.no_grad(), caa.applied(model), other.applied(model):  # free again once the other thread is done
        assert torch.equal(model(tokens), nested)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_a_weight_swap_that_puts_everything_back_keeps_the_cached_fingerprint(tiny_tl_model, monkeypatch):
    import torch

    from hpr import models

    model = tiny_tl_model(seed=0).eval()
    first = models.model_fingerprint(model)
    param = next(model.parameters())
    original = param.detach().clone()
    with models.weights_put_back(model), torch.no_grad():
        param.add_(1.0)
        param.copy_(original)
    hashed, sha256 = [], models.hashlib.sha256
    monkeypatch.setattr(models.hashlib, "sha256", lambda *a: hashed.append(1) or sha256(*a))
    assert models.model_fingerprint(model) == first and not hashed  # from the cache
    with pytest.raises(RuntimeError), models.weights_put_back(model), torch.no_grad():
        param.add_(1.0)
        raise RuntimeError("the swap failed half-way")
    assert models.model_fingerprint(model) != first and hashed  # recomputed, and the weight really differs


@pytest.mark.parametrize("damage", ["truncate", "build.json"])
def test_a_damaged_toy_model_cache_is_built_again(damage, tiny_toy, toy_cache, tmp_path, monkeypatch):
    import shutil

    from hpr.models import model_fingerprint
    from hpr.sources import load_model
    from hpr.toyworld.build import ensure_built

    intact = model_fingerprint(load_model("toy", device="cpu"))
    folder = ensure_built(tiny_toy)
    copy = tmp_path / "cache"
    shutil.copytree(toy_cache, copy)
    monkeypatch.setenv("HPR_CACHE_DIR", str(copy))
    damaged = copy / folder.relative_to(toy_cache)
    if damage == "truncate":
        weights = damaged / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (damaged / "build.json").write_text("{not json")
    assert model_fingerprint(load_model("toy", device="cpu")) == intact  # rebuilt, bit for bit
    assert (damaged / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: [d], "a JSON list, not an object"),
        (lambda d: {k: v for k, v in d.items() if k != "selected_layers"}, "'selected_layers' is None"),
        (lambda d: {**d, "selected_layers": "0"}, "'selected_layers' is '0'"),
        (lambda d: {**d, "selected_layers": [99]}, "'selected_layers' is \\[99\\]"),
        (lambda d: {**d, "selected_layers": [1, 1]}, "not distinct layer numbers"),
        (lambda d: {**d, "accuracy": "x"}, "'accuracy' is missing or not an object"),
        (lambda d: {**d, "accuracy": {**d["accuracy"], "val": [0.5]}}, "accuracy\\['val'\\] is not a list of"),
    ],
)
def test_a_hand_edited_probes_file_is_refused_naming_it(edit, message, tiny_toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--methods", "base,hpr") == 0
    path = out / "probes.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    results = (out / "results.json").read_text()
    assert _run(out, "--methods", "base,hpr,iti15") == 2
    line = _one_line_error(capsys)
    assert "probes.json is damaged" in line and "to fit HPR again" in line
    assert re.search(message, line), line
    assert (out / "results.json").read_text() == results


@pytest.mark.parametrize(
    "option, message",
    [
        (["--formats", "bogus"], "argument --formats: invalid choice: 'bogus'"),
        (["--prompts", "-1"], "argument --prompts: must be at least 1, got -1"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1"),
        (["--gen-questions", "-2"], "argument --gen-questions: must be at least 0"),
        (["--topk", "3", "0"], "argument --topk: must be at least 1"),
    ],
)
def test_analyses_options_out_of_range_are_refused(option, message, capsys):
    from hpr.measurements import script_parser

    with pytest.raises(SystemExit):
        script_parser("test").parse_args(["--run", "r", *option])
    assert message in capsys.readouterr().err


def test_an_unknown_figure_format_is_refused_before_anything_is_written(tmp_path):
    import plotly.graph_objects as go

    from hpr.figures import export_figures

    with pytest.raises(ValueError, match=r"unknown figure format\(s\) \['bogus'\]"):
        export_figures({"f": go.Figure()}, tmp_path / "figures", formats=("bogus",))
    assert not (tmp_path / "figures").exists()


def test_a_tokenizer_larger_than_the_embedding_is_refused_before_a_folder_is_written(word_tokenizer, tmp_path, capsys):
    from hpr.sources import load_model

    checkpoint = tmp_path / "ckpt"
    _saved_checkpoint(checkpoint, word_tokenizer, vocab_size=len(word_tokenizer) - 4)
    top = len(word_tokenizer) - 1
    with pytest.raises(ValueError, match=f"the tokenizer has token ids up to {top} but the model's embedding only 40"):
        load_model(str(checkpoint), device="cpu")
    assert _run(tmp_path / "run", "--model", str(checkpoint)) == 2
    assert "the tokenizer has" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_loading_an_editor_onto_a_device_that_is_not_there_names_the_device(tmp_path, monkeypatch):
    import torch

    from hpr.editors import load_editor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = _saved_hpr(tmp_path)
    with pytest.raises(ValueError, match="CUDA is not available on this machine; use --device cpu"):
        load_editor(folder, device="cuda")
    assert load_editor(folder, device="cpu").method == "hpr"


def test_too_few_groups_are_counted_as_groups(tiny_toy, tmp_path, capsys):
    """20 questions in one group: it is groups that are too few, and more questions of it would not help."""
    data = _write_jsonl(tmp_path / "q.jsonl", n=20)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "meta": {"group": "g0"}}) + "\n" for r in rows))
    assert _run(tmp_path / "run", data=data) == 2
    line = _one_line_error(capsys)
    assert "20 question(s) in 1 group(s)" in line and "use at least 10 groups" in line
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_parameter(word_tokenizer, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    from hpr.sources import load_model

    checkpoint = tmp_path / "ckpt"
    weights = _saved_checkpoint(checkpoint, word_tokenizer)
    state = load_file(weights)
    name = next(k for k in state if k.endswith("mlp.c_fc.weight"))
    state[name][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"weights hold 1 NaN or infinite value\(s\) in blocks\.\d\.mlp\.W_in"):
        load_model(str(checkpoint), device="cpu")
    assert _run(tmp_path / "run", "--model", str(checkpoint)) == 2
    assert "NaN or infinite" in _one_line_error(capsys) and not (tmp_path / "run").exists()
    assert torch.isnan(load_file(weights)[name]).any()


@pytest.mark.parametrize(
    "failure",
    [
        lambda: __import__("safetensors").SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        ),  # as safetensors reports a full disk (seen on a 256 kB tmpfs)
        lambda: OSError(28, "No space left on device"),
    ],
)
def test_a_full_disk_is_named_in_one_line_and_leaves_no_temporary_file(
    failure, tiny_toy, tmp_path, monkeypatch, capsys
):
    import hpr.activations
    import hpr.files

    real = hpr.files.atomic_write

    def full_disk_for_shards(path, write):
        if str(path).endswith(".safetensors"):

            def partial_then_full(tmp):
                open(tmp, "wb").write(b"half a shard")
                raise failure()

            return real(path, partial_then_full)
        return real(path, write)

    monkeypatch.setattr(hpr.activations, "atomic_write", full_disk_for_shards)
    assert _run(tmp_path / "run") == 2
    assert "no space left on the device while writing" in _one_line_error(capsys)
    assert not list((tmp_path / "run").rglob("*.tmp"))
    monkeypatch.setattr(hpr.activations, "atomic_write", real)  # space freed: the same command resumes
    assert _run(tmp_path / "run") == 0


def test_analyses_that_cannot_write_say_where_in_one_line(tiny_run_folder, tmp_path, monkeypatch, capsys):
    import pandas as pd

    from hpr import figures
    from hpr.measurements import script_main

    def table(run, args):
        return {"tables": {"t": pd.DataFrame({"a": [1]})}}

    with tiny_run_folder(tmp_path / "run", "base") as run:
        (tmp_path / "file").write_text("x")
        assert script_main(table, "t", ["--run", str(run), "--out", str(tmp_path / "file"), "--formats"]) == 2
        assert "--out" in capsys.readouterr().err
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "tables").write_text("x")  # a file where the tables folder goes
        assert script_main(table, "t", ["--run", str(run), "--out", str(tmp_path / "out"), "--formats"]) == 2
        assert "cannot write the outputs into" in capsys.readouterr().err

        def read_only(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(figures, "export_table", read_only)  # as a read-only folder fails (not as root)
        assert script_main(table, "t", ["--run", str(run), "--formats"]) == 2
        assert "Permission denied" in capsys.readouterr().err


@pytest.mark.parametrize(
    "last_line, message",
    [
        (
            '{"id": "x", "question": "bad \\ud800 here", '
            '"choices": [{"text": "a", "label": 1}, {"text": "b", "label": 0}]}',
            r"line \d+: holds the escape \\ud800, a lone surrogate",
        ),
        ('{"id": "x", "question": "q", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        (None, r"question '[^']+' has a choice of 5,000 tokens .* does not fit in the model's context"),
    ],
)
def test_data_that_would_fail_after_the_model_loads_is_refused_before_a_folder(
    last_line, message, tiny_toy, tmp_path, capsys
):
    data = _write_jsonl(tmp_path / "q.jsonl")
    rows = data.read_text().splitlines()
    if last_line is None:  # one choice of 5,000 words
        first = json.loads(rows[0])
        first["choices"][0]["text"] = " ".join(["w"] * 5000)
        rows[0] = json.dumps(first)
    else:
        rows.append(last_line)
    data.write_text("\n".join(rows) + "\n")
    assert _run(tmp_path / "run", data=data) == 2
    assert re.search(message, _one_line_error(capsys))
    assert not (tmp_path / "run").exists()
