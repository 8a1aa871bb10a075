"""One contrastive multiple-choice format for every dataset.

A dataset is a tuple of :class:`MCQuestion`. Each question has an MC1 choice set (exactly one true
choice) and an MC2 choice set (at least one true and one false choice). Contrastive training pairs
for probes and editors are every (true, false) pair of the MC2 set under the same prompt, as the
official HPR code does.

For generation scoring (:mod:`hpr.gen_scoring`) a question also gives its raw reference answers,
:meth:`MCQuestion.generation_answers`: TruthfulQA's generation references where the source holds them
(``gen_answers``, set by :mod:`hpr.data.truthfulqa` from ``TruthfulQA.csv``), else the MC2 set's true and false
texts. ``gen_answers`` takes no part in equality, hashing, ``repr`` or the dataset fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Choice:
    text: str
    is_true: bool


@dataclass(frozen=True)
class MCQuestion:
    """One question. ``id`` is unique and stable within its dataset (it is what splits record)."""

    id: str
    question: str
    mc1: tuple[Choice, ...]
    mc2: tuple[Choice, ...]
    context: str = ""  # optional passage shown before the question (generic JSONL); "" for TruthfulQA
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    # (true answers, false answers) as the source's generation references give them, or None: see the module doc
    gen_answers: tuple[tuple[str, ...], tuple[str, ...]] | None = field(
        default=None, compare=False, hash=False, repr=False
    )

    def true_false_pairs(self) -> list[tuple[str, str]]:
        """All (true answer, false answer) pairs of the MC2 set."""
        trues = [c.text for c in self.mc2 if c.is_true]
        falses = [c.text for c in self.mc2 if not c.is_true]
        return [(t, f) for t in trues for f in falses]

    def generation_answers(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(true_answers, false_answers)`` for generation scoring, unformatted: ``gen_answers`` when the source
        gave them, else the texts of the MC2 set's true and false choices, in order."""
        if self.gen_answers is not None:
            return self.gen_answers
        return tuple(c.text for c in self.mc2 if c.is_true), tuple(c.text for c in self.mc2 if not c.is_true)


class DataError(ValueError):
    """A dataset row is unusable. The message names the source, the row and the field."""
