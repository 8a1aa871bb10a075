"""Editors: one file per method, all behind :class:`hpr.editors.base.Editor`."""

from hpr.editors import additive as _additive  # noqa: F401  (registers iti, caa)
from hpr.editors import diff as _diff  # noqa: F401  (registers diff)
from hpr.editors import hpr as _hpr  # noqa: F401  (registers hpr)
from hpr.editors import lora as _lora  # noqa: F401  (registers lora)
from hpr.editors import reptune as _reptune  # noqa: F401  (registers reptune)
from hpr.editors import sadi as _sadi  # noqa: F401  (registers sadi)
from hpr.editors import sea as _sea  # noqa: F401  (registers sea)
from hpr.editors.base import REGISTRY, Editor, load_editor

__all__ = ["REGISTRY", "Editor", "load_editor"]
