"""Atomic file writes: a temp file in the same folder, flushed to disk, then renamed over the
target. A failure at any point leaves the previous file (or none) and no temp file behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(
    path: str | Path, write: Callable[[IO[Any]], None], *, binary: bool = True
) -> Path:
    """Call ``write(file)`` on a temp file beside ``path`` and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
