"""hpr-workbench: activation editing (Householder Pseudo-Rotation and baselines) on TransformerLens.

Importing ``hpr`` has no side effects: no model loading, seeding or device probing.
Heavy entry points are resolved lazily on first attribute access.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("hpr.sources", "load_model"),
    "load_dataset": ("hpr.sources", "load_dataset"),
    "load_editor": ("hpr.editors", "load_editor"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'hpr' has no attribute {name!r}")
