"""Feedback: a clinician says the class is right, gives the right one, and/or draws the region."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import PurePosixPath
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Header, HTTPException, Path, Query, Response, UploadFile
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ..auth import allowed
from ..db import Item, Original, User, Version, iso
from ..deps import Clinician, RuntimeDep, SessionDep
from ..limits import MAX_ID, decode_slot
from ..originals import decode_region
from ..schemas import FeedbackItem
from ..store import content_path
from ..uploads import png_bytes, read_limited

router = APIRouter(tags=["feedback"])


def _out(item: Item, user: str, update: Version | None, grace: float = 0.0) -> FeedbackItem:
    image_id = PurePosixPath(item.image_path).stem
    mask_id = PurePosixPath(item.mask_path).stem if item.mask_path else None
    ignore_id = PurePosixPath(item.ignore_mask_path).stem if item.ignore_mask_path else None
    return FeedbackItem(
        id=item.id,
        image_id=image_id,
        image_url=f"/api/images/{image_id}",
        user=user,
        created=iso(item.created),
        now_predicted=(update.metrics.get("update") or {}).get("outcomes", {}).get(str(item.id))
        if update is not None and update.status == "promoted"
        else None,
        learn_after=iso(item.created + timedelta(seconds=grace))
        if item.status == "pending"
        else None,
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
        propagated_from=item.propagated_from,
    )


@router.post(
    "/feedback",
    response_model=FeedbackItem,
    status_code=201,
    responses={200: {"model": FeedbackItem, "description": "a repeat: the item stored before"}},
)
def submit(
    user: Clinician,
    runtime: RuntimeDep,
    session: SessionDep,
    response: Response,
    image_id: Annotated[str, Form(description="from /api/predict or the gallery")],
    shown_version: Annotated[
        int, Form(ge=1, le=MAX_ID, description="the version whose answer was shown")
    ],
    predicted: Annotated[str, Form(description="the class that was shown")],
    label: Annotated[str | None, Form(description="the right class (default: predicted)")] = None,
    agree: Annotated[bool, Form(description="the class and explanation are right")] = False,
    mask: Annotated[UploadFile | None, File(description="PNG, the image's size")] = None,
    mask_rle: Annotated[str | None, Form(description='{"size": [h, w], "counts": [...]}')] = None,
    mask_base64: Annotated[str | None, Form(description="PNG as base64 or data URL")] = None,
    ignore_mask: Annotated[UploadFile | None, File(description="PNG: must not matter")] = None,
    ignore_mask_rle: Annotated[str | None, Form(description="like mask_rle")] = None,
    ignore_mask_base64: Annotated[str | None, Form(description="like mask_base64")] = None,
    on_conflict: Annotated[
        Literal["ask", "replace", "keep_both"],
        Form(
            description="your earlier feedback on this image: ask (409 when it gave another "
            "class, naming it), replace (withdraw all of it while no update has used it: an "
            "edit of the class or the region), keep_both (both stay; the export marks "
            "differing classes as conflicting, for review)"
        ),
    ] = "ask",
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            max_length=200,
            description="the same key again answers with the item stored the first time",
        ),
    ] = None,
) -> FeedbackItem:
    """Store one feedback item; the updater learns from it in the background.

    A mask marks the region that matters, an ignore mask the region that must not matter
    (white on black, the size of the model's input or of the original image; one drawn on the
    original is mapped to the model's input, see ``originals.py``). All of it is checked
    before anything is written; the row is written after its files exist. Feedback is accepted
    while an update runs: it waits for the next one. A repeated submission (the same
    ``Idempotency-Key``, or without one the same content, masks included, from the same user)
    is stored once: the repeat answers 200 with the first item.
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
        png = read_limited(file.file, name, limit) if file is not None else None
        what = name if file is not None else f"{name}_{'rle' if rle is not None else 'base64'}"
        with decode_slot():  # a mask drawn on the original is as large as the original
            return decode_region(
                png=png,
                rle=rle,
                b64=b64,
                size=runtime.registry.served.spec.input_size,
                original=(original.width, original.height) if original else None,
                max_bytes=limit,
                what=what,
            )

    region = region_of("mask", mask, mask_rle, mask_base64)
    ignore = region_of("ignore_mask", ignore_mask, ignore_mask_rle, ignore_mask_base64)
    if not agree and label == predicted and region is None and ignore is None:
        raise HTTPException(422, "nothing to learn: agree, give the right class, or draw a region")
    if region is not None and not region.any():
        raise HTTPException(422, "the mask is empty: draw the region that matters, or send none")
    if ignore is not None and not ignore.any():
        raise HTTPException(422, "the ignore mask is empty: draw what must not matter, or none")
    mask_png = None if region is None else png_bytes(region * 255)
    ignore_png = None if ignore is None else png_bytes(ignore * 255)
    mask_path = None if mask_png is None else content_path("masks", mask_png)
    ignore_path = None if ignore_png is None else content_path("masks", ignore_png)
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
    item.idempotency_key = _key(item, idempotency_key)
    first = _stored(session, user, item, idempotency_key is not None)
    if first is not None:
        response.status_code = 200
        return _out(first, user.name, _update_of(session, first), runtime.settings.grace_seconds)
    _resolve_conflicts(runtime, session, user, item, on_conflict)
    for png in (mask_png, ignore_png):
        if png is not None:
            runtime.store.put("masks", png)
    session.add(item)
    try:
        session.commit()
    except IntegrityError:  # the same submission raced this one in and won
        session.rollback()
        first = _stored(session, user, item, idempotency_key is not None)
        if first is None:
            raise
        response.status_code = 200
        return _out(first, user.name, _update_of(session, first), runtime.settings.grace_seconds)
    runtime.worker.notify()
    out = _out(item, user.name, None, runtime.settings.grace_seconds)
    current = runtime.registry.served.version_id
    if shown_version != current:  # stored (the class is still right), but not silently
        out.notes.append(
            f"you were shown version {shown_version}'s answer; version {current} is in use now "
            "and may already answer differently. Your feedback is stored and will be learnt."
        )
    return out


def _resolve_conflicts(runtime, session, user: User, item: Item, on_conflict: str) -> None:
    """The same clinician's earlier items on this image. ``ask``: 409 when one gives the image
    another class. ``replace``: withdraw every earlier item on the image (an edit of what was
    said: another class or another region), 409 if an update already used one. ``keep_both``:
    nothing. Nothing is committed here; the new item's commit carries it."""
    if on_conflict == "keep_both":
        return
    earlier = session.scalars(
        select(Item).where(
            Item.user_id == user.id,
            Item.image_path == item.image_path,
            Item.status != "withdrawn",
        )
    ).all()
    if on_conflict == "ask":
        other = [e for e in earlier if e.label != item.label]
        if other:
            said = ", ".join(f"#{e.id} ({e.label}, {e.status})" for e in other)
            raise HTTPException(
                409,
                f"you gave this image another class before: {said}; send on_conflict=replace "
                "to withdraw that and keep this one, or on_conflict=keep_both to keep both for "
                "review",
            )
        return
    used = [e for e in earlier if e.status != "pending"]
    if used:
        raise HTTPException(
            409,
            f"an update already learnt from {', '.join(f'#{e.id}' for e in used)}; it cannot be "
            "replaced: send on_conflict=keep_both to keep both for review",
        )
    for e in earlier:  # as a withdrawal, with its check that no running update holds it
        _withdraw(runtime, session, e)


_CONTENT = (
    "image_path",
    "label",
    "predicted",
    "agree",
    "mask_path",
    "ignore_mask_path",
    "shown_version_id",
)


def _key(item: Item, given: str | None) -> str:
    """The client's key, or (without one) a digest of what was said about which image."""
    text = f"client:{given}" if given is not None else repr([getattr(item, f) for f in _CONTENT])
    return hashlib.sha256(text.encode()).hexdigest()


def _stored(session, user: User, item: Item, given: bool) -> Item | None:
    """The item this user stored before under ``item``'s key; 409 if a client reused its key
    for other content."""
    first = session.scalar(
        select(Item).where(Item.user_id == user.id, Item.idempotency_key == item.idempotency_key)
    )
    if first is not None and given and any(getattr(first, f) != getattr(item, f) for f in _CONTENT):
        raise HTTPException(409, "Idempotency-Key: used before for another submission")
    return first


@router.get("/feedback", response_model=list[FeedbackItem])
def list_feedback(
    user: Clinician,
    session: SessionDep,
    runtime: RuntimeDep,
    status: Literal["pending", "used", "withdrawn"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[FeedbackItem]:
    """Stored feedback, newest first: a clinician's own; an admin sees everyone's."""
    query = select(Item, User.name).join(User, Item.user_id == User.id)
    if not allowed(user.role, "admin"):
        query = query.where(Item.user_id == user.id)
    if status is not None:
        query = query.where(Item.status == status)
    rows = session.execute(query.order_by(Item.id.desc()).limit(limit)).all()
    grace = runtime.settings.grace_seconds
    return [_out(item, name, _update_of(session, item), grace) for item, name in rows]


@router.get("/feedback/{item_id}", response_model=FeedbackItem)
def get_feedback(
    item_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    user: Clinician,
    session: SessionDep,
    runtime: RuntimeDep,
) -> FeedbackItem:
    """One item, with the verdict of the update that used it (poll this after submitting).
    Clinicians see their own items; admins see every item."""
    item = session.get(Item, item_id)
    if item is None or (item.user_id != user.id and not allowed(user.role, "admin")):
        raise HTTPException(404, f"no feedback item {item_id} of yours")
    user_name = session.get(User, item.user_id).name
    return _out(item, user_name, _update_of(session, item), runtime.settings.grace_seconds)


def _update_of(session, item: Item) -> Version | None:
    return session.get(Version, item.update_id) if item.update_id else None


@router.delete("/feedback/{item_id}", response_model=FeedbackItem)
def withdraw(
    item_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    user: Clinician,
    runtime: RuntimeDep,
    session: SessionDep,
) -> FeedbackItem:
    """Withdraw one's own feedback before an update has used it (it stays on record, marked
    withdrawn, and no update will learn from it; the same feedback may be given again).
    Another clinician's item is not found (404), as for reading it; an admin may see it but
    not withdraw it (403)."""
    item = session.get(Item, item_id)
    if item is None or (item.user_id != user.id and not allowed(user.role, "admin")):
        raise HTTPException(404, f"no feedback item {item_id} of yours")
    if item.user_id != user.id:
        raise HTTPException(403, "only the clinician who gave feedback may withdraw it")
    if item.status != "pending":
        raise HTTPException(409, f"feedback {item_id} is {item.status}; it cannot be withdrawn")
    _withdraw(runtime, session, item)
    session.commit()
    return _out(item, user.name, None, runtime.settings.grace_seconds)


def _withdraw(runtime, session, item: Item) -> None:
    """Mark a pending item withdrawn (not committed), unless an update running now learns from
    it (409): one in this process, or in another one on the database (it holds the updater's
    lease), learns from every item given before it started."""
    worker = runtime.worker
    started = None
    if worker.candidate_id is not None:
        started = session.get(Version, worker.candidate_id)
    elif worker.lease.held_by_other():
        started = session.scalar(
            select(Version).where(Version.status == "candidate").order_by(Version.id).limit(1)
        )
    if started is not None and item.created <= started.created:
        raise HTTPException(409, f"feedback {item.id} is being learned from right now")
    item.status = "withdrawn"
    item.idempotency_key = None  # a repeat of it is new feedback, not this withdrawn item
