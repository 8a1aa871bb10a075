"""A generic JSONL multiple-choice format, so new data (BBQ, SEQ, Toxigen, your own) needs no code.

Format
------
UTF-8 text, one JSON object per line; blank lines are skipped. Each object::

    {"id": "bbq-17",                      # optional string; default "<file stem>-<line number>"
     "question": "Who was bad at math?",  # required, non-empty
     "context": "A boy and a girl ...",   # optional passage shown before the question
     "choices": [                         # required: the MC2 set, >= 1 true and >= 1 false
         {"text": "Can't be determined", "label": 1},
         {"text": "The girl", "label": 0},
         {"text": "The boy", "label": 0}],
     "mc1_choices": [...],                # optional, same shape, exactly one true and >= 1 false
     "meta": {...}}                       # optional object, carried along untouched

* ``label`` is ``1``/``0`` or ``true``/``false``; nothing else is accepted.
* Without ``mc1_choices``, MC1 is the *first* true choice of ``choices`` followed by all its false
  choices, in order. The true one comes first as in TruthfulQA, so a tie in log-likelihood resolves
  the way lm-evaluation-harness resolves it.
* Choice texts must be non-empty and distinct within a set (a repeat would be counted twice in MC2).
* ids must be unique within the file; splits and results refer to questions by id.
* Unknown keys are an error (a misspelt ``mc1_choice`` would otherwise be ignored silently); put
  extra information under ``meta``.

The prompt is ``[primer]\\n\\n[context]\\nQ: [question]\\nA:`` and each choice is scored as the
continuation `` [text]`` (see :mod:`hpr.data.prompts`). Every bad line raises :class:`DataError`
naming the file, the 1-based line number and the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hpr.data.schema import Choice, DataError, MCQuestion
from hpr.data.validate import (
    Where,
    check_question,
    check_unique_ids,
    parse_json,
    parse_label,
    require_field,
    require_text,
)

KEYS = ("id", "question", "context", "choices", "mc1_choices", "meta")
CHOICE_KEYS = ("text", "label")


def load_jsonl(path: str | os.PathLike[str]) -> tuple[MCQuestion, ...]:
    """Load a generic JSONL file (format in the module docstring)."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p} is a folder. Fix: pass the path of a .jsonl file in the format of hpr.data.jsonl.")
    if not p.is_file():
        raise DataError(f"{p}: no such file. Fix: pass the path of a .jsonl file in the format of hpr.data.jsonl.")
    qs, rows = [], []
    # lines decoded one by one, so a non-UTF-8 byte is reported with its line
    for line_no, raw in enumerate(p.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{p}, line {line_no}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                f"{e.start + 1}). Fix: save the file as UTF-8 JSONL."
            ) from None
        if not line.strip():
            continue
        where = Where(str(p), f"line {line_no}")
        try:
            rec = parse_json(line, f"{p}, line {line_no}", "one JSON object per line, of text")
        except json.JSONDecodeError as e:
            raise DataError(f"{p}, line {line_no}: not valid JSON ({e.msg}). Fix: one JSON object per line.") from e
        qs.append(_parse(rec, f"{p.stem}-{line_no}", where))
        rows.append(where)
    if not qs:
        raise DataError(f"{p} holds no questions. Fix: write one JSON object per line (format: hpr.data.jsonl).")
    check_unique_ids(qs, rows)
    return tuple(qs)


def _parse(rec: Any, default_id: str, where: Where) -> MCQuestion:
    if not isinstance(rec, dict):
        raise where.error("question", f"expected a JSON object, got {type(rec).__name__}", "write one object per line")
    unknown = [k for k in rec if k not in KEYS]
    if unknown:
        raise where.error(unknown[0], "unknown key", f"use only {list(KEYS)}; put extra data under 'meta'")
    qid = rec.get("id", default_id)
    if not isinstance(qid, str) or not qid.strip():
        raise where.error("id", f"id {qid!r} is not a non-empty string", 'write the id as a string, e.g. "17"')
    question = require_text(
        require_field(rec, "question", where, "give the question text"), where, "question", "give the question text"
    )
    context = "" if rec.get("context") is None else rec["context"]
    if not isinstance(context, str):
        raise where.error(
            "context", f"expected a string, got {type(context).__name__}", "give the context as a string or omit it"
        )
    meta = {} if rec.get("meta") is None else rec["meta"]
    if not isinstance(meta, dict):
        raise where.error(
            "meta", f"expected an object, got {type(meta).__name__}", "give meta as a JSON object or omit it"
        )
    mc2 = _choices(
        require_field(rec, "choices", where, 'give "choices": [{"text": ..., "label": 0|1}, ...]'), where, "choices"
    )
    if "mc1_choices" in rec:
        mc1 = _choices(rec["mc1_choices"], where, "mc1_choices")
        mc1_field = "mc1_choices"
    else:
        trues = [c for c in mc2 if c.is_true]
        mc1 = tuple(trues[:1]) + tuple(c for c in mc2 if not c.is_true)
        mc1_field = "choices"
    q = MCQuestion(id=qid, question=question, mc1=mc1, mc2=mc2, context=context, meta=dict(meta))
    return check_question(q, where, mc1_field=mc1_field, mc2_field="choices")


def _choices(value: Any, where: Where, field: str) -> tuple[Choice, ...]:
    fix = 'give a list like [{"text": "...", "label": 1}, {"text": "...", "label": 0}]'
    if not isinstance(value, list) or not value:
        raise where.error(field, f"expected a non-empty list, got {value!r}"[:200], fix)
    out = []
    for i, c in enumerate(value):
        sub = f"{field}[{i}]"
        if not isinstance(c, dict):
            raise where.error(sub, f"expected an object, got {type(c).__name__}", fix)
        unknown = [k for k in c if k not in CHOICE_KEYS]
        if unknown:
            raise where.error(f"{sub}.{unknown[0]}", "unknown key", f"a choice has only {list(CHOICE_KEYS)}")
        text = require_text(
            require_field(c, "text", where, fix, f"{sub}.text"), where, f"{sub}.text", "give the choice text"
        )
        label = parse_label(require_field(c, "label", where, fix, f"{sub}.label"), where, f"{sub}.label")
        out.append(Choice(text, label))
    return tuple(out)
