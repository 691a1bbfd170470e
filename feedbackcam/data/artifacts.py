"""Acquisition artifacts on real images: pasted, cut out, and listed.

- :func:`paste_bandaids`: a seeded, band-aid-like patch outside the lesion of a real image (a
  rotated rounded rectangle in a skin-tone plastic colour, a lighter pad, a darker rim,
  perforation dots and shading), to build a shortcut on ISIC images with the patch's exact mask
  as the "ignore" feedback a user would draw.
- :func:`cut_out` and :func:`paste_cutouts`: *real* artifacts (the coloured adhesive patches of
  ISIC 2017, cut out with a clinician's ignore mask) pasted onto other images, never over their
  lesion: the counterfactual test of "does this artifact decide?".
- :func:`read_artifact_flags`: per-image artifact annotations (a CSV of 0/1 columns, such as
  Bissoto et al.'s ``dark_corner, hair, gel_border, gel_bubble, ruler, ink, patches``).

Everything random is a function of the seed or generator passed in.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

import numpy as np

_PALETTE = np.array(
    [[0.86, 0.70, 0.56], [0.80, 0.62, 0.48], [0.92, 0.80, 0.66], [0.74, 0.56, 0.42]], np.float32
)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx * dx + dy * dy <= r * r:
                out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def _bandaid(rng: np.random.Generator, size: int, centre: np.ndarray) -> tuple[np.ndarray, ...]:
    """Coverage (H, W) in [0, 1] and colour (H, W, 3) of one band-aid centred at ``centre``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    length = rng.uniform(0.22, 0.34) * size
    width = length * rng.uniform(0.32, 0.42)
    radius = 0.45 * width
    a = rng.uniform(0, np.pi)
    u = (xx - centre[0]) * np.cos(a) + (yy - centre[1]) * np.sin(a)
    v = -(xx - centre[0]) * np.sin(a) + (yy - centre[1]) * np.cos(a)
    qx, qy = np.abs(u) - (length / 2 - radius), np.abs(v) - (width / 2 - radius)
    sdf = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
    sdf = sdf - radius  # < 0 inside, in pixels
    cover = np.clip(0.5 - sdf, 0, 1)
    cover[cover < 0.05] = 0
    base = _PALETTE[rng.integers(len(_PALETTE))] * rng.uniform(0.9, 1.05)
    pad = (np.abs(u) < 0.22 * length) & (np.abs(v) < 0.32 * width)
    colour = np.broadcast_to(base, (size, size, 3)).copy()
    colour[pad] = base + (1 - base) * 0.35
    rim = np.clip(1 + sdf / max(1.5, 0.08 * width), 0, 1)[..., None]
    colour = colour * (1 - 0.25 * rim)
    # Perforation dots on the strips either side of the pad, and a little plastic grain.
    pitch = max(2.0, 0.06 * length)
    dots = (np.mod(u, pitch) < 0.35 * pitch) & (np.mod(v, pitch) < 0.35 * pitch) & ~pad
    colour[dots] *= 0.9
    colour *= 1 + rng.normal(0, 0.03, (size, size, 1)).astype(np.float32)
    shade = 1 + 0.08 * (v / max(width, 1))[..., None]
    return cover * rng.uniform(0.9, 1.0), np.clip(colour * shade, 0, 1)


def paste_bandaid(
    image: np.ndarray, lesion: np.ndarray, rng: np.random.Generator, margin: float = 0.03
) -> tuple[np.ndarray, np.ndarray]:
    """Paste one band-aid outside the lesion.

    Args:
        image: uint8 (H, W, 3), square.
        lesion: (H, W) lesion mask (> 0 on the lesion); the patch keeps ``margin`` x H away.
        rng: the generator all choices come from.

    Returns:
        (image, mask): a new uint8 image and the patch's uint8 {0, 1} mask (all zeros, and the
        image unchanged, if no place outside the lesion could be found).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
    size = image.shape[0]
    if image.shape[1] != size or lesion.shape != (size, size):
        raise ValueError(
            f"expected a square image and a lesion mask of its size, got {image.shape} and "
            f"{lesion.shape}"
        )
    keepout = _dilate(lesion > 0, max(1, int(round(margin * size))))
    for attempt in range(60):
        # After 40 tries, the corners, which a centred lesion rarely reaches.
        if attempt < 40:
            centre = size * rng.uniform(0.12, 0.88, 2)
        else:
            centre = size * (rng.choice([0.14, 0.86], 2) + rng.uniform(-0.04, 0.04, 2))
        cover, colour = _bandaid(rng, size, centre)
        region = cover > 0
        if region.sum() > 0.02 * size * size and not (region & keepout).any():
            out = image.astype(np.float32) / 255
            out = out * (1 - cover[..., None]) + colour * cover[..., None]
            return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8), region.astype(np.uint8)
    return image.copy(), np.zeros((size, size), np.uint8)


def paste_bandaids(
    images: np.ndarray,
    lesions: np.ndarray,
    labels: np.ndarray,
    *,
    target: int,
    rate_target: float,
    rate_other: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Band-aids on a share of a data set: ``rate_target`` of class ``target``, ``rate_other``
    of the rest (equal rates: class-independent, the test setting).

    Returns:
        (images, masks, has_patch): uint8 (N, H, W, 3), uint8 (N, H, W), bool (N,).
    """
    out, masks = images.copy(), np.zeros(images.shape[:3], np.uint8)
    has = np.zeros(len(images), bool)
    for i in range(len(images)):
        rng = np.random.default_rng([seed, i])
        rate = rate_target if labels[i] == target else rate_other
        if rng.random() < rate:
            out[i], masks[i] = paste_bandaid(images[i], lesions[i], rng)
            has[i] = masks[i].any()
    return out, masks, has


