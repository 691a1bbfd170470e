"""Reading user images safely: clear errors naming the file, limits against decompression bombs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 50_000_000  # a 7,000 x 7,000 dermoscopic image is large; beyond this, refuse


def read_rgb(
    path: str | Path,
    *,
    size: int | None = None,
    resample: str = "nearest",
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Decode ``path`` to an (H, W, 3) uint8 RGB array, optionally squashed to size x size.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an image, truncated, or larger than ``max_pixels``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ValueError(f"{path}: {w}x{h} pixels, more than the {max_pixels} allowed")
                img.load()
                rgb = img.convert("RGB")
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from err
    except OSError as err:  # truncated or corrupt data
        raise ValueError(f"{path}: damaged image data ({err})") from err
    if size is not None:
        method = Image.Resampling.NEAREST if resample == "nearest" else Image.Resampling.BILINEAR
        rgb = rgb.resize((size, size), method)
    return np.asarray(rgb, dtype=np.uint8)


def read_mask(path: str | Path, *, size: int) -> np.ndarray:
    """A mask drawn white on black: (size, size) uint8 0/1, resized nearest-neighbour, marked
    where its grey level (Pillow's "L") is above 127.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an image, truncated, or larger than :data:`MAX_PIXELS`.
    """
    grey = Image.fromarray(read_rgb(path, size=size, resample="nearest")).convert("L")
    return (np.asarray(grey) > 127).astype(np.uint8)
