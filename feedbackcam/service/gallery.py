"""The gallery: the dataset's images a user can pick instead of uploading one.

Images are read from ``<data dir>/gallery/`` (PNG or JPEG, checked like uploads), stored in the
image store at the model's input size, and listed by name; an optional ``labels.json`` maps file
names to their true class, shown as a hint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .originals import admit
from .store import Store
from .uploads import UploadError, decode_image, model_rgb, png_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GalleryImage:
    image_id: str
    name: str
    label: str | None


def load_gallery(
    folder: Path, store: Store, size: int, *, max_pixels: int, sessions=None
) -> list[GalleryImage]:
    """The gallery's images; with ``sessions``, each also kept as its original (shown at full
    resolution on the page, see ``originals.py``)."""
    if not folder.is_dir():
        return []
    labels_file = folder / "labels.json"
    labels = json.loads(labels_file.read_text()) if labels_file.is_file() else {}
    entries = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            continue
        try:
            img = decode_image(path.read_bytes(), path.name, max_pixels=max_pixels)
        except UploadError as err:
            log.warning("gallery: skipping %s", err)
            continue
        if sessions is not None:
            with sessions() as session:
                rgb = admit(store, session, path.read_bytes(), img, size)
        else:
            rgb = model_rgb(img, size)
        image_id = store.put("images", png_bytes(rgb))
        entries.append(GalleryImage(image_id, path.stem, labels.get(path.name)))
    return entries
