"""Rebuild ``hpr/data/neutral/neutral_english.txt``, the neutral text of the capability step, from its sources.

Usage: ``python scripts/neutral_corpus.py EXAMPLES_DIR`` where ``EXAMPLES_DIR`` is the ``examples/`` folder of
the ``wordcloud`` 1.9.6 source distribution on PyPI (``pip download --no-deps --no-binary :all:
wordcloud==1.9.6`` fetches it; unpack it). Two public-domain texts are taken from it:

- ``alice.txt``: Lewis Carroll, *Alice's Adventures in Wonderland* (1865), Project Gutenberg eBook #11. Only
  the book's own text is kept (between the eBook's start and end markers), without the title page, chapter
  headings or verse; Project Gutenberg's header, license and trademark are all dropped, which is what its
  license asks of anyone redistributing the bare public-domain text.
- ``constitution.txt``: the Constitution of the United States (1787), without its article and section
  headings.

Paragraphs are unwrapped and joined, in order, into passages of at least ``MIN_WORDS`` words (a passage ends
at a paragraph's end). Output: one passage per line-separated block (blank line between passages).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

MIN_WORDS = 70
OUT = Path(__file__).resolve().parent.parent / "hpr" / "data" / "neutral" / "neutral_english.txt"


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, each unwrapped onto one line; indented blocks (verse) dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue
        out.append(" ".join(line.strip() for line in lines))
    return out


def alice(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8-sig")
    start = text.index("*** START OF THIS PROJECT GUTENBERG EBOOK")
    end = text.index("*** END OF THIS PROJECT GUTENBERG EBOOK")
    body = text[text.index("\n", start) : end]
    body = body[body.index("CHAPTER I.") :]  # the title page before it
    kept = [p for p in paragraphs(body) if not p.startswith("CHAPTER ") and p != "THE END"]
    return [p.replace("_", "") for p in kept]  # Gutenberg's _italics_ markers


def constitution(path: Path) -> list[str]:
    kept = paragraphs(path.read_text(encoding="utf-8"))
    return [p for p in kept if not re.fullmatch(r"(Article|Section|Amendment)\.? ?[IVXL0-9]*\.?", p)]


def passages(paras: list[str]) -> list[str]:
    out, current = [], []
    for p in paras:
        current.append(p)
        if sum(len(x.split()) for x in current) >= MIN_WORDS:
            out.append(" ".join(current))
            current = []
    return out


def main(examples: str) -> int:
    folder = Path(examples)
    texts = passages(alice(folder / "alice.txt")) + passages(constitution(folder / "constitution.txt"))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(texts)} passages, {sum(len(t.split()) for t in texts)} words")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    raise SystemExit(main(sys.argv[1]))
