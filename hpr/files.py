"""Atomic file writes: a file is written beside its final name and renamed into place, so an interrupted
write leaves the old file (or none), never half of a new one."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """``write(tmp)`` writes the content to the temporary path it is given; it then replaces ``path``. A
    failed write leaves no temporary file, and a full disk says so, naming the file, whatever library wrote
    (safetensors reports it as its own error type, not an ``OSError``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(e):
            raise OSError(
                errno.ENOSPC,
                f"no space left on the device while writing {path}; free some space and rerun the same command "
                "(finished steps are kept)",
            ) from e
        raise


def _disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "StorageFull" in text or "No space left on device" in text or "os error 28" in text


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))
