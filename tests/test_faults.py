"""Fault injection on ``hpr reproduce`` (tiny toy model, JSONL data): bad options, changed data, damaged run
folders and devices that are not there. Each fails with one line naming what to fix, exit code 2, and
leaves nothing behind that a corrected rerun would trip over."""

import json

import pytest

from hpr.cli import main
from hpr.data.jsonl import load_jsonl
from hpr.data.schema import DataError


def _write_jsonl(path, invert: bool = False, n: int | None = None):
    """The tiny toy world's questions as a JSONL file (labels flipped with ``invert``)."""
    from hpr.toyworld import toy_dataset

    rows = []
    for q in toy_dataset()[:n]:
        rows.append({"id": q.id, "question": q.question,
                     "choices": [{"text": c.text, "label": int(c.is_true != invert)} for c in q.mc2]})
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


def test_a_trimmed_splits_file_is_refused(tiny_toy, tmp_path, capsys):
    assert _run(tmp_path / "run") == 0
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    splits["test"] = splits["test"][: len(splits["test"]) // 2]
    (tmp_path / "run" / "splits.json").write_text(json.dumps(splits))
    assert _run(tmp_path / "run") == 2
    assert "splits.json does not hold the split" in _one_line_error(capsys)


@pytest.mark.parametrize("option, message", [
    (["--batch-size", "-1"], "batch_size must be a whole number >= 1"),
    (["--top-k", "0"], "hpr.top_k must be a whole number >= 1"),
    (["--top-k", "-1"], "hpr.top_k must be a whole number >= 1"),
    (["--limit", "-5"], "limit must be a whole number >= 1"),
    (["--limit", "0"], "limit must be a whole number >= 1"),
    (["--iti-k", "0"], "iti_k must be a whole number >= 1"),
    (["--methods", ""], "methods is empty"),
    (["--methods", "base,hpr,base"], "methods named twice"),
    (["--methods", "hrp"], "unknown methods ['hrp']"),
    (["--limit", "3"], "3 question(s) leave the val split(s) empty"),
])
def test_bad_options_fail_at_once_and_write_nothing(option, message, tiny_toy, tmp_path, capsys):
    args = ["reproduce", "--out", str(tmp_path / "run"), "--quiet"] + option
    if option[0] != "--methods":
        args += ["--methods", "base"]
    assert main(args) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device, message", [
    ("cuda", "CUDA is not available on this machine"), ("cuda:1", "CUDA is not available"),
    ("mps", "not supported"), ("meta", "not supported"), ("nonsense", "unknown device 'nonsense'")])
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
