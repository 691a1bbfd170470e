"""Worklists: create one from a folder in the data dir (admin) or from uploads, walk it, mark
each image's state."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, HTTPException, Path, UploadFile
from pydantic import BaseModel, Field
from sqlalchemy import select

from .. import worklist as lists
from ..auth import allowed
from ..db import Item, Worklist, WorklistEntry, iso
from ..deps import Admin, Clinician, RuntimeDep, SessionDep, Viewer
from ..limits import MAX_ID

router = APIRouter(tags=["worklists"])

State = Literal["new", "reviewed", "feedback", "skipped"]
Id = Annotated[int, Path(ge=1, le=MAX_ID)]


class EntryOut(BaseModel):
    id: int
    position: int
    name: str
    original_id: str
    original_url: str
    image_id: str | None
    state: State
    feedback_id: int | None


class WorklistOut(BaseModel):
    id: int
    name: str
    created: str
    counts: dict[str, int] = Field(description="entries per state, and the total")
    entries: list[EntryOut] = []
    skipped_files: list[str] = Field([], description="files not imported, and why")


class FolderImport(BaseModel):
    folder: str = Field(description="a folder inside the data dir, relative to it")
    name: str | None = Field(None, max_length=200)


class EntryChange(BaseModel):
    state: State
    image_id: str | None = Field(None, max_length=64)
    feedback_id: int | None = Field(default=None, ge=1, le=MAX_ID)


def _entry(e: WorklistEntry) -> EntryOut:
    return EntryOut(
        id=e.id,
        position=e.position,
        name=e.name,
        original_id=e.original_id,
        original_url=f"/api/originals/by-id/{e.original_id}",
        image_id=e.image_id,
        state=e.state,
        feedback_id=e.feedback_id,
    )


def _out(session, worklist: Worklist, with_entries=True, skipped=()) -> WorklistOut:
    rows = lists.entries(session, worklist.id)
    return WorklistOut(
        id=worklist.id,
        name=worklist.name,
        created=iso(worklist.created),
        counts=lists.counts(rows),
        entries=[_entry(e) for e in rows] if with_entries else [],
        skipped_files=list(skipped),
    )


@router.post("/worklists", response_model=WorklistOut, status_code=201)
def import_folder(body: FolderImport, user: Admin, runtime: RuntimeDep, session: SessionDep):
    """Import the PNG and JPEG images of a folder under the data dir as a worklist."""
    root = runtime.settings.data_dir.resolve()
    try:
        folder = (root / body.folder).resolve()
    except (ValueError, OSError) as err:  # a NUL byte, an unencodable name, a link loop
        raise HTTPException(422, f"folder: not a usable path ({err})") from err
    if not folder.is_relative_to(root):
        raise HTTPException(422, "folder: must be inside the data dir")
    limits = runtime.settings
    try:
        files = lists.read_folder(folder, limits.max_upload_bytes)
        worklist, skipped = lists.create(
            session,
            runtime.store,
            body.name or folder.name,
            files,
            max_bytes=limits.max_upload_bytes,
            max_pixels=limits.max_pixels,
        )
    except (FileNotFoundError, NotADirectoryError) as err:
        raise HTTPException(404, f"folder: no folder {body.folder!r} in the data dir") from err
    except (ValueError, OSError) as err:
        raise HTTPException(422, str(err)) from err
    return _out(session, worklist, skipped=skipped)


@router.post("/worklists/upload", response_model=WorklistOut, status_code=201)
def import_uploads(
    user: Clinician,
    runtime: RuntimeDep,
    session: SessionDep,
    files: Annotated[list[UploadFile], File(description="PNG or JPEG images")],
    name: Annotated[str, Form(max_length=200)] = "uploads",
):
    """Make a worklist of uploaded images, in the order sent."""
    limit, pixels = runtime.settings.max_upload_bytes, runtime.settings.max_pixels
    read = [(f.filename or f"image{k}", f.file.read(limit + 1)) for k, f in enumerate(files)]
    try:
        worklist, skipped = lists.create(
            session, runtime.store, name, read, max_bytes=limit, max_pixels=pixels
        )
    except ValueError as err:
        raise HTTPException(422, str(err)) from err
    return _out(session, worklist, skipped=skipped)


@router.get("/worklists", response_model=list[WorklistOut])
def list_worklists(user: Viewer, session: SessionDep):
    """Every worklist, newest first, with its counts."""
    rows = session.scalars(select(Worklist).order_by(Worklist.id.desc())).all()
    return [_out(session, w, with_entries=False) for w in rows]


@router.get("/worklists/{worklist_id}", response_model=WorklistOut)
def get_worklist(worklist_id: Id, user: Viewer, session: SessionDep):
    """One worklist: its images in order, each with its state (new, seen, feedback given,
    skipped), and the counts per state."""
    worklist = session.get(Worklist, worklist_id)
    if worklist is None:
        raise HTTPException(404, f"no worklist {worklist_id}")
    return _out(session, worklist)


@router.patch("/worklists/{worklist_id}/entries/{entry_id}", response_model=EntryOut)
def change_entry(
    worklist_id: Id, entry_id: Id, body: EntryChange, user: Clinician, session: SessionDep
):
    """Record how far an image's review got (opened, feedback given, skipped). Clinicians and
    admins only: the progress is shared, and a viewer who looks at an image has not reviewed
    it."""
    entry = session.get(WorklistEntry, entry_id)
    if entry is None or entry.worklist_id != worklist_id:
        raise HTTPException(404, f"no entry {entry_id} in worklist {worklist_id}")
    if body.state == "feedback":
        item = session.get(Item, body.feedback_id) if body.feedback_id else None
        if item is None or (item.user_id != user.id and not allowed(user.role, "admin")):
            raise HTTPException(422, "feedback_id: the feedback item given for this image")
        entry.feedback_id = item.id
    if body.state != "reviewed" or entry.state == "new":
        entry.state = body.state  # opening an image again keeps "feedback" or "skipped"
    if body.image_id is not None:
        entry.image_id = body.image_id
    session.commit()
    return _entry(entry)
