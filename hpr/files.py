"""Atomic file writes: a file is written beside its final name and renamed into place, so an interrupted
write leaves the old file (or none), never half of a new one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """``write(tmp)`` writes the content to the temporary path it is given; it then replaces ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))
