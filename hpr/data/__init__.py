"""Datasets as tuples of :class:`MCQuestion`, plus splits and prompt formatting.

The loaders (:mod:`hpr.data.truthfulqa`, :mod:`hpr.data.jsonl`) are importable on their own;
:func:`hpr.sources.load_dataset` picks one by name (the toy world's questions among them). Nothing is read or
downloaded at import time.
"""

from __future__ import annotations

from hpr.data.prompts import QA_PRIMER, PromptFormat
from hpr.data.schema import Choice, DataError, MCQuestion
from hpr.data.splits import apply_split, split_groups, split_ids

__all__ = [
    "Choice",
    "DataError",
    "MCQuestion",
    "PromptFormat",
    "QA_PRIMER",
    "apply_split",
    "split_groups",
    "split_ids",
]
