"""Decoding one dataset record: its image squashed to ``size`` x ``size`` and the union of its
keep masks and of its ignore masks, resized nearest-neighbour so they stay 0/1. Used by
:func:`feedbackcam.data.prepared.prepare` (which decodes every record once)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .records import MASK_SIZE_MISMATCH, UNREADABLE_IMAGE, UNREADABLE_MASK, Problem, Record

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}


def union_mask(paths, record: Record, width: int, height: int, size: int, problems) -> np.ndarray:
    """The union of mask files, resized to size x size; problems appended to ``problems``."""
    mask = np.zeros((size, size), np.uint8)
    for path in paths:
        try:
            with Image.open(path) as m:
                m.load()
                if m.size != (width, height):
                    msg = f"mask is {m.size[0]}x{m.size[1]}, image {width}x{height}"
                    problems.append(Problem(path, record.id, MASK_SIZE_MISMATCH, msg))
                    continue
                # > 0, not > 127: official masks are 0/255, but a 0/1 mask must not vanish.
                binary = (np.asarray(m.convert("L")) > 0).astype(np.uint8)
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            problems.append(Problem(path, record.id, UNREADABLE_MASK, msg))
            continue
        # Masks are always resized nearest-neighbour so they stay binary.
        small = Image.fromarray(binary).resize((size, size), Image.Resampling.NEAREST)
        np.maximum(mask, np.asarray(small), out=mask)
    return mask


def load_record(record: Record, size: int, resample: str):
    """Decode one record: ((image, mask, ignore, width, height), []) or (None, problems)."""
    try:
        with Image.open(record.image) as im:
            im.load()  # decode now so a truncated file fails here, not half-way into resize
            width, height = im.size
            image = np.asarray(im.convert("RGB").resize((size, size), RESAMPLE[resample]))
    # Pillow signals a malformed file with many exception types; any means "cannot use it".
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
        return None, [Problem(record.image, record.id, UNREADABLE_IMAGE, msg)]
    problems: list[Problem] = []
    mask = union_mask(record.masks, record, width, height, size, problems)
    ignore = union_mask(record.ignore, record, width, height, size, problems)
    if problems:
        return None, problems
    return (image, mask, ignore, width, height), []


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux
        return None
    return None


def check_room(size: int, n: int, workers: int, where: Path) -> None:
    """Refuse, before any work, a size whose arrays cannot fit: each decoding worker holds an
    image and its two masks at ``size`` (twice, while resizing), and the folder takes ``n`` of
    them on disk. (``--size 100000`` was killed for memory at 18 GB with no message.)"""
    per_image = size * size * 5  # RGB + mask + ignore mask, one byte each
    needed = 2 * per_image * workers
    free = _available_memory()
    if free is not None and needed > free:
        raise ValueError(
            f"size {size}: each of {workers} decoding worker(s) needs about "
            f"{2 * per_image / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB of memory "
            "available; choose a smaller --size"
        )
    disk = shutil.disk_usage(where).free
    if n * per_image > disk:
        raise ValueError(
            f"size {size}: {n} image(s) take about {n * per_image / 2**30:.1f} GiB, more than "
            f"the {disk / 2**30:.1f} GiB free on {where}; choose a smaller --size"
        )
