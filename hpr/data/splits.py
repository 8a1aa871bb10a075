"""Seeded train/val/test splits by question.

Splitting by question (not by contrastive pair) keeps every answer of a test question out of
training; the official HPR code splits TruthfulQA the same way. A split is just three tuples of ids,
so it can be saved next to results and re-applied to any loaded copy of the dataset.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence

from hpr.data.schema import MCQuestion

SPLIT_NAMES = ("train", "val", "test")


def split_ids(
    ids: Iterable[str],
    fractions: Sequence[float] = (0.4, 0.1, 0.5),
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> dict[str, tuple[str, ...]]:
    """Shuffle ``ids`` with ``random.Random(seed)`` and cut it into train/val/test.

    With ``groups`` (one label per id), whole groups are shuffled and cut instead, so ids that share a
    group never straddle two parts: the toy world groups its questions by entity, so no fact asked in a
    test question is ever the answer of a training question. The fractions then count groups.

    train and val get ``floor(f * n + 0.5)`` ids each and test the remainder, so the sizes always sum
    to ``n``. The permutation depends only on the seed and the input order (datasets load in file
    order), not on the Python hash seed or torch.
    """
    ids = list(ids)
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3:
        raise ValueError(f"fractions must be three numbers (train, val, test), got {fractions}")
    if any(not math.isfinite(f) or f <= 0 for f in fractions):
        raise ValueError(f"every split fraction must be positive, got {fractions}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions} (sum {sum(fractions)})")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"question ids must be unique, {dup!r} appears more than once")
    if groups is not None:
        groups = [str(g) for g in groups]
        if len(groups) != len(ids):
            raise ValueError(f"groups must label every id: {len(groups)} groups for {len(ids)} ids")
        members: dict[str, list[str]] = {}
        for i, g in zip(ids, groups, strict=True):
            members.setdefault(g, []).append(i)
        cut = split_ids(list(members), fractions, seed)
        return {part: tuple(i for g in labels for i in members[g]) for part, labels in cut.items()}
    order = ids[:]
    random.Random(seed).shuffle(order)
    n = len(order)
    n_train = math.floor(fractions[0] * n + 0.5)
    n_val = min(math.floor(fractions[1] * n + 0.5), n - n_train)
    return {
        "train": tuple(order[:n_train]),
        "val": tuple(order[n_train : n_train + n_val]),
        "test": tuple(order[n_train + n_val :]),
    }


def split_groups(questions: Iterable[MCQuestion]) -> list[str] | None:
    """Split groups of questions (``meta["group"]``), or None when no question names one."""
    questions = list(questions)
    if not any("group" in q.meta for q in questions):
        return None
    return [str(q.meta.get("group", q.id)) for q in questions]


def apply_split(
    questions: Iterable[MCQuestion], split: Mapping[str, Sequence[str]]
) -> dict[str, tuple[MCQuestion, ...]]:
    """The questions of each part of ``split``, in the split's order. An id the dataset lacks is an error:
    it means the split was made for another dataset or another file of it."""
    by_id: dict[str, MCQuestion] = {}
    for q in questions:
        if q.id in by_id:
            raise ValueError(f"question id {q.id!r} appears more than once in the dataset")
        by_id[q.id] = q
    out = {}
    for name, ids in split.items():
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(
                f"split {name!r} names {len(missing)} id(s) not in the dataset, e.g. {missing[:3]}; "
                "the split was made for a different dataset or source file"
            )
        out[name] = tuple(by_id[i] for i in ids)
    return out
