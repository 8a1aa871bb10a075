"""Row checks shared by every loader.

Every loader turns one record (a JSON object, a CSV line, a JSONL line) into an :class:`MCQuestion`
and runs it through :func:`check_question`. A bad record raises :class:`DataError`; nothing is ever
dropped silently, because a silently shrunk benchmark gives scores that look comparable but are not.

Messages have one shape, so a user can find and fix the record without reading code::

    <file>, <row>, field '<field>': <what is wrong>. Fix: <what to do>.

``<row>`` is ``line N`` (1-based, as an editor shows it) for line-based files and ``row index N``
(0-based, as ``json.load(...)[N]`` reaches it) for a JSON array.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpr.data.schema import Choice, DataError, MCQuestion


@dataclass(frozen=True)
class Where:
    """Where a record came from: the file (or hub dataset) and the row within it."""

    source: str
    row: str

    def error(self, field: str, problem: str, fix: str) -> DataError:
        return DataError(f"{self.source}, {self.row}, field {field!r}: {problem}. Fix: {fix}.")


def read_text(path: Path, fix: str) -> str:
    """The file as UTF-8 text (a leading BOM dropped), or a :class:`DataError` naming the line and column of
    the first byte that is not UTF-8 (a text-mode read names neither)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start - line_start + 1})."
            f" Fix: {fix}."
        ) from e


def parse_json(text: str, where: str, fix: str, **kwargs) -> Any:
    """``json.loads(text)``, refusing, with ``where`` (file and line) and ``fix``, what json accepts and no
    later step could use: nesting too deep for Python (json raises a RecursionError, which names nothing) and a
    lone UTF-16 surrogate escape such as ``\\ud800`` (valid JSON, but no text: it would fail only when the
    text is first encoded, after the model has loaded). A ``json.JSONDecodeError`` is left to the caller."""
    try:
        value = json.loads(text, **kwargs)
    except RecursionError:
        raise DataError(f"{where}: the JSON is nested too deeply to read. Fix: {fix}.") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start : e.end].encode("unicode_escape").decode()
        raise DataError(f"{where}: holds the escape {bad}, a lone surrogate that is no text. Fix: {fix}.") from None
    except RecursionError:
        raise DataError(f"{where}: the JSON is nested too deeply to read. Fix: {fix}.") from None
    return value


def require_field(record: Mapping[str, Any], name: str, where: Where, fix: str, shown: str | None = None) -> Any:
    """``record[name]``, or a DataError saying the field is missing. ``shown`` is the field's name in the
    message when it is nested (``choices[2].text``)."""
    if name not in record:
        present = ", ".join(repr(k) for k in record) or "none"
        raise where.error(shown or name, f"field is missing (fields present: {present})", fix)
    return record[name]


def require_text(value: Any, where: Where, field: str, fix: str) -> str:
    """A string with at least one non-space character, returned unchanged."""
    if not isinstance(value, str):
        raise where.error(field, f"expected a string, got {type(value).__name__} {value!r}", fix)
    if not value.strip():
        raise where.error(field, "is empty", fix)
    return value


def parse_label(value: Any, where: Where, field: str) -> bool:
    """A truth label: ``0``/``1`` or ``false``/``true``. Anything else (``"1"``, ``2``, ``0.5``) is refused,
    because guessing what a stray value meant would silently flip answers."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise where.error(
        field,
        f"label {value!r} is not valid",
        "use 1 or true for a true choice and 0 or false for a false one",
    )


def check_choices(choices: Sequence[Choice], where: Where, field: str, task: str) -> None:
    """The rules for one choice set; ``task`` is ``"mc1"`` (exactly one true) or ``"mc2"`` (at least one)."""
    if task not in ("mc1", "mc2"):
        raise ValueError(f"task must be 'mc1' or 'mc2', got {task!r}")
    seen: set[str] = set()
    for i, c in enumerate(choices):
        if not isinstance(c.text, str) or not c.text.strip():
            raise where.error(field, f"choice {i} has empty text", "give the choice text or remove it")
        if c.text in seen:
            raise where.error(
                field,
                f"choice text {c.text!r} appears more than once",
                "remove the repeat; a repeated choice is counted twice in MC2 and can tie with itself in MC1",
            )
        seen.add(c.text)
    n_true = sum(c.is_true for c in choices)
    n_false = len(choices) - n_true
    if task == "mc1" and n_true != 1:
        problem = "has no true choice" if n_true == 0 else f"has {n_true} true choices"
        raise where.error(
            field, f"MC1 {problem}; it needs exactly one", "mark exactly one choice (the best answer) true"
        )
    if task == "mc2" and n_true == 0:
        raise where.error(field, "MC2 has no true choice", "mark at least one choice true")
    if n_false == 0:
        raise where.error(
            field,
            f"{task.upper()} has no false choice",
            "add at least one false choice; a question with only true answers cannot be scored",
        )


def check_question(
    q: MCQuestion,
    where: Where,
    *,
    question_field: str = "question",
    mc1_field: str = "mc1",
    mc2_field: str = "mc2",
) -> MCQuestion:
    """Run every per-question rule and return ``q`` unchanged.

    The field names are the source's own (``"Best Answer"`` for the CSV, ``"mc1_targets"`` for
    ``mc_task.json``) so the message points at what the user can see in the file.
    """
    if not isinstance(q.id, str) or not q.id.strip():
        raise where.error("id", f"id {q.id!r} is empty or not a string", "give a non-empty string id")
    require_text(q.question, where, question_field, "give the question text")
    if not isinstance(q.context, str):
        raise where.error("context", f"expected a string, got {type(q.context).__name__}", "give a string or omit it")
    # MC2 first: where MC1 is derived from MC2 (generic JSONL), MC2's message is the one that says what to fix.
    check_choices(q.mc2, where, mc2_field, "mc2")
    check_choices(q.mc1, where, mc1_field, "mc1")
    return q


def check_unique_ids(questions: Iterable[MCQuestion], rows: Iterable[Where]) -> None:
    """Refuse two questions with one id: splits and results are keyed by id."""
    first: dict[str, Where] = {}
    for q, where in zip(questions, rows, strict=True):
        if q.id in first:
            raise where.error(
                "id",
                f"id {q.id!r} was already used at {first[q.id].row}",
                "give every question a unique id",
            )
        first[q.id] = where
