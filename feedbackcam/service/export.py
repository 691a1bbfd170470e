"""The collected feedback as a dataset that ``feedbackcam data check`` / ``data prepare`` read.

Layout (one row per feedback item, withdrawn items left out)::

    OUT/
      images/<id>.png    the image at the model's input size, as the model saw it
      masks/<id>.png     the region that matters (255 inside), when one was drawn
      ignore/<id>.png    the region that must not matter, when one was drawn
      labels.csv         id,label,user,created_at,model_version,propagated_from
      README.txt         this layout

``id`` is ``fb<feedback id, 6 digits>``; ``label`` the class the clinician gave; ``user`` who
gave it; ``created_at`` when (UTC, ISO 8601); ``model_version`` the version whose answer was
shown; ``propagated_from`` empty, or for an accepted proposal the id of the mark it was found
from (its ``label`` is then the served model's prediction: the clinician confirmed the artifact,
not the class). Masks have the images' size.
"""

from __future__ import annotations

import csv
import io
import shutil
import zipfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from .db import Item, User, iso
from .store import Store

COLUMNS = ("id", "label", "user", "created_at", "model_version", "propagated_from")


def _rows(session: Session):
    query = (
        select(Item, User.name)
        .join(User, Item.user_id == User.id)
        .where(Item.status != "withdrawn")
        .order_by(Item.id)
    )
    return session.execute(query).all()


def _files(store: Store, item: Item, name: str):
    """(path inside the export, file in the store) for one item."""
    yield f"images/{name}.png", store.absolute(item.image_path)
    if item.mask_path:
        yield f"masks/{name}.png", store.absolute(item.mask_path)
    if item.ignore_mask_path:
        yield f"ignore/{name}.png", store.absolute(item.ignore_mask_path)


def _labels_csv(rows) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for item, user in rows:
        source = "" if item.propagated_from is None else f"fb{item.propagated_from:06d}"
        writer.writerow(
            [f"fb{item.id:06d}", item.label, user, iso(item.created), item.shown_version_id, source]
        )
    return buf.getvalue()


def export_folder(session: Session, store: Store, out: Path) -> int:
    """Write the export to the folder ``out`` (created; must be empty). Returns the item count."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: not empty; export into a new folder")
    rows = _rows(session)
    for area in ("images", "masks", "ignore"):
        (out / area).mkdir(parents=True, exist_ok=True)
    for item, _ in rows:
        for inside, source in _files(store, item, f"fb{item.id:06d}"):
            shutil.copyfile(source, out / inside)
    (out / "labels.csv").write_text(_labels_csv(rows))
    (out / "README.txt").write_text(__doc__)
    return len(rows)


def export_zip(session: Session, store: Store, target) -> int:
    """Write the export as a ZIP (one top folder, ``feedback/``) to a binary file object."""
    rows = _rows(session)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for item, _ in rows:
            for inside, source in _files(store, item, f"fb{item.id:06d}"):
                archive.write(source, f"feedback/{inside}")
        archive.writestr("feedback/labels.csv", _labels_csv(rows))
        archive.writestr("feedback/README.txt", __doc__)
    return len(rows)
