"""Where hpr caches what it builds or converts: ``$HPR_CACHE_DIR``, default ``~/.cache/hpr-workbench``.

The toy world's model and the float32 checkpoints converted from GGUF files live side by side there.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("HPR_CACHE_DIR") or Path.home() / ".cache" / "hpr-workbench")
