"""A band-aid paster: put a seeded, band-aid-like patch outside the lesion of a real image.

Used to build a shortcut on ISIC images (a patch on most MEL and few other images in training, at
random at test), with the patch's exact mask as the "ignore" feedback a user would draw. The
patch is a rotated rounded rectangle in a beige / skin-tone plastic colour with a lighter
central pad, a darker rim, a fine texture of perforation dots and soft shading, alpha-blended
with anti-aliased edges. Everything is a function of the generator passed in.
"""

from __future__ import annotations

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
