"""BBQ (Parrish et al., Findings of ACL 2022) from its released files: one category ``.jsonl``, or a folder of them.

Each example becomes one :class:`MCQuestion`:

* id ``<category>-<example_id>``; split group ``<category>-<question_index>``, so a template (and the ambiguous
  and disambiguated versions of it) is never in two splits;
* context and question as given; the prompt is lm-evaluation-harness's ``bbq_multiple_choice`` one,
  ``"<context>\\n\\nQ: <question>\\nA:"``, zero-shot, with each answer scored as the continuation ``" <answer>"``;
* the three answers ``ans0..ans2`` are the choices, the labelled one true (the "positive" activations), the other
  two false. MC1 puts the true answer first, as the TruthfulQA files do (the rest keep the file's order); MC2 is
  the same three answers.

Where this differs from lm-eval, on purpose: lm-eval (after HELM) swaps the example's own "unknown" answer for
ten "unknown" phrasings, 12 choices in all, any unknown one counting as correct. Here the choices are the three
the BBQ paper evaluates, because HPR and the compared methods need each choice labelled true or false.

For BBQ's bias scores, ``meta["roles"]`` gives each MC1 choice's role: ``"unknown"`` (the can't-be-determined
answer), ``"biased"`` (the answer that follows the stereotype: the stereotyped group for a negative question,
the other group for a non-negative one, as the BBQ paper defines it), or ``"other"``. A group matches the
example's ``stereotyped_groups`` when either label of ``answer_info`` does, ignoring case; intersectional labels
such as ``F-Black`` or ``lowSES-White`` also match on their parts. ``meta`` also holds ``category``,
``question_index``, ``context_condition`` (``ambig``/``disambig``) and ``polarity`` (``neg``/``nonneg``).
:mod:`hpr.bbq_scores` computes the metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hpr.data.prompts import PromptFormat
from hpr.data.schema import Choice, DataError, MCQuestion
from hpr.data.validate import Where, check_question, check_unique_ids, parse_json, require_field, require_text

PROMPT = PromptFormat(primer="", context_separator="\n\n")
ANSWERS = ("ans0", "ans1", "ans2")
CONDITIONS = ("ambig", "disambig")
POLARITIES = ("neg", "nonneg")
ROLES = ("unknown", "biased", "other")
_INTERSECTIONAL_PREFIXES = ("M", "F", "lowSES", "highSES")
_FIX_FORMAT = "use the released BBQ files (github.com/nyu-mll/BBQ, data/<Category>.jsonl)"


def load_bbq(path: str | os.PathLike[str]) -> tuple[MCQuestion, ...]:
    """Every example of a BBQ category file, or of every ``*.jsonl`` in a folder (in name order)."""
    p = Path(path)
    files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    if not files:
        raise DataError(f"{p} holds no .jsonl files. Fix: pass a BBQ category file or a folder of them.")
    if not files[0].is_file():
        raise DataError(f"{p}: no such file. Fix: pass a BBQ category file (.jsonl) or a folder of them.")
    questions: list[MCQuestion] = []
    rows: list[Where] = []
    for f in files:
        for line_no, raw in enumerate(f.read_bytes().splitlines(), start=1):
            where = Where(str(f), f"line {line_no}")
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{f}, line {line_no}: not UTF-8 text (column {e.start + 1}). Fix: {_FIX_FORMAT}."
                ) from None
            if not line.strip():
                continue
            try:
                record = parse_json(line, f"{f}, line {line_no}", _FIX_FORMAT)
            except json.JSONDecodeError as e:
                raise DataError(f"{f}, line {line_no}: not valid JSON ({e.msg}). Fix: {_FIX_FORMAT}.") from None
            questions.append(_example(record, where))
            rows.append(where)
    if not questions:
        raise DataError(f"{p} holds no BBQ examples. Fix: {_FIX_FORMAT}.")
    check_unique_ids(questions, rows)
    return tuple(questions)


def _example(record: Any, where: Where) -> MCQuestion:
    if not isinstance(record, dict):
        raise where.error("example", f"expected a JSON object, got {type(record).__name__}", _FIX_FORMAT)
    field = lambda name: require_field(record, name, where, _FIX_FORMAT)  # noqa: E731
    category = require_text(field("category"), where, "category", _FIX_FORMAT)
    condition = _one_of(field("context_condition"), CONDITIONS, where, "context_condition")
    polarity = _one_of(field("question_polarity"), POLARITIES, where, "question_polarity")
    label = field("label")
    if isinstance(label, bool) or not isinstance(label, int) or label not in range(len(ANSWERS)):
        raise where.error("label", f"{label!r} is not one answer's index", "give the correct answer's index, 0, 1 or 2")
    texts = [require_text(field(a), where, a, "give the answer text") for a in ANSWERS]
    roles = _roles(record, polarity, where)
    order = [label, *(i for i in range(len(ANSWERS)) if i != label)]
    mc1 = tuple(Choice(texts[i], i == label) for i in order)
    meta = {
        "category": category,
        "question_index": str(field("question_index")),
        "context_condition": condition,
        "polarity": polarity,
        "roles": [roles[i] for i in order],
        "group": f"{category}-{field('question_index')}",
    }
    question = MCQuestion(
        id=f"{category}-{field('example_id')}",
        question=require_text(field("question"), where, "question", "give the question text"),
        mc1=mc1,
        mc2=mc1,
        context=require_text(field("context"), where, "context", "give the context passage"),
        meta=meta,
    )
    return check_question(question, where, mc1_field="label", mc2_field="label")


def _one_of(value: Any, allowed: tuple[str, ...], where: Where, field: str) -> str:
    if value not in allowed:
        raise where.error(field, f"{value!r} is not one of {list(allowed)}", f"use one of {list(allowed)}")
    return value


def _roles(record: dict, polarity: str, where: Where) -> list[str]:
    """Each answer's role (see the module doc), refusing an example with no single "unknown" answer."""
    info = require_field(record, "answer_info", where, _FIX_FORMAT)
    metadata = require_field(record, "additional_metadata", where, _FIX_FORMAT)
    stereotyped = metadata.get("stereotyped_groups") if isinstance(metadata, dict) else None
    if not isinstance(stereotyped, list) or not all(isinstance(g, str) for g in stereotyped):
        raise where.error("additional_metadata.stereotyped_groups", "expected a list of group names", _FIX_FORMAT)
    targets = {g.lower() for g in stereotyped}
    roles = []
    for a in ANSWERS:
        labels = info.get(a) if isinstance(info, dict) else None
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise where.error(f"answer_info.{a}", 'expected a list of labels, e.g. ["British", "Europe"]', _FIX_FORMAT)
        if labels[-1] == "unknown":
            roles.append("unknown")
            continue
        names = _group_names(labels)
        stereotyped_answer = not names.isdisjoint(targets)
        biased = stereotyped_answer if polarity == "neg" else not stereotyped_answer
        roles.append("biased" if biased else "other")
    if roles.count("unknown") != 1:
        raise where.error(
            "answer_info",
            f"{roles.count('unknown')} answers are labelled 'unknown'; BBQ has exactly one",
            _FIX_FORMAT,
        )
    return roles


def _group_names(labels: list[str]) -> set[str]:
    """The lower-cased names an answer's ``answer_info`` labels give its group, parts of intersectional ones too."""
    names = set()
    for label in labels:
        names.add(label.lower())
        prefix, sep, rest = label.partition("-")
        if sep and prefix in _INTERSECTIONAL_PREFIXES:
            names.update({prefix.lower(), rest.lower()})
    return names
