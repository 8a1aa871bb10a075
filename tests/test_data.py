"""Loaders, validation, splits and prompt format. Fast, no network."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from hpr.data import (
    QA_PRIMER,
    Choice,
    DataError,
    MCQuestion,
    PromptFormat,
    apply_split,
    split_ids,
)
from hpr.data.jsonl import load_jsonl
from hpr.data.truthfulqa import load_truthfulqa
from hpr.sources import load_dataset

CSV_HEADER = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]


# TruthfulQA comes from the ``truthfulqa_dir`` fixture (conftest.py): $HPR_TRUTHFULQA_PATH, the shared data, or the
# committed sample of the first questions. Each test compares the loader with the files as read directly by
# json and csv, so it holds for any copy of the official files, whole or in part.


@pytest.fixture(scope="module")
def tqa_json(truthfulqa_dir) -> tuple[MCQuestion, ...]:
    return load_truthfulqa(truthfulqa_dir / "mc_task.json")


@pytest.fixture(scope="module")
def tqa_csv(truthfulqa_dir) -> tuple[MCQuestion, ...]:
    return load_truthfulqa(truthfulqa_dir / "TruthfulQA.csv")


@pytest.fixture(scope="module")
def tqa_json_rows(truthfulqa_dir) -> list[dict]:
    """mc_task.json as plain ``json`` reads it."""
    return json.loads((truthfulqa_dir / "mc_task.json").read_text(encoding="utf-8-sig"))


@pytest.fixture(scope="module")
def tqa_csv_rows(truthfulqa_dir) -> list[dict[str, str]]:
    """TruthfulQA.csv as plain ``csv`` reads it (no BOM in the first column name, blank lines skipped)."""
    with (truthfulqa_dir / "TruthfulQA.csv").open(encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def _answers(cell: str) -> list[str]:
    return [a.strip() for a in cell.split(";") if a.strip()]


# --- TruthfulQA on the real files ---------------------------------------------------------------------


def test_json_matches_the_file_with_lm_eval_shape(tqa_json, tqa_json_rows):
    assert len(tqa_json) == len(tqa_json_rows) > 0
    assert [q.id for q in tqa_json] == [f"tqa-{i:04d}" for i in range(len(tqa_json_rows))]
    assert tqa_json[0].question.startswith("What is the smallest country in the world")
    for q, row in zip(tqa_json, tqa_json_rows, strict=True):
        assert q.question == row["question"]
        for task in ("mc1", "mc2"):  # verbatim, in file order
            assert [(c.text, c.is_true) for c in getattr(q, task)] == [
                (text, bool(label)) for text, label in row[f"{task}_targets"].items()
            ]
        assert q.mc1[0].is_true  # lm-eval relies on the true MC1 answer being index 0
        assert sum(c.is_true for c in q.mc1) == 1
        assert {c.text for c in q.mc1} <= {c.text for c in q.mc2}


def test_directory_prefers_json_and_dataset_dispatch(tqa_json, truthfulqa_dir, monkeypatch):
    assert load_truthfulqa(truthfulqa_dir) == tqa_json
    assert load_dataset("truthfulqa", truthfulqa_dir) == tqa_json
    monkeypatch.setenv("HPR_TRUTHFULQA_PATH", str(truthfulqa_dir))
    assert load_dataset("TruthfulQA") == tqa_json


def test_csv_bom_handled_and_rows_match_the_file(tqa_csv, tqa_csv_rows):
    assert len(tqa_csv) == len(tqa_csv_rows) > 0  # the full file has 817 rows (some versions have 790)
    assert [q.id for q in tqa_csv] == [f"tqa-csv-{i:04d}" for i in range(len(tqa_csv_rows))]
    for q, row in zip(tqa_csv, tqa_csv_rows, strict=True):
        # "Type" is the first column: a BOM stuck to its name would lose it from meta
        assert {k: q.meta[k] for k in ("Type", "Category", "Source")} == {
            k: row[k].strip() for k in ("Type", "Category", "Source")
        }
        assert q.question == row["Question"].strip()  # one question of the full file has a trailing space
        assert q.mc1[0] == Choice(row["Best Answer"].strip(), True)
        correct, incorrect = set(_answers(row["Correct Answers"])), set(_answers(row["Incorrect Answers"]))
        assert {c.text for c in q.mc1 if not c.is_true} == incorrect
        assert {c.text for c in q.mc2 if c.is_true} == correct - incorrect  # an answer in both is false
        assert {c.text for c in q.mc2 if not c.is_true} == incorrect


def test_csv_repairs_are_recorded_not_silent(tqa_csv, tqa_csv_rows, tqa_json_rows):
    """Exactly the rows with a repeated answer carry ``repairs``; an answer listed as both correct and incorrect
    is kept once, as false, as mc_task.json has it."""
    repeated, conflicts = set(), {}
    for i, row in enumerate(tqa_csv_rows):
        best, correct, incorrect = (
            row["Best Answer"].strip(),
            _answers(row["Correct Answers"]),
            _answers(row["Incorrect Answers"]),
        )
        for answers in ([best] + incorrect, correct + incorrect):
            if len(set(answers)) < len(answers):
                repeated.add(f"tqa-csv-{i:04d}")
        if set(correct) & set(incorrect):
            conflicts[f"tqa-csv-{i:04d}"] = set(correct) & set(incorrect)
    # the full file has five such rows; the sample keeps one ("What proportion of Canadians are straight?")
    assert conflicts, "this copy of TruthfulQA.csv has no answer listed as both correct and incorrect"
    repaired = {q.id: q.meta["repairs"] for q in tqa_csv if "repairs" in q.meta}
    assert sorted(repaired) == sorted(repeated)
    json_mc2 = {row["question"]: row["mc2_targets"] for row in tqa_json_rows}
    by_id = {q.id: q for q in tqa_csv}
    compared = 0
    for qid, texts in conflicts.items():
        q = by_id[qid]
        json_labels = json_mc2.get(q.question, {})  # mc_task.json adds a final period to the CSV's answers
        for text in texts:
            assert [c.is_true for c in q.mc2 if c.text == text] == [False]
            assert f"MC2: {text!r} listed as both correct and incorrect, kept once as false" in repaired[qid]
            labels = [json_labels[t] for t in (text, text + ".") if t in json_labels]
            assert labels in ([], [0]), (qid, text, labels)
            compared += bool(labels)
    assert compared  # at least one was checked against mc_task.json


def test_json_and_csv_questions_overlap(tqa_json, tqa_csv):
    json_q = {q.question for q in tqa_json}
    csv_q = {q.question for q in tqa_csv}
    # the same questions in another order, but the CSV revision rewords one ("Are all women women?")
    assert len(json_q & csv_q) >= min(len(json_q), len(csv_q)) - 2


def test_hf_choices_labels_layout_matches_dict_layout(tqa_json, tqa_json_rows, tmp_path):
    hf = [
        {
            "question": r["question"],
            **{k: {"choices": list(r[k]), "labels": list(r[k].values())} for k in ("mc1_targets", "mc2_targets")},
        }
        for r in tqa_json_rows
    ]
    (tmp_path / "hf.json").write_text(json.dumps(hf), encoding="utf-8")
    (tmp_path / "hf.jsonl").write_text("\n".join(json.dumps(r) for r in hf) + "\n\n", encoding="utf-8")
    assert load_truthfulqa(tmp_path / "hf.json") == tqa_json
    assert load_truthfulqa(tmp_path / "hf.jsonl") == tqa_json


# --- TruthfulQA errors (tmp files) --------------------------------------------------------------------


def _good_row(i: int = 0) -> dict:
    return {
        "question": f"Question {i}?",
        "mc1_targets": {"Right.": 1, "Wrong.": 0},
        "mc2_targets": {"Right.": 1, "Also right.": 1, "Wrong.": 0},
    }


def _json_error(tmp_path: Path, bad: dict) -> str:
    path = tmp_path / "mc_task.json"
    path.write_text(json.dumps([_good_row(0), _good_row(1), bad]), encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_truthfulqa(tmp_path)
    return str(e.value)


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"mc1_targets": {"Right.": 0, "Wrong.": 0}}, "mc1_targets", "no true choice"),
        ({"mc1_targets": {"Right.": 1, "Wrong.": 1}}, "mc1_targets", "2 true choices"),
        ({"mc2_targets": {"Right.": 1}}, "mc2_targets", "no false choice"),
        ({"mc2_targets": {"Right.": 0, "Wrong.": 0}}, "mc2_targets", "no true choice"),
        ({"mc2_targets": {"Right.": 1, " ": 0}}, "mc2_targets", "empty text"),
        ({"question": "  "}, "question", "is empty"),
        ({"mc2_targets": {"Right.": 1, "Wrong.": 2}}, "mc2_targets", "label 2 is not valid"),
        ({"mc1_targets": {"choices": ["a", "b"], "labels": [1]}}, "mc1_targets", "labels is 1"),
    ],
)
def test_json_bad_rows_name_row_and_field(tmp_path, change, field, words):
    msg = _json_error(tmp_path, {**_good_row(2), **change})
    assert "mc_task.json, row index 2" in msg and f"field {field!r}" in msg and words in msg and "Fix:" in msg


def test_json_missing_field_and_repeated_key(tmp_path):
    bad = _good_row(2)
    del bad["mc2_targets"]
    msg = _json_error(tmp_path, bad)
    assert "row index 2" in msg and "'mc2_targets'" in msg and "missing" in msg
    path = tmp_path / "dup.json"
    path.write_text('[{"question": "q", "mc1_targets": {"a": 1, "b": 0, "a": 0}, "mc2_targets": {"a": 1, "b": 0}}]')
    with pytest.raises(DataError, match=r"row index 0, field 'mc1_targets'.*'a' is given more than once"):
        load_truthfulqa(path)


def _write_csv(path: Path, rows: list[list[str]], header: list[str] = CSV_HEADER) -> Path:
    with path.open("w", encoding="utf-8-sig", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _csv_row(**kw: str) -> list[str]:
    row = {
        "Type": "Adversarial",
        "Category": "Misc",
        "Question": "Q?",
        "Best Answer": "Yes",
        "Correct Answers": "Yes; Sure",
        "Incorrect Answers": "No; Never",
        "Source": "src",
    }
    row.update(kw)
    return [row[h] for h in CSV_HEADER]


def test_csv_small_file_semantics(tmp_path):
    (q,) = load_truthfulqa(_write_csv(tmp_path / "TruthfulQA.csv", [_csv_row(**{"Correct Answers": " Yes ;; Sure ;"})]))
    assert q.mc1 == (Choice("Yes", True), Choice("No", False), Choice("Never", False))
    assert q.mc2 == (Choice("Yes", True), Choice("Sure", True), Choice("No", False), Choice("Never", False))
    assert q.meta == {"Type": "Adversarial", "Category": "Misc", "Source": "src"}


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"Incorrect Answers": " ; "}, "Incorrect Answers", "no false choice"),
        ({"Correct Answers": ""}, "Correct Answers", "no true choice"),
        ({"Best Answer": " "}, "Best Answer", "is empty"),
        ({"Question": ""}, "Question", "is empty"),
        ({"Best Answer": "No"}, "Best Answer", "also listed in Incorrect Answers"),
    ],
)
def test_csv_bad_rows_name_line_and_field(tmp_path, change, field, words):
    path = _write_csv(tmp_path / "t.csv", [_csv_row(), _csv_row(**{"Question": "Q2?", **change})])
    with pytest.raises(DataError) as e:
        load_truthfulqa(path)
    msg = str(e.value)
    assert "t.csv, line 3" in msg and f"field {field!r}" in msg and words in msg


def test_csv_missing_column_and_short_row(tmp_path):
    header = [h for h in CSV_HEADER if h != "Best Answer"]
    path = _write_csv(tmp_path / "a.csv", [["x"] * len(header)], header=header)
    with pytest.raises(DataError, match=r"line 1 \(header\), field 'Best Answer': column is missing"):
        load_truthfulqa(path)
    path = _write_csv(tmp_path / "b.csv", [_csv_row(), _csv_row()[:4]])
    with pytest.raises(DataError, match=r"line 3, field 'Correct Answers': row has 4 fields"):
        load_truthfulqa(path)


def test_truthfulqa_path_errors(tmp_path):
    with pytest.raises(DataError, match="no mc_task.json or TruthfulQA.csv"):
        load_truthfulqa(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_truthfulqa(tmp_path / "nope.json")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown file type"):
        load_truthfulqa(tmp_path / "x.txt")


# --- generic JSONL ------------------------------------------------------------------------------------


def _jsonl(path: Path, objs: list) -> Path:
    path.write_text("\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n", encoding="utf-8")
    return path


def test_jsonl_round_trip(tmp_path):
    path = _jsonl(
        tmp_path / "bbq.jsonl",
        [
            {
                "id": "a",
                "question": "Who?",
                "context": "Two people.",
                "choices": [{"text": "X", "label": 0}, {"text": "Unknown", "label": True}, {"text": "Y", "label": 1}],
                "meta": {"bias": "age"},
            },
            "",
            {
                "question": "What?",
                "choices": [{"text": "p", "label": 1}, {"text": "q", "label": 0}, {"text": "r", "label": 0}],
                "mc1_choices": [{"text": "q", "label": 0}, {"text": "p", "label": 1}],
            },
        ],
    )
    a, b = load_jsonl(path)
    assert a.id == "a" and a.context == "Two people." and a.meta == {"bias": "age"}
    assert a.mc2 == (Choice("X", False), Choice("Unknown", True), Choice("Y", True))
    assert a.mc1 == (Choice("Unknown", True), Choice("X", False))  # first true, then every false
    assert b.id == "bbq-3" and b.context == ""  # default id: file stem and 1-based line number
    assert b.mc1 == (Choice("q", False), Choice("p", True))  # given mc1_choices keep their order
    assert load_dataset("jsonl", path) == (a, b)


@pytest.mark.parametrize(
    "obj, field, words",
    [
        ({"choices": [{"text": "a", "label": 1}, {"text": "b", "label": 0}]}, "question", "missing"),
        ({"question": "q"}, "choices", "missing"),
        ({"question": "q", "choices": [{"text": "a", "label": 1}]}, "choices", "no false choice"),
        (
            {"question": "q", "choices": [{"text": "a", "label": 0}, {"text": "b", "label": 0}]},
            "choices",
            "no true choice",
        ),
        (
            {"question": "q", "choices": [{"text": "", "label": 1}, {"text": "b", "label": 0}]},
            "choices[0].text",
            "is empty",
        ),
        (
            {"question": "q", "choices": [{"text": "a", "label": "1"}, {"text": "b", "label": 0}]},
            "choices[0].label",
            "not valid",
        ),
        ({"question": "q", "choices": [{"text": "a"}, {"text": "b", "label": 0}]}, "choices[0].label", "missing"),
        (
            {"question": "q", "choices": [{"text": "a", "label": 1}, {"text": "a", "label": 0}]},
            "choices",
            "more than once",
        ),
        (
            {
                "question": "q",
                "choices": [{"text": "a", "label": 1}, {"text": "b", "label": 0}],
                "mc1_choices": [{"text": "a", "label": 1}, {"text": "b", "label": 1}],
            },
            "mc1_choices",
            "2 true choices",
        ),
        (
            {"question": "q", "choices": [{"text": "a", "label": 1}, {"text": "b", "label": 0}], "mc1": []},
            "mc1",
            "unknown key",
        ),
        (
            {"id": 7, "question": "q", "choices": [{"text": "a", "label": 1}, {"text": "b", "label": 0}]},
            "id",
            "not a non-empty string",
        ),
    ],
)
def test_jsonl_errors_name_line_and_field(tmp_path, obj, field, words):
    good = {"question": "ok", "choices": [{"text": "a", "label": 1}, {"text": "b", "label": 0}]}
    path = _jsonl(tmp_path / "d.jsonl", [good, "", obj])
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    msg = str(e.value)
    assert "d.jsonl, line 3" in msg and f"field {field!r}" in msg and words in msg


def test_jsonl_duplicate_ids_and_bad_json(tmp_path):
    row = {"id": "x", "question": "q", "choices": [{"text": "a", "label": 1}, {"text": "b", "label": 0}]}
    with pytest.raises(DataError, match=r"line 2, field 'id': id 'x' was already used at line 1"):
        load_jsonl(_jsonl(tmp_path / "d.jsonl", [row, row]))
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        load_jsonl(_jsonl(tmp_path / "e.jsonl", [row, "{oops"]))


def test_load_dataset_errors():
    with pytest.raises(DataError, match="unknown dataset 'bigbench'.*truthfulqa, bbq, jsonl, toy"):
        load_dataset("bigbench")
    with pytest.raises(DataError, match="'bbq' needs its files.*--data-path"):
        load_dataset("bbq")
    with pytest.raises(DataError, match="needs a file"):
        load_dataset("jsonl")


# --- splits -------------------------------------------------------------------------------------------

IDS = [f"tqa-{i:04d}" for i in range(817)]


def test_split_sizes_disjoint_and_complete():
    s = split_ids(IDS)
    assert [len(s[k]) for k in ("train", "val", "test")] == [327, 82, 408]  # round(326.8), round(81.7), rest
    assert sum(len(v) for v in s.values()) == 817
    assert set(s["train"]).isdisjoint(s["val"]) and set(s["train"]).isdisjoint(s["test"])
    assert set(s["val"]).isdisjoint(s["test"])
    assert set().union(*s.values()) == set(IDS)


def test_split_deterministic_per_seed():
    assert split_ids(IDS, seed=3) == split_ids(IDS, seed=3)
    assert split_ids(IDS, seed=3)["train"] != split_ids(IDS, seed=4)["train"]


def test_split_keeps_groups_together():
    ids = [f"q{i}" for i in range(60)]
    groups = [f"g{i // 6}" for i in range(60)]  # 10 groups of 6
    s = split_ids(ids, seed=2, groups=groups)
    assert [len(s[k]) for k in ("train", "val", "test")] == [24, 6, 30]  # 4, 1 and 5 groups
    assert sorted(sum(s.values(), ())) == sorted(ids)
    part_of = {i: k for k, v in s.items() for i in v}
    for g in set(groups):
        assert len({part_of[i] for i, gi in zip(ids, groups, strict=True) if gi == g}) == 1
    with pytest.raises(ValueError, match="groups must label every id"):
        split_ids(ids, groups=groups[:-1])


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.5, 0.0, 0.5), (0.6, 0.2, 0.3), (-0.1, 0.6, 0.5)])
def test_split_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions|fraction"):
        split_ids(IDS, fractions)


def test_apply_split():
    qs = [
        MCQuestion(f"q{i}", f"Q{i}?", (Choice("a", True), Choice("b", False)), (Choice("a", True), Choice("b", False)))
        for i in range(10)
    ]
    s = split_ids([q.id for q in qs], seed=1)
    parts = apply_split(qs, s)
    assert {k: tuple(q.id for q in v) for k, v in parts.items()} == s
    with pytest.raises(ValueError, match="not in the dataset"):
        apply_split(qs[:5], s)


# --- prompt format ------------------------------------------------------------------------------------


def test_primer_is_six_shot_qa():
    lines = QA_PRIMER.split("\n")
    assert sum(line.startswith("Q: ") for line in lines) == 6
    assert QA_PRIMER.startswith("Q: What is human life expectancy in the United States?\nA: Human life")
    assert QA_PRIMER.endswith("A: The 1992 Olympics were held in Barcelona, Spain.")
    assert QA_PRIMER.count("\n\n") == 5


def test_prompt_strings():
    q = MCQuestion(
        "x", "Is it?", (Choice("Yes.", True), Choice("No.", False)), (Choice("Yes.", True), Choice("No.", False))
    )
    assert PromptFormat().context(q) == QA_PRIMER + "\n\nQ: Is it?\nA:"
    assert PromptFormat().continuation("Yes.") == " Yes."
    assert PromptFormat(primer="").context(q) == "Q: Is it?\nA:"
    qc = MCQuestion("y", "Who?", q.mc1, q.mc2, context="Ann met Bob.")
    assert PromptFormat().context(qc) == QA_PRIMER + "\n\nAnn met Bob.\nQ: Who?\nA:"
    assert PromptFormat(primer="").context(qc) == "Ann met Bob.\nQ: Who?\nA:"
