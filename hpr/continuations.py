"""Run many ``(context, continuation)`` pairs through a model, each shared context computed once.

Scoring and every activation collection read a model at the tokens of answers that follow a long shared
prompt: on TruthfulQA the 6-shot primer (~150 tokens) is the same for every question, each question's text
is shared by all its answers, and the answers themselves are ~10 tokens. Running every pair whole repeats
the primer and the question for every answer. Here:

1. the longest token prefix common to every context of the call (the primer) runs once, batch 1, into a
   TransformerLens KV cache;
2. the rest of each distinct context except its last token runs once, contexts of a batch left-padded
   after the shared prefix, extending that cache;
3. each continuation runs over ``[last context token] + continuation`` against its context's cache rows,
   right-padded. Re-feeding the last context token makes the row's first position predict the first
   continuation token, so scoring and collection see one uniform batch.

Every hook sees every real position with the same causal past and the same position id as in a
whole-sequence pass: TransformerLens takes position ids from the cumulative attention mask, so padding
(left in step 2, right in step 3) shifts no position and is never attended. Position-wise edits (every
editor in hpr) therefore give the same activations and scores up to float rounding; tests hold both paths
within 1e-4. Hooks attached by the caller around the whole call (an editor) see steps 1-3; hooks it attaches
around :meth:`ContinuationBatch.run` see only step 3, the continuation tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hpr import positions
from hpr.encoding import Encoded, pad_sequences, pad_token_id


@dataclass
class ContinuationBatch:
    """Continuations ready to run against their contexts' KV cache.

    Row ``r`` is item ``index[r]`` of the encoded pairs: ``tokens[r, 0]`` is its context's last token and
    ``tokens[r, 1 : 1 + n_cont]`` its continuation (the last continuation token is left out when the batch
    was built for scoring, which needs no prediction after it). ``lengths[r]`` counts the real tokens.
    """

    index: list[int]
    tokens: Tensor  # [rows, width], on the model's device
    attention_mask: Tensor  # [rows, width]: 1 for real tokens, 0 for right padding
    lengths: list[int]
    n_cont: list[int]
    cache: object  # a frozen TransformerLensKeyValueCache, one row per batch row

    def run(self, model, stop_at_layer: int | None = None):
        """The model's forward pass over this batch (residual stream if ``stop_at_layer``, else logits).

        Position 0 of each row is marked as its context's end and the rest as answer tokens
        (:mod:`hpr.positions`), for editors that edit only some positions."""
        with positions.marked(positions.continuation_kinds(self.lengths, self.tokens.shape[1])):
            return model(
                self.tokens, past_kv_cache=self.cache, attention_mask=self.attention_mask, stop_at_layer=stop_at_layer
            )

    def continuation_cells(self, predicting: bool) -> tuple[Tensor, Tensor]:
        """``(rows, cols)`` of every continuation token, row by row in order.

        ``predicting=False``: the cells *at* each continuation token (its activations).
        ``predicting=True``: the cells whose output predicts it (one to the left).
        """
        shift = 0 if predicting else 1
        rows = [r for r, n in enumerate(self.n_cont) for _ in range(n)]
        cols = [t + shift for n in self.n_cont for t in range(n)]
        device = self.tokens.device
        return torch.tensor(rows, device=device), torch.tensor(cols, device=device)

    def last_cells(self) -> tuple[Tensor, Tensor]:
        """``(rows, cols)`` of each row's last continuation token."""
        device = self.tokens.device
        return (torch.arange(len(self.index), device=device), torch.tensor(self.n_cont, device=device))


def _context(e: Encoded) -> tuple[int, ...]:
    return e.tokens[: len(e.tokens) - e.n_cont]


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix shared by every sequence."""
    if not sequences:
        return 0
    first, n = sequences[0], min(len(s) for s in sequences)
    for s in sequences[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def _new_cache(model, batch: int):
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    return TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)


def _expanded(cache, batch: int):
    """A writable cache of ``batch`` rows, each a view of row 0 of ``cache`` (no copy until appended to)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = [
        TransformerLensKeyValueCacheEntry(
            e.past_keys.expand(batch, -1, -1, -1), e.past_values.expand(batch, -1, -1, -1)
        )
        for e in cache.entries
    ]
    return TransformerLensKeyValueCache(entries, cache.previous_attention_mask.expand(batch, -1))


