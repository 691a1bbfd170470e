"""Feedback: a clinician says the class is right, gives the right one, and/or draws the region."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, HTTPException, Query, UploadFile
from sqlalchemy import select

from ..db import Item, Original, User, Version, iso
from ..deps import Clinician, RuntimeDep, SessionDep
from ..originals import decode_region
from ..schemas import FeedbackItem
from ..uploads import png_bytes, read_limited

router = APIRouter(tags=["feedback"])


def _out(item: Item, user: str, update: Version | None) -> FeedbackItem:
    image_id = PurePosixPath(item.image_path).stem
    mask_id = PurePosixPath(item.mask_path).stem if item.mask_path else None
    ignore_id = PurePosixPath(item.ignore_mask_path).stem if item.ignore_mask_path else None
    return FeedbackItem(
        id=item.id,
        image_id=image_id,
        image_url=f"/api/images/{image_id}",
        user=user,
        created=iso(item.created),
        label=item.label,
        predicted=item.predicted,
        agree=item.agree,
        mask_url=f"/api/masks/{mask_id}" if mask_id else None,
        ignore_mask_url=f"/api/masks/{ignore_id}" if ignore_id else None,
        shown_version=item.shown_version_id,
        status=item.status,
        update_version=item.update_id,
        update_status=update.status if update else None,
        update_reason=update.reason if update else None,
    )


@router.post("/feedback", response_model=FeedbackItem, status_code=201)
def submit(
    user: Clinician,
    runtime: RuntimeDep,
    session: SessionDep,
    image_id: Annotated[str, Form(description="from /api/predict or the gallery")],
    shown_version: Annotated[int, Form(description="the version whose answer was shown")],
    predicted: Annotated[str, Form(description="the class that was shown")],
    label: Annotated[str | None, Form(description="the right class (default: predicted)")] = None,
    agree: Annotated[bool, Form(description="the class and explanation are right")] = False,
    mask: Annotated[UploadFile | None, File(description="PNG, the image's size")] = None,
    mask_rle: Annotated[str | None, Form(description='{"size": [h, w], "counts": [...]}')] = None,
    mask_base64: Annotated[str | None, Form(description="PNG as base64 or data URL")] = None,
    ignore_mask: Annotated[UploadFile | None, File(description="PNG: must not matter")] = None,
    ignore_mask_rle: Annotated[str | None, Form(description="like mask_rle")] = None,
    ignore_mask_base64: Annotated[str | None, Form(description="like mask_base64")] = None,
) -> FeedbackItem:
    """Store one feedback item; the updater learns from it in the background.

    A mask marks the region that matters, an ignore mask the region that must not matter
    (white on black, the size of the model's input or of the original image; one drawn on the
    original is mapped to the model's input, see ``originals.py``). All of it is checked
    before anything is written; the row is written after its files exist. Feedback is accepted
    while an update runs: it waits for the next one.
    """
    classes = runtime.registry.served.spec.classes
    image_path = runtime.store.path_of("images", image_id)
    if image_path is None:
        raise HTTPException(404, f"no image {image_id!r}: upload it to /api/predict first")
    label = label or predicted
    for name, value in (("predicted", predicted), ("label", label)):
        if value not in classes:
            raise HTTPException(422, f"{name}: expected one of {list(classes)}, got {value!r}")
    if agree and label != predicted:
        raise HTTPException(422, "agree means the shown class is right; label must equal it")
    if session.get(Version, shown_version) is None:
        raise HTTPException(422, f"shown_version: no version {shown_version}")
    original = session.get(Original, image_id)
    limit = runtime.settings.max_upload_bytes

    def region_of(name, file, rle, b64):
        given = [m for m in (file, rle, b64) if m is not None]
        if len(given) > 1:
            raise HTTPException(422, f"send one {name}: {name}, {name}_rle or {name}_base64")
        if not given:
            return None
        return decode_region(
            png=read_limited(file.file, name, limit) if file is not None else None,
            rle=rle,
            b64=b64,
            size=runtime.registry.served.spec.input_size,
            original=(original.width, original.height) if original else None,
            max_bytes=limit,
            what=name if file is not None else f"{name}_{'rle' if rle is not None else 'base64'}",
        )

    region = region_of("mask", mask, mask_rle, mask_base64)
    ignore = region_of("ignore_mask", ignore_mask, ignore_mask_rle, ignore_mask_base64)
    if not agree and label == predicted and region is None:
        raise HTTPException(422, "nothing to learn: agree, give the right class, or draw a region")
    if region is not None and not region.any():
        raise HTTPException(422, "the mask is empty: draw the region that matters, or send none")
    if ignore is not None and not ignore.any():
        raise HTTPException(422, "the ignore mask is empty: draw what must not matter, or none")
    mask_path = ignore_path = None
    if region is not None:
        mask_path = f"masks/{runtime.store.put('masks', png_bytes(region * 255))}.png"
    if ignore is not None:
        ignore_path = f"masks/{runtime.store.put('masks', png_bytes(ignore * 255))}.png"
    item = Item(
        image_path=f"images/{image_id}.png",
        user_id=user.id,
        label=label,
        predicted=predicted,
        agree=agree,
        mask_path=mask_path,
        ignore_mask_path=ignore_path,
        shown_version_id=shown_version,
    )
    session.add(item)
    session.commit()
    runtime.worker.notify()
    return _out(item, user.name, None)


@router.get("/feedback", response_model=list[FeedbackItem])
def list_feedback(
    user: Clinician,
    session: SessionDep,
    status: Literal["pending", "used", "withdrawn"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[FeedbackItem]:
    """Stored feedback, newest first."""
    query = select(Item, User.name).join(User, Item.user_id == User.id)
    if status is not None:
        query = query.where(Item.status == status)
    rows = session.execute(query.order_by(Item.id.desc()).limit(limit)).all()
    return [_out(item, name, _update_of(session, item)) for item, name in rows]


@router.get("/feedback/{item_id}", response_model=FeedbackItem)
def get_feedback(item_id: int, user: Clinician, session: SessionDep) -> FeedbackItem:
    """One item, with the verdict of the update that used it (poll this after submitting)."""
    item = session.get(Item, item_id)
    if item is None:
        raise HTTPException(404, f"no feedback item {item_id}")
    return _out(item, session.get(User, item.user_id).name, _update_of(session, item))


def _update_of(session, item: Item) -> Version | None:
    return session.get(Version, item.update_id) if item.update_id else None


@router.delete("/feedback/{item_id}", response_model=FeedbackItem)
def withdraw(item_id: int, user: Clinician, runtime: RuntimeDep, session: SessionDep):
    """Withdraw one's own feedback before an update has used it (it stays on record, marked
    withdrawn, and no update will learn from it)."""
    item = session.get(Item, item_id)
    if item is None:
        raise HTTPException(404, f"no feedback item {item_id}")
    if item.user_id != user.id:
        raise HTTPException(403, "only the clinician who gave feedback may withdraw it")
    if item.status != "pending":
        raise HTTPException(409, f"feedback {item_id} is {item.status}; it cannot be withdrawn")
    candidate = runtime.worker.candidate_id
    if candidate is not None:
        started = session.get(Version, candidate)
        if started is not None and item.created <= started.created:
            raise HTTPException(409, f"feedback {item_id} is being learned from right now")
    item.status = "withdrawn"
    session.commit()
    return _out(item, user.name, None)
