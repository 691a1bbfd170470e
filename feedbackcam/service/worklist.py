"""Worklists: a folder or a set of uploads, reviewed image by image, state kept in the database.

Each entry keeps its original bytes in the store (``originals/``); the page predicts it by
``original_id`` when it is opened, which records the model-input ``image_id``. An entry's state
is ``new`` (not opened), ``reviewed`` (opened), ``feedback`` (feedback given, ``feedback_id``)
or ``skipped``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from .db import ENTRY_STATES, Worklist, WorklistEntry
from .limits import decode_slot
from .originals import model_input, put_original
from .store import Store
from .uploads import UploadError, check_size, decode_image

SUFFIXES = (".png", ".jpg", ".jpeg")


def create(
    session: Session,
    store: Store,
    name: str,
    files: list[tuple[str, bytes]],
    *,
    max_bytes: int,
    max_pixels: int,
    rank: Callable[[list[tuple[str, bytes]]], Sequence[int]] | None = None,
) -> tuple[Worklist, list[str]]:
    """A worklist of the files that are PNG or JPEG images within the limits, in the order
    given, or in the order ``rank`` returns (indices into the readable files, each once; e.g.
    :func:`suspicious_order`). Returns it and the reasons the other files were skipped.
    Commits."""
    kept, skipped = [], []
    for filename, data in files:
        with decode_slot():  # a busy server answers 503 rather than skipping the file
            try:
                check_size(data, filename, max_bytes)
                decode_image(data, filename, max_pixels=max_pixels)
            except UploadError as err:
                skipped.append(str(err))
                continue
        kept.append((filename, data))
    if not kept:
        raise ValueError(f"no readable PNG or JPEG images ({'; '.join(skipped) or 'none given'})")
    if rank is not None:
        order = [int(i) for i in rank(kept)]
        if sorted(order) != list(range(len(kept))):
            raise ValueError(f"rank: expected each of the {len(kept)} images once, got {order}")
        kept = [kept[i] for i in order]
    kept = [(filename, put_original(store, data)) for filename, data in kept]
    worklist = Worklist(name=_text(name, 200))
    session.add(worklist)
    session.flush()
    for position, (filename, original_id) in enumerate(kept):
        session.add(
            WorklistEntry(
                worklist_id=worklist.id,
                position=position,
                name=_text(Path(filename).name, 255),
                original_id=original_id,
            )
        )
    session.commit()
    return worklist, skipped


def _text(text: str, length: int) -> str:
    """A name as the database can store it: UTF-8 (a lone surrogate becomes "?"), no NUL,
    at most ``length`` characters."""
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")[:length]


def read_folder(folder: Path, max_bytes: int) -> list[tuple[str, bytes]]:
    """The images of a folder (not recursive), sorted by name; too-big files are read only as
    far as needed to refuse them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    files = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in SUFFIXES:
            with open(path, "rb") as f:
                files.append((path.name, f.read(max_bytes + 1)))
    return files


def entries(session: Session, worklist_id: int) -> list[WorklistEntry]:
    query = select(WorklistEntry).where(WorklistEntry.worklist_id == worklist_id)
    return list(session.scalars(query.order_by(WorklistEntry.position)))


def counts(rows: list[WorklistEntry]) -> dict[str, int]:
    seen = Counter(row.state for row in rows)
    return {state: seen.get(state, 0) for state in ENTRY_STATES} | {"total": len(rows)}


def suspicious_order(
    model, size: int, *, max_pixels: int, masks: Path | None = None, report=print
) -> Callable[[list[tuple[str, bytes]]], list[int]]:
    """A ``rank`` for :func:`create`: most suspicious first (:mod:`feedbackcam.suspicion`: the
    explanation outside the lesion, the prediction changed by other images' surroundings, the
    model unsure), under ``model`` at its input ``size``. ``masks``: a folder of lesion masks
    ``<image name's stem>.png`` (white on the lesion); an image without one is scored by its
    uncertainty alone. ``report`` receives one line per image, in the new order."""

    def rank(files: list[tuple[str, bytes]]) -> list[int]:
        import numpy as np

        from ..imageio import read_mask
        from ..suspicion import suspicion

        images = np.zeros((len(files), size, size, 3), np.uint8)
        keep = np.zeros((len(files), size, size), np.uint8)
        for i, (filename, data) in enumerate(files):
            with decode_slot():
                images[i] = model_input(decode_image(data, filename, max_pixels=max_pixels), size)
            path = None if masks is None else Path(masks) / f"{Path(filename).stem}.png"
            if path is not None and path.is_file():
                keep[i] = read_mask(path, size=size)
        found = suspicion(model, images, keep if keep.any() else None)
        order = [int(i) for i in found.order()]
        for i in order:
            signs = ", ".join(
                f"{name} {v:.2f}"
                for name in ("outside", "swap", "uncertainty")
                if not np.isnan(v := getattr(found, name)[i])
            )
            report(f"{found.score[i]:.3f}  {files[i][0]}  ({signs})")
        return order

    return rank