def _rows_of(cache, rows: Tensor, frozen: bool = True):
    """A cache whose row ``i`` is row ``rows[i]`` of ``cache`` (a copy); frozen unless ``frozen=False``."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = [
        TransformerLensKeyValueCacheEntry(e.past_keys[rows], e.past_values[rows], frozen=frozen) for e in cache.entries
    ]
    return TransformerLensKeyValueCache(entries, cache.previous_attention_mask[rows], frozen=frozen)


def _prefix_cache(model, prefix: Sequence[int]):
    """The KV cache of ``prefix`` (batch 1), computed once with whatever hooks are on the model."""
    cache = _new_cache(model, 1)
    if prefix:
        ids = torch.tensor([list(prefix)], device=model.cfg.device)
        with positions.marked(positions.context_kinds(*ids.shape)):
            model(ids, past_kv_cache=cache, attention_mask=torch.ones_like(ids), stop_at_layer=model.cfg.n_layers)
    return cache


def _contexts_cache(model, shared, shared_len: int, contexts: Sequence[tuple[int, ...]], pad_id: int):
    """Extend the shared prefix's cache by each context minus the prefix and its last token, left-padded."""
    device = model.cfg.device
    rests = [c[shared_len:-1] for c in contexts]
    cache = _expanded(shared, len(contexts))
    width = max(len(r) for r in rests)
    if width == 0:
        return cache
    ids, mask = pad_sequences(rests, pad_id, left=True)
    with positions.marked(positions.context_kinds(*ids.shape)):
        model(ids.to(device), past_kv_cache=cache, attention_mask=mask.to(device), stop_at_layer=model.cfg.n_layers)
    return cache


def continuation_batches(
    model, encoded: Sequence[Encoded], batch_size: int = 16, for_scoring: bool = False, progress=None
) -> Iterator[ContinuationBatch]:
    """Every item of ``encoded`` in some :class:`ContinuationBatch`, contexts run once each (module docstring).

    Contexts are processed ``batch_size`` at a time (longest first, so left padding stays small) and their
    continuations ``batch_size`` rows at a time. ``for_scoring`` leaves each continuation's last token out.
    The caller's hooks stay on throughout; ``progress`` (a tqdm bar) is advanced by continuations done.
    Must run under ``torch.inference_mode()`` (or ``no_grad``): nothing here needs a graph.
    """
    for _, batch in stream_batches(model, [(encoded, for_scoring)], batch_size, [progress]):
        yield batch


