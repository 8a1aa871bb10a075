"""The embedded default: a toy world of invented facts and a tiny transformer trained on it.

``load_toy_model()`` builds the model on first use (a few minutes on 2 CPU cores, with a progress bar)
and caches it under ``$HPR_CACHE_DIR`` (default ``~/.cache/hpr-workbench``); ``toy_dataset()`` gives
the matching multiple-choice questions. Both are pure functions of a :class:`ToyWorldConfig`.
"""

from __future__ import annotations

import logging
import shutil

from hpr.toyworld.world import HEADERS, ToyWorldConfig, build_world, mc_dataset

DEFAULT = ToyWorldConfig()
# Scoring prompts carry no primer and never name the speaker (see world.py).
PRIMER = ""
# Only for measuring the knowledge ceiling: the header truthful documents carry, then "\n" and the question.
TRUTHFUL_PRIMER = HEADERS["truthful"]
log = logging.getLogger(__name__)


def load_toy_model(device=None, dtype=None, config: ToyWorldConfig | None = None, progress: bool = True):
    from hpr.toyworld.build import ensure_built, load_built

    folder = ensure_built(config or DEFAULT, progress=progress)
    try:
        return load_built(folder, device=device, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - safetensors', tokenizers' and json's own errors: the cache is damaged
        log.warning("the toy model cache %s is damaged (%s); building it again", folder, " ".join(str(e).split())[:200])
        shutil.rmtree(folder)
        return load_built(ensure_built(config or DEFAULT, progress=progress), device=device, dtype=dtype)


def toy_dataset(config: ToyWorldConfig | None = None):
    return mc_dataset(build_world(config or DEFAULT))


__all__ = ["DEFAULT", "PRIMER", "TRUTHFUL_PRIMER", "ToyWorldConfig", "load_toy_model", "toy_dataset"]
