"""Datasets as tuples of :class:`MCQuestion`, plus splits and prompt formatting.

``load_dataset(name, path)`` is the one entry point the CLI uses; the loaders it dispatches to are
importable on their own. Nothing is read or downloaded at import time.
"""

from __future__ import annotations

import os

from hpr.data.prompts import QA_PRIMER, PromptFormat
from hpr.data.schema import Choice, DataError, MCQuestion
from hpr.data.splits import apply_split, split_groups, split_ids

__all__ = [
    "DATASETS",
    "Choice",
    "DataError",
    "MCQuestion",
    "PromptFormat",
    "QA_PRIMER",
    "apply_split",
    "load_dataset",
    "split_groups",
    "split_ids",
]

DATASETS = ("truthfulqa", "jsonl", "toy")
TRUTHFULQA_ENV = "HPR_TRUTHFULQA_PATH"
HF_TRUTHFULQA = ("truthfulqa/truthful_qa", "multiple_choice")


def load_dataset(name: str, path: str | os.PathLike[str] | None = None) -> tuple[MCQuestion, ...]:
    """Load dataset ``name`` (one of :data:`DATASETS`).

    * ``truthfulqa``: ``path`` (a folder, ``mc_task.json``, a JSONL of HF rows or ``TruthfulQA.csv``),
      else ``$HPR_TRUTHFULQA_PATH``, else the HF hub via the optional ``datasets`` package.
    * ``jsonl``: the generic format of :mod:`hpr.data.jsonl`; ``path`` is required.
    * ``toy``: the synthetic toy world of :mod:`hpr.toyworld` (no files, for tests and demos).
    """
    key = name.strip().lower()
    if key == "truthfulqa":
        from hpr.data.truthfulqa import load_truthfulqa

        path = path or os.environ.get(TRUTHFULQA_ENV) or None
        questions = load_truthfulqa(path) if path else _truthfulqa_from_hub()
        if not questions:  # e.g. a CSV with its header only
            raise DataError(f"{path or 'the TruthfulQA hub dataset'} holds no questions. Fix: point --data-path at "
                            "mc_task.json or a TruthfulQA.csv with rows.")
        return questions
    if key == "jsonl":
        if not path:
            raise DataError("dataset 'jsonl' needs a file. Fix: pass --data-path to a .jsonl file (format: hpr.data.jsonl).")
        from hpr.data.jsonl import load_jsonl

        return load_jsonl(path)
    if key == "toy":
        from hpr.toyworld import toy_dataset

        return toy_dataset()
    raise DataError(f"unknown dataset {name!r}. Fix: use one of {', '.join(DATASETS)}.")


def _truthfulqa_from_hub() -> tuple[MCQuestion, ...]:
    """The HF ``multiple_choice`` validation split; its rows are mc_task.json in the same order."""
    from hpr.data.truthfulqa import from_records

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