def stream_batches(
    model, streams: Sequence[tuple[Sequence[Encoded], bool]], batch_size: int = 16, progress: Sequence = ()
) -> Iterator[tuple[int, ContinuationBatch]]:
    """:func:`continuation_batches` of several ``(encoded, for_scoring)`` streams whose continuations follow
    the same contexts, each chunk of contexts run once for all of them: ``(stream, batch)``, per chunk every
    batch of stream 0, then of stream 1, and so on. ``progress`` holds one bar (or None) per stream.

    A stream's batches are those :func:`continuation_batches` gives it alone whenever its contexts are all
    the streams' contexts (the choices of some questions and their best answers): same chunks, same rows,
    same caches, so the same activations to the bit."""
    streams = [(list(encoded), for_scoring) for encoded, for_scoring in streams]
    if not any(encoded for encoded, _ in streams):
        return
    bars = list(progress) + [None] * (len(streams) - len(progress))
    pad_id = pad_token_id(model)
    device = model.cfg.device
    by_context: list[dict[tuple[int, ...], list[int]]] = []
    first_seen: dict[tuple[int, ...], None] = {}
    for encoded, _ in streams:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, e in enumerate(encoded):
            groups.setdefault(_context(e), []).append(i)
            first_seen.setdefault(_context(e))
        by_context.append(groups)
    contexts = sorted(first_seen, key=len, reverse=True)
    n_conts = [[e.n_cont for e in encoded] for encoded, _ in streams]
    # The shared prefix never takes a context's last token: that one is re-fed with each continuation.
    shared_len = common_prefix([c[:-1] for c in contexts]) if len(contexts) > 1 else 0
    shared = _prefix_cache(model, contexts[0][:shared_len])
    cache = None
    for first in range(0, len(contexts), batch_size):
        chunk = contexts[first : first + batch_size]
        cache = None  # the last chunk's cache is freed before this one is built
        cache = _contexts_cache(model, shared, shared_len, chunk, pad_id)
        for s, (encoded, for_scoring) in enumerate(streams):
            # Continuations of similar length share a pass: rows are right-padded to the longest.
            lengths = n_conts[s]
            items = sorted(
                ((g, i) for g, c in enumerate(chunk) for i in by_context[s].get(c, ())), key=lambda gi: lengths[gi[1]]
            )
            for start in range(0, len(items), batch_size):
                rows = items[start : start + batch_size]
                yield s, _continuation_batch(model, encoded, chunk, rows, cache, for_scoring, pad_id, device)
                if bars[s] is not None:
                    bars[s].update(len(rows))


def _continuation_batch(model, encoded, chunk, rows, cache, for_scoring: bool, pad_id: int, device):
    inputs, n_conts = [], []
    for g, i in rows:
        e = encoded[i]
        cont = e.tokens[len(e.tokens) - e.n_cont :]
        inputs.append((chunk[g][-1],) + (cont[:-1] if for_scoring else cont))
        n_conts.append(e.n_cont)
    ids, mask = pad_sequences(inputs, pad_id)
    row_cache = _rows_of(cache, torch.tensor([g for g, _ in rows], device=device))
    return ContinuationBatch(
        index=[i for _, i in rows],
        tokens=ids.to(device),
        attention_mask=mask.to(device),
        lengths=[len(x) for x in inputs],
        n_cont=n_conts,
        cache=row_cache,
    )


def shared_prefix_forward(model, batch: Sequence[Encoded], pad_id: int, **forward_kwargs):
    """One forward pass over ``batch`` with its common token prefix run once (batch 1) into a KV cache.

    For training (LoRA, representation tuning): the prefix runs with autograd as the caller has it, so
    gradients reach every parameter through the cached keys and values, and ``expand`` sums them over the
    batch. Returns ``(out, ids, lengths, shared)``: the model's output over the rest of each sequence
    (``tokens[shared:]``, right-padded to ``ids [batch, pos]``, ``lengths`` real tokens each), where
    ``out[:, j]`` belongs to token ``shared + j``. ``shared`` is at most the shortest context minus one, so
    every continuation token and the position predicting it are in ``out``; 0 when nothing is shared.
    """
    device = model.cfg.device
    contexts = [_context(e)[:-1] for e in batch]
    shared = common_prefix(contexts) if len(batch) > 1 else 0
    rests = [e.tokens[shared:] for e in batch]
    ids, mask = pad_sequences(rests, pad_id)
    width = ids.shape[1]
    ids, lengths = ids.to(device), torch.tensor([len(r) for r in rests])
    kinds = positions.whole_sequence_kinds([len(_context(e)) for e in batch], lengths.tolist(), width, shared)
    if shared == 0:  # nothing to share: the plain right-padded pass (padding after the real tokens)
        with positions.marked(kinds):
            return model(ids, **forward_kwargs), ids, lengths, 0
    cache = _expanded(_prefix_cache(model, batch[0].tokens[:shared]), len(batch))
    with positions.marked(kinds):
        out = model(ids, past_kv_cache=cache, attention_mask=mask.to(device), **forward_kwargs)
    return out, ids, lengths, shared
