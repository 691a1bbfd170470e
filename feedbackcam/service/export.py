"""The collected feedback as a dataset that ``feedbackcam data check`` / ``data prepare`` read.

Layout (one row per feedback item, withdrawn items left out)::

    OUT/
      images/<id>.png    the image at the model's input size, as the model saw it
      masks/<id>.png     the region that matters (255 inside), when one was drawn
      ignore/<id>.png    the region that must not matter, when one was drawn
      originals/<id>.<png|jpg>  the image as the clinic uploaded it, when it was kept
      labels.csv         id,label,user,created_at,model_version,propagated_from,predicted,
                         agree,worklist,source_name,original,conflicts
      README.txt         this layout

``id`` is ``fb<feedback id, 6 digits>``; ``label`` the class the clinician gave; ``user`` who
gave it; ``created_at`` when (UTC, ISO 8601); ``model_version`` the version whose answer was
shown; ``propagated_from`` empty, or for an accepted proposal the id of the mark it was found
from (its ``label`` is then the served model's prediction: the clinician confirmed the artifact,
not the class). Masks have the images' size. ``predicted`` is the class the model showed,
``agree`` whether the clinician agreed with it; ``worklist`` and ``source_name`` the worklist and
the file name the image came from (empty for a single upload); ``original`` the path of the
uploaded file in this export; ``conflicts`` the ids of other rows that give the same image
another label (``;``-separated; resolve them before training on this set).
"""

from __future__ import annotations

import csv
import io
import shutil
import zipfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from .db import Item, Original, User, Worklist, WorklistEntry, iso
from .store import Store

COLUMNS = (
    "id",
    "label",
    "user",
    "created_at",
    "model_version",
    "propagated_from",
    "predicted",
    "agree",
    "worklist",
    "source_name",
    "original",
    "conflicts",
)


def _name(item: Item) -> str:
    return f"fb{item.id:06d}"


def _rows(session: Session):
    """(item, user name, details) per exported item; details hold the original, the worklist
    entry it came from and the conflicting rows."""
    query = (
        select(Item, User.name)
        .join(User, Item.user_id == User.id)
        .where(Item.status != "withdrawn")
        .order_by(Item.id)
    )
    rows = session.execute(query).all()
    by_image: dict[str, list[Item]] = {}
    for item, _ in rows:
        by_image.setdefault(item.image_path, []).append(item)
    # one query each for the worklist entries and the originals, not one per item
    entries = {
        entry.feedback_id: (entry, name)
        for entry, name in session.execute(
            select(WorklistEntry, Worklist.name)
            .join(Worklist, WorklistEntry.worklist_id == Worklist.id)
            .where(WorklistEntry.feedback_id.is_not(None))
        )
    }
    originals = {o.image_id: o for o in session.scalars(select(Original))}
    out = []
    for item, user in rows:
        image_id = item.image_path.rsplit("/", 1)[-1].removesuffix(".png")
        entry, worklist = entries.get(item.id, (None, ""))
        details = {
            "original": originals.get(image_id),
            "worklist": worklist,
            "source_name": entry.name if entry else "",
            "conflicts": [o for o in by_image[item.image_path] if o.label != item.label],
        }
        out.append((item, user, details))
    return out


def _files(store: Store, item: Item, details: dict):
    """(path inside the export, file in the store) for one item."""
    name = _name(item)
    yield f"images/{name}.png", store.absolute(item.image_path)
    if item.mask_path:
        yield f"masks/{name}.png", store.absolute(item.mask_path)
    if item.ignore_mask_path:
        yield f"ignore/{name}.png", store.absolute(item.ignore_mask_path)
    if details["original"] is not None:
        yield _original(item, details), store.absolute(details["original"].path)


def _original(item: Item, details: dict) -> str:
    suffix = details["original"].path.rsplit(".", 1)[-1]
    return f"originals/{_name(item)}.{suffix}"


def _labels_csv(rows) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for item, user, details in rows:
        source = "" if item.propagated_from is None else f"fb{item.propagated_from:06d}"
        writer.writerow(
            [
                _name(item),
                item.label,
                user,
                iso(item.created),
                item.shown_version_id,
                source,
                item.predicted,
                int(item.agree),
                details["worklist"],
                details["source_name"],
                _original(item, details) if details["original"] is not None else "",
                ";".join(_name(o) for o in details["conflicts"]),
            ]
        )
    return buf.getvalue()


def export_folder(session: Session, store: Store, out: Path) -> int:
    """Write the export to the folder ``out`` (created; must be empty). Returns the item count."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: not empty; export into a new folder")
    rows = _rows(session)
    for area in ("images", "masks", "ignore", "originals"):
        (out / area).mkdir(parents=True, exist_ok=True)
    for item, _, details in rows:
        for inside, source in _files(store, item, details):
            shutil.copyfile(source, out / inside)
    (out / "labels.csv").write_text(_labels_csv(rows))
    (out / "README.txt").write_text(__doc__)
    return len(rows)


def export_zip(session: Session, store: Store, target) -> int:
    """Write the export as a ZIP (one top folder, ``feedback/``) to a binary file object."""
    rows = _rows(session)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for item, _, details in rows:
            for inside, source in _files(store, item, details):
                archive.write(source, f"feedback/{inside}")
        archive.writestr("feedback/labels.csv", _labels_csv(rows))
        archive.writestr("feedback/README.txt", __doc__)
    return len(rows)
