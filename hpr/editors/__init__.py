"""Editors: one file per method, all behind :class:`hpr.editors.base.Editor`, each registered as a
:class:`hpr.editors.registry.Method` (its settings, fit step and run labels)."""

from hpr.editors.base import REGISTRY, Editor, load_editor
from hpr.editors.registry import BASE, FitContext, Method, default_labels, method_of, methods

methods()  # imports every editor module of this package: each registers its editor and its method

__all__ = [
    "BASE",
    "REGISTRY",
    "Editor",
    "FitContext",
    "Method",
    "default_labels",
    "load_editor",
    "method_of",
    "methods",
]
