"""Atomic file writes: a temp file in the same folder, flushed to disk, then renamed over the
target. A failure at any point leaves the previous file (or none) and no temp file behind.

Every result, config, table, checkpoint and upload the project writes goes through here, with the
user's normal file mode (0666 less the umask), so a colleague on a shared server can read a
``results.json``: ``mkstemp`` alone would leave it private (0600).
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

_umask_lock = threading.Lock()


def default_file_mode() -> int:
    """0666 less the process umask: the mode ``open()`` would give a new file."""
    with _umask_lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def write_atomic(
    path: str | Path, write: Callable[[IO[Any]], None], *, binary: bool = True
) -> Path:
    """Call ``write(file)`` on a temp file beside ``path`` and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_atomic(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically, ending it with a newline (a text file's last line has one)."""
    if text and not text.endswith("\n"):
        text += "\n"
    return write_atomic(path, lambda f: f.write(text), binary=False)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically; NaN and infinity become null, numpy values
    plain numbers."""
    return write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=False))


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]], fields: Sequence[str]) -> Path:
    """Write dict rows as CSV with the header ``fields`` atomically."""

    def write(f):
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    return write_atomic(path, write, binary=False)


def jsonable(obj: Any) -> Any:
    """``obj`` with tuples as lists, numpy scalars and arrays as Python values, and non-finite
    floats as None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer | np.bool_):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj
