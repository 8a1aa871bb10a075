"""Neutral text for the capability step: passages no edit was fitted on and no model under test wrote.

The shipped corpus, ``neutral/neutral_english.txt`` beside this module, is 298 passages (about 29,500 words) of
two public-domain English texts: Lewis Carroll's *Alice's Adventures in Wonderland* (1865) and the Constitution of
the United States (1787). ``neutral/SOURCES.md`` says where they come from and how
``scripts/neutral_corpus.py`` rebuilds the file. A passage file is plain UTF-8 text, passages separated by
blank lines.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "neutral" / "neutral_english.txt"


def read_passages(path: str | os.PathLike[str] | None = None) -> list[str]:
    """The passages of ``path`` (default: the shipped corpus); a missing, binary or empty file is refused with
    a one-line error naming it."""
    p = SHIPPED if path is None else Path(path)
    if not p.is_file():
        raise ValueError(f"neutral text {p}: no such file; pass a UTF-8 text file of blank-line separated passages")
    raw = p.read_bytes()
    if b"\0" in raw:
        raise ValueError(f"neutral text {p} is binary (it holds NUL bytes); pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"neutral text {p} is not UTF-8 (byte {e.start}); pass a UTF-8 text file") from None
    passages = [" ".join(block.split()) for block in text.split("\n\n")]
    passages = [b for b in passages if b]
    if not passages:
        raise ValueError(f"neutral text {p} holds no text; pass a file of blank-line separated passages")
    return passages


def evenly_spaced(passages: Sequence[str], n: int) -> list[str]:
    """``n`` passages spread evenly over the file (every source of a mixed file is represented), in order."""
    if n >= len(passages):
        return list(passages)
    return [passages[i * len(passages) // n] for i in range(n)]


def fingerprint(passages: Sequence[str]) -> str:
    """sha256 of the passages as used: a cached measure is reused only for the same text."""
    return hashlib.sha256("\n\n".join(passages).encode()).hexdigest()
