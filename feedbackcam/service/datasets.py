"""Labelled image sets the app is given in its data dir, each as ``NAME/`` (a folder written by
``feedbackcam data prepare``) or ``NAME.npz`` (arrays ``images`` (N, H, W, 3) uint8, ``masks``
(N, H, W), ``labels`` (N,), ``has_mask`` (N,), ``classes``, optional ``ids``):

* ``validation``: the held-out set the gate scores candidates on (required for updates). It must
  not overlap the images users give feedback on, or the gate would reward memorising them.
* ``replay`` (optional): images the model was trained on, replayed class-balanced with earlier
  feedback, so the first updates, with little feedback to replay, are not single-image steps.

Serving the demo model, the app writes both from SynthDerm (see ``service/demo.py``).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.dataset import ArrayDataset
from ..fileio import write_bytes


def save_npz(path: Path, data: ArrayDataset) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        images=data.images,
        masks=data.masks,
        labels=data.labels,
        has_mask=data.has_mask,
        ids=np.array(data.ids, dtype=str),
        classes=np.array(data.classes, dtype=str),
    )
    return write_bytes(Path(path), buf.getvalue())


def _load_npz(path: Path) -> ArrayDataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            n = len(z["labels"])
            ids = tuple(z["ids"].tolist()) if "ids" in z else tuple(f"val{i}" for i in range(n))
            return ArrayDataset(
                z["images"].astype(np.uint8),
                z["masks"].astype(np.uint8),
                z["labels"].astype(np.int64),
                z["has_mask"].astype(bool),
                ids,
                tuple(z["classes"].tolist()),
            )
    except (KeyError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a labelled image set ({err})") from err


def load_labelled(
    data_dir: Path, name: str, classes: tuple[str, ...], size: int
) -> ArrayDataset | None:
    """The set ``name`` in ``data_dir``, labels re-indexed by the model's class names and images
    squashed to its input size; None when the data dir has none."""
    folder, npz = Path(data_dir) / name, Path(data_dir) / f"{name}.npz"
    if folder.is_dir():
        from ..data.prepared import load_prepared

        data = load_prepared(folder, mmap=False)
    elif npz.is_file():
        data = _load_npz(npz)
    else:
        return None
    unknown = [c for c in data.classes if c not in classes]
    if unknown:
        raise ValueError(f"{data_dir}: {name} classes {unknown} are not the model's {classes}")
    labels = np.asarray([classes.index(c) for c in data.classes])[data.labels]
    images, masks = data.images, data.masks
    if data.size != size:
        images = np.stack([resize_nearest(im, size) for im in images])
        masks = np.stack([resize_nearest(m, size) for m in masks])
    return ArrayDataset(images, masks, labels, data.has_mask, data.ids, tuple(classes))


def resize_nearest(array: np.ndarray, size: int) -> np.ndarray:
    """A uint8 (H, W[, 3]) image or 0/1 mask at size x size (nearest neighbour: a mask stays
    0/1; unchanged when it has that size already)."""
    if array.shape[:2] == (size, size):
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.NEAREST))


def concat(parts: list[ArrayDataset]) -> ArrayDataset:
    """The parts one after another; ignore masks are kept (empty where a part has none)."""
    first = parts[0]
    ignore = has_ignore = None
    if any(p.ignore is not None for p in parts):
        ignore = np.concatenate(
            [p.ignore if p.ignore is not None else np.zeros_like(p.masks) for p in parts]
        )
        has_ignore = np.concatenate(
            [p.has_ignore if p.has_ignore is not None else np.zeros(len(p), bool) for p in parts]
        )
    return ArrayDataset(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.masks for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.has_mask for p in parts]),
        tuple(i for p in parts for i in p.ids),
        first.classes,
        ignore,
        has_ignore,
    )


def fingerprint(data: ArrayDataset) -> str:
    """Identifies a validation set, so metrics computed on another one are not compared."""
    digest = hashlib.sha256()
    digest.update("\n".join(data.ids).encode())
    digest.update(data.labels.tobytes())
    return digest.hexdigest()[:16]
