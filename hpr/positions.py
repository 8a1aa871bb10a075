"""Which token positions an editor edits, and what each position of the running forward pass is.

Methods differ in where their authors apply the edit (``../shared/reference``): ITI's MC scorer shifts the
heads from the answer on, CAA adds its vector from the end of the instruction on, SADI patches the last
prompt token, HPR's lm-eval path edits every position. An editor names its choice in its config
(``positions``); the code that runs the model marks, for each forward pass, what every position is, from
token counts it already has (never from strings). An editor's hook then edits the selected positions and
leaves every other one bit-identical.

Position kinds (bit flags, so one position can be two things):

- ``PROMPT_END``: the context's last token, whose output predicts the first answer token;
- ``ANSWER``: a continuation (answer) token, or a token fed back in generation;
- ``NEWEST``: the last position of a generation pass (the prefill's last token, then each new token).

Modes (an editor's ``positions``):

- ``all``: every position of every forward pass (the context included);
- ``answer``: answer tokens when scoring or collecting; the newest token of each pass in generation
  (honest_llama's legacy ITI);
- ``from_prompt_end``: the context's last token and the answer tokens; the newest token in generation (CAA:
  from the end of the instruction on);
- ``prompt_end``: the context's last token only; in generation the prefill's last token (SADI).

A pass nobody marked (a model called directly) has no answer positions to find: an editor whose mode is
not ``all`` refuses it with an error saying what to do, rather than editing nothing or everything.
:func:`as_answer` marks every position of the passes inside it as an answer token (neutral text, as in the
capability measures).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar

import torch
from torch import Tensor

PROMPT_END, ANSWER, NEWEST = 1, 2, 4
MODES = ("all", "answer", "from_prompt_end", "prompt_end")
HELP = f"positions edited (hpr.positions): {' | '.join(MODES)}"  # every editor config's positions field
_SELECTS = {"answer": ANSWER | NEWEST, "from_prompt_end": PROMPT_END | ANSWER | NEWEST, "prompt_end": PROMPT_END}
_EVERY_TOKEN_IS_ANSWER = object()

# The kinds [batch, pos] (int8) of the forward pass that is running, or a marker, or None when unmarked.
_current: ContextVar[object] = ContextVar("hpr_positions", default=None)


def check_mode(mode: str, name: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a ``ValueError`` naming them."""
    if mode not in MODES:
        raise ValueError(f"{name} must be one of {MODES}, got {mode!r}")
    return mode


@contextlib.contextmanager
def marked(kinds: Tensor) -> Iterator[None]:
    """Hooks of the forward pass(es) run inside see ``kinds [batch, pos]`` (bit flags of this module)."""
    token = _current.set(kinds)
    try:
        yield
    finally:
        _current.reset(token)


@contextlib.contextmanager
def as_answer() -> Iterator[None]:
    """Every position of every pass inside counts as an answer token (for text that is all continuation)."""
    token = _current.set(_EVERY_TOKEN_IS_ANSWER)
    try:
        yield
    finally:
        _current.reset(token)


def context_kinds(batch: int, width: int) -> Tensor:
    """A pass over context tokens only (a shared primer, the body of each question): nothing to edit there
    for the modes that skip the context."""
    return torch.zeros(batch, width, dtype=torch.int8)


def continuation_kinds(lengths: Sequence[int], width: int) -> Tensor:
    """Rows of ``[last context token] + continuation``, right-padded (:mod:`hpr.continuations`)."""
    kinds = torch.zeros(len(lengths), width, dtype=torch.int8)
    kinds[:, 0] = PROMPT_END
    for r, n in enumerate(lengths):
        kinds[r, 1:n] = ANSWER
    return kinds


def whole_sequence_kinds(context_lengths: Sequence[int], lengths: Sequence[int], width: int, offset: int = 0) -> Tensor:
    """Rows of whole ``context + continuation`` sequences (from token ``offset`` on), right-padded."""
    kinds = torch.zeros(len(lengths), width, dtype=torch.int8)
    for r, (n_ctx, n) in enumerate(zip(context_lengths, lengths, strict=True)):
        end = n_ctx - 1 - offset
        if 0 <= end < width:
            kinds[r, end] = PROMPT_END
        kinds[r, max(0, end + 1) : n] = ANSWER
    return kinds


def generation_kinds(batch: int, width: int, prefill: bool) -> Tensor:
    """A greedy-generation pass: the prefill (the prompt, its last token the prompt end) or a new token."""
    kinds = torch.zeros(batch, width, dtype=torch.int8)
    kinds[:, -1] = NEWEST | (PROMPT_END if prefill else ANSWER)
    return kinds


def selection(mode: str, shape: torch.Size, device, method: str) -> Tensor | None:
    """Bool ``[batch, pos]`` of the positions ``mode`` edits in the running pass; None means every one."""
    if mode == "all":
        return None
    current = _current.get()
    if current is _EVERY_TOKEN_IS_ANSWER:
        return None
    if not isinstance(current, Tensor):
        raise RuntimeError(
            f"{method} edits only {mode!r} positions (hpr.positions), but this forward pass has none marked. "
            "Run the model through hpr.scoring.score, hpr.generation.greedy or hpr.continuations, wrap the "
            "call in hpr.positions.as_answer() to treat every token as an answer, or give the editor "
            "positions='all'."
        )
    if tuple(current.shape) != tuple(shape):
        raise RuntimeError(
            f"the marked positions {tuple(current.shape)} do not match this pass's "
            f"{tuple(shape)} (batch, pos): a forward pass ran inside another's marking"
        )
    return (current.to(device) & _SELECTS[mode]) != 0


def positioned_hook(mode: str, method: str, hook_fn: Callable) -> Callable:
    """A TransformerLens hook ``hook_fn(act, hook)`` (position-wise on ``act [batch, pos, ...]``) applied only at
    the positions ``mode`` selects; the others are left bit-identical."""
    if mode == "all":
        return hook_fn

    def hook(act: Tensor, hook):
        chosen = selection(mode, act.shape[:2], act.device, method)
        if chosen is None:
            return hook_fn(act, hook)
        out = act.clone()
        if chosen.any():
            out[chosen] = hook_fn(act[chosen][None], hook)[0]
        return out

    return hook
