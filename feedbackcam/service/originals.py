"""The upload as received, and the exact map between it and the model's input.

The app keeps every image twice: the original bytes (``originals/<sha256>.<png|jpg>``, shown on
the page at full resolution) and the model's input (``images/<sha256>.png``, S x S, what the
model predicts on and learns from). The model's preprocessing is a nearest-neighbour resize of
the whole image to S x S (the way the training data was prepared; the aspect ratio is not kept
for the model, only for the person). Model pixel (row i, column j) of an original W wide and H
high is original pixel::

    row = floor((2 i + 1) H / (2 S)),   column = floor((2 j + 1) W / (2 S))

(the original pixel under the model pixel's centre), computed in integers so that no rounding
differs between the image and a mask. A mask drawn on the original goes through the same map,
so a model pixel is in the region exactly when the original pixel it shows is.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .. import fileio
from .db import Original
from .store import Store
from .uploads import (
    UploadError,
    check_size,
    decode_base64,
    decode_image,
    decode_mask_rle,
    mask_of,
    png_bytes,
    to_8bit,
)

_EXT = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpg"}


def source_index(n_source: int, n_model: int) -> np.ndarray:
    """For each of ``n_model`` model pixels along one axis, the source pixel it shows."""
    return ((2 * np.arange(n_model) + 1) * n_source) // (2 * n_model)


def to_model(array: np.ndarray, size: int) -> np.ndarray:
    """An (H, W, ...) image or mask sampled to (size, size, ...) by the map above."""
    h, w = array.shape[:2]
    return array[source_index(h, size)][:, source_index(w, size)]


def model_input(img: Image.Image, size: int) -> np.ndarray:
    """``to_model`` of a decoded upload as RGB (16-bit greys scaled, not clipped), reading only
    the rows the model samples: no full-size array is made, so a large upload costs its decoded
    image and little more (what ``limits.decode_slot`` budgets for)."""
    img = to_8bit(img)
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    w, h = rgb.size
    rows = [
        np.asarray(rgb.crop((0, r, w, r + 1)), dtype=np.uint8)[0] for r in source_index(h, size)
    ]
    return np.stack(rows)[:, source_index(w, size)]


def original_ext(data: bytes) -> str:
    return next(ext for sig, ext in _EXT.items() if data.startswith(sig))


def put_original(store: Store, data: bytes) -> str:
    """Store the bytes as received; return their content id (SHA-256)."""
    digest = hashlib.sha256(data).hexdigest()
    path = store.root / "originals" / f"{digest}.{original_ext(data)}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fileio.write_bytes(path, data)
    return digest


def original_path(store: Store, original_id: str):
    """The stored original of a content id, or None."""
    if len(original_id) != 64 or any(c not in "0123456789abcdef" for c in original_id):
        return None
    for ext in ("png", "jpg"):
        path = store.root / "originals" / f"{original_id}.{ext}"
        if path.is_file():
            return path
    return None


def admit(store: Store, session: Session, data: bytes, img: Image.Image, size: int) -> np.ndarray:
    """Keep a checked upload: its bytes as the original and its model input. Returns the model
    input (size, size, 3) and records which original it came from (the first one, if the same
    model input comes from two originals). Commits."""
    original_id = put_original(store, data)
    rgb = model_input(img, size)
    image_id = store.put("images", png_bytes(rgb))
    if session.get(Original, image_id) is None:
        ext = original_ext(data)
        path = f"originals/{original_id}.{ext}"
        session.add(Original(image_id=image_id, path=path, width=img.width, height=img.height))
        try:
            session.commit()
        except IntegrityError:  # the same image, uploaded at the same moment, recorded first
            session.rollback()
    return rgb


def read_original(store: Store, original_id: str, *, max_pixels: int):
    """A stored original's bytes and decoded image (checked again: it came from a user)."""
    path = original_path(store, original_id)
    if path is None:
        raise UploadError(404, f"no original {original_id!r}")
    data = path.read_bytes()
    return data, decode_image(data, "original", max_pixels=max_pixels)


# ------------------------------------------------------------------ masks
def decode_region(
    *,
    png: bytes | None = None,
    rle: str | None = None,
    b64: str | None = None,
    size: int,
    original: tuple[int, int] | None,
    max_bytes: int,
    what: str = "mask",
) -> np.ndarray:
    """A mask at the model's input (size x size, or drawn on the original, W x H) as a
    (size, size) uint8 region in {0, 1}. A PNG pixel is in the region when its grey level
    (times its alpha) is above half; RLE is ``{"size": [h, w], "counts": [...]}``, row-major
    runs alternating off/on starting with off."""
    shapes = [(size, size)] + ([original[::-1]] if original and original != (size, size) else [])
    if b64 is not None:
        png = decode_base64(b64, what, max_bytes)
    if png is not None:
        check_size(png, what, max_bytes)
        largest = max(h * w for h, w in shapes)
        sizes = [(w, h) for h, w in shapes]  # the size is checked before the pixel count
        img = decode_image(png, what, max_pixels=largest, formats=("PNG",), expect_size=sizes)
        mask = mask_of(img)
    else:
        mask = decode_mask_rle(rle, size, shapes, what)
    return to_model(mask, size)