# ----------------------------------------------------------------------------- real artifacts


class Cutout(NamedTuple):
    """A real artifact cut out of an image: its pixels (H, W, 3) uint8 and mask (H, W) 0/1,
    at the image's size and place, and the id of the image it came from."""

    image: np.ndarray
    mask: np.ndarray
    source: str


def cut_out(image: np.ndarray, mask: np.ndarray, source: str = "") -> Cutout:
    """The artifact of ``image`` marked by ``mask`` (> 0), to paste onto other images."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"{source}: image {image.shape[:2]} and mask {mask.shape} differ")
    return Cutout(image, (mask > 0).astype(np.uint8), source)


def _placements(cut: Cutout):
    """The cut-out as it is, mirrored and turned: eight ways to place it."""
    for k in range(4):
        for flip in (False, True):
            img, m = np.rot90(cut.image, k), np.rot90(cut.mask, k)
            if flip:
                img, m = img[:, ::-1], m[:, ::-1]
            yield img, m


def paste_cutouts(
    images: np.ndarray,
    lesions: np.ndarray,
    cutouts: list[Cutout],
    *,
    seed: int,
    margin: float = 0.03,
    which: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paste a real artifact onto each image (or those in ``which``), never over its lesion.

    Image ``i`` gets a cut-out drawn with ``default_rng([seed, i])``, at its own place or, if
    that would touch the lesion (grown by ``margin`` of the side), mirrored or turned; the next
    cut-outs are tried in turn when none fits. An image no cut-out fits is left as it is (its
    mask stays empty): callers count ``has``.

    Returns:
        (images, masks, has): uint8 (N, H, W, 3), uint8 (N, H, W) 0/1, bool (N,).
    """
    if not cutouts:
        raise ValueError("cutouts: expected at least one artifact to paste")
    size = images.shape[1]
    if any(c.mask.shape != images.shape[1:3] for c in cutouts):
        raise ValueError(f"cutouts: expected masks of the images' size {images.shape[1:3]}")
    out, masks = images.copy(), np.zeros(images.shape[:3], np.uint8)
    has = np.zeros(len(images), bool)
    todo = range(len(images)) if which is None else np.flatnonzero(which)
    for i in todo:
        rng = np.random.default_rng([seed, int(i)])
        keepout = _dilate(lesions[i] > 0, max(1, int(round(margin * size))))
        first = int(rng.integers(len(cutouts)))
        for k in range(len(cutouts)):
            cut = cutouts[(first + k) % len(cutouts)]
            fits = [(img, m) for img, m in _placements(cut) if not (m.astype(bool) & keepout).any()]
            if fits:
                img, m = fits[int(rng.integers(len(fits)))]
                region = m.astype(bool)
                out[i][region] = img[region]
                masks[i] = m
                has[i] = True
                break
    return out, masks, has


# ----------------------------------------------------------------------------- annotations

ID_COLUMNS = ("image_id", "id", "image", "isic_id")


def read_artifact_flags(path: str | Path) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """Per-image artifact flags from a CSV: an id column (``image_id``, ``id``, ``image`` or
    ``isic_id``) and one 0/1 column per artifact. Returns (ids, {artifact: bool (N,)}).

    Raises:
        ValueError: no id column, no artifact column, or a value that is not 0 or 1 (the
            message names the file, the row and the column).
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    id_col = next((c for c in ID_COLUMNS if c in header), None)
    if id_col is None:
        raise ValueError(f"{path}: no id column (one of {ID_COLUMNS}); header {header[:8]}")
    names = [c for c in header if c != id_col]
    if not names:
        raise ValueError(f"{path}: no artifact column beside {id_col!r}")
    flags = {n: np.zeros(len(rows), bool) for n in names}
    for k, row in enumerate(rows, start=2):
        for n in names:
            if row[n] not in ("0", "1"):
                raise ValueError(f"{path}: row {k}, column {n!r}: expected 0 or 1, got {row[n]!r}")
            flags[n][k - 2] = row[n] == "1"
    ids = tuple(row[id_col].removesuffix("_downsampled") for row in rows)
    return ids, flags
