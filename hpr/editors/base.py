"""The Editor interface, the method registry, and saving/loading.

An editor is data (a frozen config + named tensors) plus the hooks it derives from them. Hooks reach a
model only inside ``with editor.applied(model):``; everything that can fail (shape checks, hook
construction) happens before they attach, and TransformerLens's ``model.hooks`` removes them on exit,
including on error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from hpr import positions

Hook = tuple[str, Callable]
REGISTRY: dict[str, type[Editor]] = {}


def register(cls: type[Editor]) -> type[Editor]:
    REGISTRY[cls.method] = cls
    return cls


class Editor:
    """Base class. Subclasses set ``method`` and ``config_cls``, and implement :meth:`hooks`."""

    method: ClassVar[str]
    config_cls: ClassVar[type]

    def __init__(self, config, tensors: dict[str, Tensor], d_model: int, n_layers: int):
        self.config = config
        self.tensors = tensors
        self.d_model = d_model
        self.n_layers = n_layers

    def hooks(self, model) -> list[Hook]:
        """The editor's hooks, each position-wise on ``[batch, pos, ...]``; :meth:`position_hooks` restricts
        them to the positions the editor edits."""
        raise NotImplementedError

    @property
    def positions(self) -> str:
        """Which positions the editor edits (:mod:`hpr.positions`): its config's ``positions``, else ``all``."""
        return getattr(self.config, "positions", "all")

    def with_positions(self, mode: str):
        """The same editor editing ``mode``'s positions (:data:`hpr.positions.MODES`)."""
        if not any(f.name == "positions" for f in dataclasses.fields(self.config)):
            raise ValueError(f"{self.method} edits weights, at every position; it has no positions setting")
        return type(self)(dataclasses.replace(self.config, positions=mode), self.tensors, self.d_model, self.n_layers)

    def position_hooks(self, model) -> list[Hook]:
        """:meth:`hooks`, each applied only at the positions :attr:`positions` selects."""
        return [(name, positions.positioned_hook(self.positions, self.method, fn)) for name, fn in self.hooks(model)]

    def check_model(self, model) -> None:
        if (model.cfg.d_model, model.cfg.n_layers) != (self.d_model, self.n_layers):
            raise ValueError(
                f"{self.method} editor was fitted on a model with d_model={self.d_model}, "
                f"n_layers={self.n_layers}; this model has d_model={model.cfg.d_model}, "
                f"n_layers={model.cfg.n_layers}. Fit a new editor for this model."
            )

    def resid_post_hooks(self, model, layers) -> list[Hook]:
        """``self.edit(layer, h)`` at ``blocks.{layer}.hook_resid_post`` of each layer, after a range check.

        For editors that rewrite the residual stream after chosen blocks (HPR, Diff, SEA).
        """
        bad = [layer for layer in layers if not 0 <= layer < model.cfg.n_layers]
        if bad:
            raise ValueError(f"{self.method} layers {bad} out of range for a {model.cfg.n_layers}-layer model")

        def make(layer: int):
            edit = self.prepared_edit(layer, model.cfg.device)

            def hook(h, hook):
                return edit(h)
            return hook

        return [(f"blocks.{layer}.hook_resid_post", make(layer)) for layer in layers]

    def edit_fn(self, layer: int, device) -> Callable[[Tensor], Tensor]:
        """``self.edit`` of one layer, with whatever it can precompute for ``device`` done up front (a hook
        runs once per forward pass: per token in generation). Subclasses override it to precompute."""
        return lambda h: self.edit(layer, h)

    def prepared_edit(self, layer: int, device) -> Callable[[Tensor], Tensor]:
        """:meth:`edit_fn`, built once per (layer, device) and kept: entering ``applied()`` again (once per
        evaluation, generation or, in the bench, per forward pass) reuses it. Editors are not mutated."""
        key = (layer, str(torch.device(device)))
        prepared = self.__dict__.setdefault("_prepared_edits", {})
        if key not in prepared:
            prepared[key] = self.edit_fn(layer, device)
        return prepared[key]

    @contextlib.contextmanager
    def applied(self, model) -> Iterator[None]:
        self.check_model(model)
        hooks = self.position_hooks(model)  # built before anything attaches
        with model.hooks(fwd_hooks=hooks):
            yield

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"method": self.method, "d_model": self.d_model, "n_layers": self.n_layers,
                  "config": _jsonable(dataclasses.asdict(self.config))}
        _atomic_write(folder / "state.safetensors",
                      lambda p: save_file({k: v.contiguous().cpu() for k, v in self.tensors.items()}, p))
        _atomic_write(folder / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2)))


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def load_editor(folder: str | Path, device=None) -> Editor:
    """Load any saved editor (``config.json`` + ``state.safetensors``)."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} holds no editor (config.json missing)")
    record = json.loads((folder / "config.json").read_text())
    method = record.get("method")
    if method not in REGISTRY:
        raise ValueError(f"unknown editor method {method!r} in {folder}; known: {sorted(REGISTRY)}")
    cls = REGISTRY[method]
    fields = {f.name: f.type for f in dataclasses.fields(cls.config_cls)}
    raw = record["config"]
    unknown = set(raw) - set(fields)
    if unknown:
        raise ValueError(f"{folder}/config.json has unknown fields for {method}: {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    if "positions" in fields and "positions" not in raw:
        # Saved before editors declared their positions, when every editor edited every position.
        kwargs["positions"] = "all"
    tensors = load_file(folder / "state.safetensors", device=str(device or "cpu"))
    return cls(cls.config_cls(**kwargs), tensors, record["d_model"], record["n_layers"])
