"""TruthfulQA (Lin et al., 2022) as :class:`MCQuestion` tuples, from local files or hub rows.

Two sources, both from the official repository (Apache-2.0):

* ``mc_task.json`` -- the file lm-evaluation-harness scores (via the HF ``multiple_choice`` config).
  A list of ``{question, mc1_targets, mc2_targets}``; each targets field maps choice text to 1/0.
  The HF layout ``{"choices": [...], "labels": [...]}`` per targets field is accepted too, as is a
  JSONL file of such rows. Texts are kept verbatim and choices in file order (the true MC1 answer is
  first, which decides ties exactly as lm-eval does). ids are ``tqa-NNNN``, the 0-based row index,
  which is also the row order of the HF ``validation`` split.
* ``TruthfulQA.csv`` -- the generation-task table. MC1 = Best Answer (true) + Incorrect Answers
  (false); MC2 = Correct Answers (true) + Incorrect Answers (false); answers are ``;``-separated.
  Its row order is *not* that of ``mc_task.json``, so its ids are ``tqa-csv-NNNN``: a split saved
  for one source then fails loudly on the other instead of silently pairing different questions.
  The CSV answers carry no final period while ``mc_task.json`` adds one, so log-likelihoods (and
  scores) differ slightly between the two sources; use ``mc_task.json`` to reproduce lm-eval.

Generation references (:meth:`MCQuestion.generation_answers`, for :mod:`hpr.gen_scoring`): TruthfulQA's
generation task scores against the CSV's "Correct Answers" / "Incorrect Answers", ``;``-separated, as listed
(repeats and an answer listed on both sides kept, unlike the MC sets below: the max over references does not
mind a repeat, and lm-eval's ``generation`` rows keep both sides). Loading the CSV sets them on every question.
Loading ``mc_task.json`` (or a JSONL of its rows) looks for a ``TruthfulQA.csv`` in the same folder and sets them
on each question whose text equals a CSV question exactly; a question without a match, a folder without the CSV
or a CSV that does not load (it never breaks loading the JSON) leaves ``gen_answers`` unset, so the question
falls back to its mc2 targets, which are nearly the same sets with a final period. The official files match on
816 of 817 questions (the CSV has no "Are all women women?"; it has "Are all plants plants?" instead). None of this
touches the loaded choices, ids, meta or the dataset fingerprint.

The CSV has a few repeated answers. A repeat within one set is kept once; an answer listed as both
correct and incorrect is kept once, as false, at its first position -- which is what the official
``mc_task.json`` holds for those questions (it was built as a Python dict). Each such repair is
recorded in ``meta["repairs"]``; every other problem raises :class:`DataError`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hpr.data.schema import Choice, DataError, MCQuestion
from hpr.data.validate import (
    Where,
    check_question,
    check_unique_ids,
    parse_json,
    parse_label,
    read_text,
    require_field,
    require_text,
)

TRUTHFULQA_ENV = "HPR_TRUTHFULQA_PATH"
HF_TRUTHFULQA = ("truthfulqa/truthful_qa", "multiple_choice")
JSON_NAME = "mc_task.json"
CSV_NAME = "TruthfulQA.csv"
CSV_COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")
CSV_META_COLUMNS = ("Type", "Category", "Source")

_JSON_FIX = "each row needs 'question', 'mc1_targets' and 'mc2_targets' as in the official mc_task.json"


def load_truthfulqa(path: str | os.PathLike[str]) -> tuple[MCQuestion, ...]:
    """Load TruthfulQA from a directory (``mc_task.json`` preferred, else ``TruthfulQA.csv``) or a file
    (``.json``, ``.jsonl`` or ``.csv``)."""
    p = Path(path)
    if p.is_dir():
        for name in (JSON_NAME, CSV_NAME):
            if (p / name).is_file():
                return load_truthfulqa(p / name)
        raise DataError(
            f"{p}: no {JSON_NAME} or {CSV_NAME} in this directory. Fix: point to a folder holding one of them."
        )
    if not p.is_file():
        raise DataError(f"{p}: no such file or directory. Fix: pass the path of {JSON_NAME} or {CSV_NAME}.")
    suffix = p.suffix.lower()
    if suffix == ".json":
        return with_csv_answers(_load_json(p), p.parent / CSV_NAME)
    if suffix == ".jsonl":
        return with_csv_answers(_load_jsonl(p), p.parent / CSV_NAME)
    if suffix == ".csv":
        return _load_csv(p)
    raise DataError(f"{p}: unknown file type {suffix!r}. Fix: use a .json, .jsonl or .csv TruthfulQA file.")


def truthfulqa_from_hub() -> tuple[MCQuestion, ...]:
    """The HF ``multiple_choice`` validation split; its rows are mc_task.json in the same order."""
    repo, config = HF_TRUTHFULQA
    try:
        import datasets

        rows = datasets.load_dataset(repo, config)["validation"]
    except Exception as e:  # ImportError, no network, hub errors: all mean "use a local file"
        raise DataError(
            f"TruthfulQA: no local path given and the HF hub dataset {repo!r} ({config!r}) could not be loaded "
            f"({type(e).__name__}: {e}). Fix: pass --data-path to a local mc_task.json or TruthfulQA.csv "
            f"(or a folder holding one), or set {TRUTHFULQA_ENV}."
        ) from e
    return from_records(rows, f"hf:{repo}/{config}/validation")


def from_records(records: Iterable[Mapping[str, Any]], source: str) -> tuple[MCQuestion, ...]:
    """Questions from ``mc_task.json``-style records (dict or ``{choices, labels}`` targets), e.g. the rows
    of the HF ``truthfulqa/truthful_qa`` ``multiple_choice`` validation split."""
    qs: list[MCQuestion] = []
    rows: list[Where] = []
    for i, rec in enumerate(records):
        where = Where(source, f"row index {i}")
        qs.append(_from_record(rec, i, where))
        rows.append(where)
    check_unique_ids(qs, rows)
    return tuple(qs)


def with_csv_answers(questions: tuple[MCQuestion, ...], csv_path: Path) -> tuple[MCQuestion, ...]:
    """``questions`` with ``gen_answers`` from the ``TruthfulQA.csv`` at ``csv_path`` where a CSV question has
    exactly the same text; unchanged when the file is missing or does not load."""
    if not csv_path.is_file():
        return questions
    try:
        by_text = {q.question: q.gen_answers for q in _load_csv(csv_path)}
    except (DataError, OSError, UnicodeDecodeError, csv.Error):
        return questions  # the JSON loads as before; generation falls back to the mc2 targets
    return tuple(
        dataclasses.replace(q, gen_answers=by_text[q.question]) if q.question in by_text else q for q in questions
    )


# --- JSON / JSONL -------------------------------------------------------------------------------------


class _Object(dict):
    """A JSON object that remembers keys given more than once (``json`` keeps only the last one, which
    in a targets dict would silently drop or relabel a choice)."""

    repeated: tuple[str, ...] = ()


def _object_hook(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        keys = [k for k, _ in pairs]
        obj.repeated = tuple(k for i, k in enumerate(keys) if k in keys[:i])
    return obj


def _load_json(path: Path) -> tuple[MCQuestion, ...]:
    text = read_text(path, "save the file as UTF-8 JSON")
    try:
        data = parse_json(text, str(path), "repair the file", object_pairs_hook=_object_hook)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). Fix: repair the file."
        ) from e
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of question objects, got {type(data).__name__}. Fix: {_JSON_FIX}."
        )
    return from_records(data, str(path))


def _load_jsonl(path: Path) -> tuple[MCQuestion, ...]:
    qs: list[MCQuestion] = []
    rows: list[Where] = []
    with io.StringIO(read_text(path, "save the file as UTF-8 JSONL")) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = Where(str(path), f"line {line_no}")
            try:
                rec = parse_json(line, f"{path}, line {line_no}", _JSON_FIX, object_pairs_hook=_object_hook)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}, line {line_no}: not valid JSON ({e.msg}). Fix: one JSON object per line."
                ) from e
            qs.append(_from_record(rec, len(qs), where))
            rows.append(where)
    check_unique_ids(qs, rows)
    return tuple(qs)


def _from_record(rec: Any, index: int, where: Where) -> MCQuestion:
    if not isinstance(rec, Mapping):
        raise where.error("question", f"expected a JSON object, got {type(rec).__name__}", _JSON_FIX)
    question = require_text(
        require_field(rec, "question", where, _JSON_FIX), where, "question", "give the question text"
    )
    mc1 = _targets(require_field(rec, "mc1_targets", where, _JSON_FIX), where, "mc1_targets")
    mc2 = _targets(require_field(rec, "mc2_targets", where, _JSON_FIX), where, "mc2_targets")
    q = MCQuestion(id=f"tqa-{index:04d}", question=question, mc1=mc1, mc2=mc2)
    return check_question(q, where, mc1_field="mc1_targets", mc2_field="mc2_targets")


def _targets(value: Any, where: Where, field: str) -> tuple[Choice, ...]:
    """``{text: 0/1}`` (mc_task.json) or ``{"choices": [...], "labels": [...]}`` (HF), in file order."""
    fix = 'use {"choice text": 1 or 0, ...} or {"choices": [...], "labels": [...]}'
    if not isinstance(value, Mapping):
        raise where.error(field, f"expected an object, got {type(value).__name__}", fix)
    if set(value) == {"choices", "labels"} and isinstance(value["choices"], list):
        texts, labels = value["choices"], value["labels"]
        if not isinstance(labels, list) or len(labels) != len(texts):
            n = len(labels) if isinstance(labels, list) else type(labels).__name__
            raise where.error(field, f"{len(texts)} choices but labels is {n}", "give one label per choice")
        pairs = list(zip(texts, labels, strict=True))
    else:
        repeated = getattr(value, "repeated", ())
        if repeated:
            raise where.error(field, f"choice text {repeated[0]!r} is given more than once", "remove the repeat")
        pairs = list(value.items())
    out = []
    for i, (text, label) in enumerate(pairs):
        if not isinstance(text, str):
            raise where.error(
                field, f"choice {i} is {type(text).__name__} {text!r}, not text", "give each choice as a string"
            )
        out.append(Choice(text, parse_label(label, where, field)))
    return tuple(out)


# --- CSV ----------------------------------------------------------------------------------------------


def _load_csv(path: Path) -> tuple[MCQuestion, ...]:
    # read_text drops the official file's BOM, which would otherwise stick to the first column name.
    with io.StringIO(read_text(path, f"save the file as UTF-8 CSV, as the official {CSV_NAME}"), newline="") as f:
        reader = csv.reader(f)
        try:
            return _csv_questions(path, reader)
        except csv.Error as e:  # e.g. an unclosed quote that runs a field past the csv module's 131,072 characters
            raise DataError(
                f"{path}, line {reader.line_num}: not readable as CSV ({e}). Fix: close every quoted field "
                "and keep each field under 131,072 characters."
            ) from e


def _csv_questions(path: Path, reader) -> tuple[MCQuestion, ...]:
    """The questions of a CSV read by ``reader``, its header checked first."""
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: the file is empty. Fix: use the official {CSV_NAME}.")
    header = [h.strip() for h in header]
    header_where = Where(str(path), "line 1 (header)")
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise header_where.error(
            repeated[0], f"column is given {header.count(repeated[0])} times", "keep one column of each name"
        )
    for col in CSV_COLUMNS:
        if col not in header:
            raise header_where.error(
                col, f"column is missing (columns: {header})", f"the CSV needs columns {list(CSV_COLUMNS)}"
            )
    qs: list[MCQuestion] = []
    rows: list[Where] = []
    last_line = reader.line_num
    for cells in reader:
        where = Where(str(path), f"line {last_line + 1}")
        last_line = reader.line_num
        if not cells:
            continue  # a blank line, not a row
        if len(cells) != len(header):
            raise where.error(
                header[len(cells)] if len(cells) < len(header) else header[-1],
                f"row has {len(cells)} fields but the header has {len(header)}",
                "quote fields that contain commas and give every column",
            )
        qs.append(_from_csv_row(dict(zip(header, cells, strict=True)), len(qs), where))
        rows.append(where)
    check_unique_ids(qs, rows)
    return tuple(qs)


def _split(cell: str) -> list[str]:
    return [p.strip() for p in cell.split(";") if p.strip()]


def _from_csv_row(row: dict[str, str], index: int, where: Where) -> MCQuestion:
    question = require_text(row["Question"], where, "Question", "give the question text").strip()
    best = require_text(row["Best Answer"], where, "Best Answer", "give the best (true) answer").strip()
    correct, incorrect = _split(row["Correct Answers"]), _split(row["Incorrect Answers"])
    if not correct:
        raise where.error("Correct Answers", "MC2 has no true choice", "give at least one ';'-separated correct answer")
    if not incorrect:
        raise where.error("Incorrect Answers", "no false choice", "give at least one ';'-separated incorrect answer")
    if best in incorrect:
        raise where.error(
            "Best Answer", f"{best!r} is also listed in Incorrect Answers", "remove it from one of the two"
        )
    repairs: list[str] = []
    mc1 = _merge([(best, True)] + [(t, False) for t in incorrect], repairs, "MC1")
    mc2 = _merge([(t, True) for t in correct] + [(t, False) for t in incorrect], repairs, "MC2")
    meta: dict[str, Any] = {k: row[k].strip() for k in CSV_META_COLUMNS if k in row}
    if repairs:
        meta["repairs"] = tuple(repairs)
    q = MCQuestion(
        id=f"tqa-csv-{index:04d}",
        question=question,
        mc1=mc1,
        mc2=mc2,
        meta=meta,
        gen_answers=(tuple(correct), tuple(incorrect)),
    )
    return check_question(
        q, where, question_field="Question", mc1_field="Incorrect Answers", mc2_field="Correct Answers"
    )


def _merge(pairs: list[tuple[str, bool]], repairs: list[str], task: str) -> tuple[Choice, ...]:
    """Keep each text once, at its first position, with its last label (dict semantics, as mc_task.json)."""
    label: dict[str, bool] = {}
    for text, is_true in pairs:
        if text in label:
            if label[text] == is_true:
                repairs.append(f"{task}: repeated choice {text!r} kept once")
            else:
                repairs.append(f"{task}: {text!r} listed as both correct and incorrect, kept once as false")
        label[text] = is_true if text not in label else (label[text] and is_true)
    return tuple(Choice(t, v) for t, v in label.items())
