"""Files of the app under the data dir: images, masks and checkpoints, never half-written.

Images and masks are content-addressed (``images/<sha256>.png``): the same pixels are stored
once, and a name can never point at other contents. Every write goes to a temp file in the same
folder, is flushed to disk, then renamed into place, so a crash leaves either nothing or the
whole file.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from pathlib import Path

import numpy as np
from PIL import Image

from .. import fileio

_ID = re.compile(r"^[0-9a-f]{64}$")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_image(path: Path, mode: str, size: int) -> np.ndarray:
    """A stored image or mask (written by this app, so trusted) at size x size."""
    with Image.open(path) as img:
        img = img.convert(mode)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.NEAREST)
        return np.asarray(img, dtype=np.uint8)


def content_path(area: str, png: bytes) -> str:
    """Where ``png`` is (or will be) stored in ``area``, relative to the data dir: a row may
    name it before :meth:`Store.put` writes it (rows are written after their files)."""
    return f"{area}/{hashlib.sha256(png).hexdigest()}.png"


def is_content_id(text: str) -> bool:
    return bool(_ID.match(text))


class Store:
    """The data dir's file areas: ``images/``, ``masks/``, ``checkpoints/``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for area in ("images", "masks", "checkpoints"):
            (self.root / area).mkdir(parents=True, exist_ok=True)

    def put(self, area: str, png: bytes) -> str:
        """Store PNG bytes in ``area`` under their SHA-256; return the content id."""
        digest = hashlib.sha256(png).hexdigest()
        path = self.root / area / f"{digest}.png"
        if not path.exists():
            fileio.write_bytes(path, png)
        return digest

    def path_of(self, area: str, content_id: str) -> Path | None:
        """The file of a content id, or None if the id is malformed or unknown."""
        if not is_content_id(content_id):
            return None
        path = self.root / area / f"{content_id}.png"
        return path if path.is_file() else None

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def absolute(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self.root / path

    def new_checkpoint_path(self, version_id: int) -> Path:
        """A fresh name for a version's checkpoint: existing files are never overwritten."""
        while True:
            path = self.root / "checkpoints" / f"v{version_id:04d}-{secrets.token_hex(3)}.pt"
            if not path.exists():
                return path
