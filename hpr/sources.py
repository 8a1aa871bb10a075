"""Names to things: the one place where a model or dataset name (the toy world among them) becomes a model,
questions and a prompt format.

The toy world, GGUF files and named pretrained models are sources like any checkpoint or file; this module sits
above all of them (:mod:`hpr.models`, :mod:`hpr.model_sources`, :mod:`hpr.data`, :mod:`hpr.toyworld`), so none of
them needs to know the others.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import torch

from hpr import toyworld
from hpr.data import DataError, MCQuestion, PromptFormat
from hpr.data.truthfulqa import TRUTHFULQA_ENV, load_truthfulqa, truthfulqa_from_hub
from hpr.model_sources import resolve_source
from hpr.models import check_device, check_finite_weights, load_checkpoint, model_dtype
from hpr.toyworld import PRIMER, TRUTHFUL_PRIMER, load_toy_model, toy_dataset
from hpr.toyworld.world import WORLD_VERSION

log = logging.getLogger(__name__)

DATASETS = ("truthfulqa", "bbq", "jsonl", "toy")


def load_model(name_or_path: str, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None):
    """Load a model as an (unprocessed) ``HookedTransformer``.

    ``name_or_path`` is ``"toy"`` (the embedded default model), a named pretrained model (``"smollm2"``; see
    :mod:`hpr.model_sources`), a GGUF file (``path/to/file.gguf``; converted once into the cache, then loaded as
    a checkpoint directory), a local Hugging Face checkpoint directory (config.json + weights + tokenizer;
    loaded fully offline), or a Hugging Face hub id (needs network or the hub cache).
    """
    model = _load(name_or_path, check_device(device), dtype)
    check_finite_weights(model, name_or_path)
    return model


def _load(name_or_path: str, device: torch.device, dtype):
    dtype = model_dtype(dtype, device)
    if name_or_path == "toy":
        return load_toy_model(device=device, dtype=dtype)
    cached = resolve_source(name_or_path)  # named models and GGUF files: a cached checkpoint directory
    if cached is None:
        return load_checkpoint(name_or_path, device, dtype)
    try:
        return load_checkpoint(cached, device, dtype)
    except (ValueError, OSError) as e:  # the cache is ours, written whole: unreadable means damaged since
        log.warning("the converted cache %s is damaged (%s); converting again", cached, " ".join(str(e).split())[:200])
        shutil.rmtree(cached)
        return load_checkpoint(resolve_source(name_or_path) or cached, device, dtype)


def load_dataset(name: str, path: str | os.PathLike[str] | None = None) -> tuple[MCQuestion, ...]:
    """Load dataset ``name`` (one of :data:`DATASETS`).

    * ``truthfulqa``: ``path`` (a folder, ``mc_task.json``, a JSONL of HF rows or ``TruthfulQA.csv``),
      else ``$HPR_TRUTHFULQA_PATH``, else the HF hub via the optional ``datasets`` package.
    * ``bbq``: released BBQ files (:mod:`hpr.data.bbq`); ``path`` (a category ``.jsonl`` or a folder of them) is
      required.
    * ``jsonl``: the generic format of :mod:`hpr.data.jsonl`; ``path`` is required.
    * ``toy``: the synthetic toy world of :mod:`hpr.toyworld` (no files, for tests and demos).
    """
    key = name.strip().lower()
    if key == "truthfulqa":
        path = path or os.environ.get(TRUTHFULQA_ENV) or None
        questions = load_truthfulqa(path) if path else truthfulqa_from_hub()
        if not questions:  # e.g. a CSV with its header only
            raise DataError(
                f"{path or 'the TruthfulQA hub dataset'} holds no questions. Fix: point --data-path at "
                "mc_task.json or a TruthfulQA.csv with rows."
            )
        return questions
    if key == "bbq":
        if not path:
            raise DataError(
                "dataset 'bbq' needs its files. Fix: pass --data-path to a BBQ category .jsonl or a folder of them."
            )
        from hpr.data.bbq import load_bbq

        return load_bbq(path)
    if key == "jsonl":
        if not path:
            raise DataError(
                "dataset 'jsonl' needs a file. Fix: pass --data-path to a .jsonl file (format: hpr.data.jsonl)."
            )
        from hpr.data.jsonl import load_jsonl

        return load_jsonl(path)
    if key == "toy":
        return toy_dataset()
    raise DataError(f"unknown dataset {name!r}. Fix: use one of {', '.join(DATASETS)}.")


def prompt_format(dataset: str, truthful: bool = False) -> PromptFormat:
    """The scoring prompt; for the toy world, ``truthful=True`` gives the truthful-speaker header."""
    if dataset == "toy":
        return PromptFormat(primer=TRUTHFUL_PRIMER if truthful else PRIMER, separator="\n")
    if dataset == "bbq":
        from hpr.data.bbq import PROMPT

        return PROMPT
    return PromptFormat()


def neutral_passages(model: str, path: str | os.PathLike[str] | None = None, n: int | None = None) -> list[str]:
    """The neutral text of the capability step: ``path`` (blank-line separated passages) if given; else, for the
    toy model, held-out documents of its world's corpus (drawn with a seed it never trained on; English prose
    means nothing to its tokenizer); else the shipped public-domain corpus (:mod:`hpr.data.neutral`). ``n``
    passages, evenly spaced over the file (all of them if None)."""
    from hpr.data import neutral

    if path is None and model == "toy":
        from hpr.toyworld.world import build_world, generate_corpus

        return list(generate_corpus(build_world(toyworld.DEFAULT), n_docs=n or 64, seed_offset=10_007))
    passages = neutral.read_passages(path)
    return passages if n is None else neutral.evenly_spaced(passages, n)


def toy_world_record() -> dict:
    """Which world built the toy model: generator version, cache key and every parameter (seed included)."""
    world = toyworld.DEFAULT  # read now: tests and notebooks may point "toy" at another world
    return {"world_version": WORLD_VERSION, "key": world.key(), "config": dataclasses.asdict(world)}
