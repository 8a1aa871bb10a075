"""Greedy generation with a KV cache, each pass marked for position-aware editors (:mod:`hpr.positions`).

The prefill pass runs the prompt, its last token marked as the prompt end; every later pass feeds the last
generated token, marked as an answer token. Both are the newest position of their pass, which is where
honest_llama's ITI and the official HPR ``generate()`` edit; editors with ``positions="all"`` also edit
the prompt at prefill.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hpr import positions


@torch.inference_mode()
def greedy(model, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
    """The greedy continuation of ``prompt`` (token ids), up to ``max_new_tokens`` tokens; it ends after the
    first token in ``stop_ids`` (which is kept) or at ``max_new_tokens``. Whatever hooks are on the model
    apply."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    if not prompt:
        raise ValueError("greedy generation needs a prompt of at least one token")
    if len(prompt) + max_new_tokens > model.cfg.n_ctx:
        raise ValueError(
            f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new ones exceeds the model's "
            f"context of {model.cfg.n_ctx} tokens"
        )
    device = model.cfg.device
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, 1)
    ids = torch.tensor([list(prompt)], device=device)
    stops = set(stop_ids)
    new: list[int] = []
    prefill = True
    while len(new) < max_new_tokens:
        with positions.marked(positions.generation_kinds(1, ids.shape[1], prefill)):
            logits = model(ids, past_kv_cache=cache)
        token = int(logits[0, -1].argmax())
        new.append(token)
        if token in stops:
            break
        ids = torch.tensor([[token]], device=device)
        prefill = False
    return new
