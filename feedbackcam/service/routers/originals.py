"""The images as uploaded (originals), which the page shows at full resolution."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from ..db import Original
from ..deps import RuntimeDep, SessionDep, Viewer
from ..originals import original_path

router = APIRouter(tags=["images"])


def _original_file(path):
    media = "image/png" if path.suffix == ".png" else "image/jpeg"
    return FileResponse(path, media_type=media, headers={"Cache-Control": "private"})


@router.get("/originals/by-id/{original_id}", response_class=FileResponse)
def original_by_id(original_id: str, user: Viewer, runtime: RuntimeDep):
    """A stored original by its own content id (a worklist entry's)."""
    path = original_path(runtime.store, original_id)
    if path is None:
        raise HTTPException(404, f"no original {original_id!r}")
    return _original_file(path)


@router.get("/originals/{image_id}", response_class=FileResponse)
def original(image_id: str, user: Viewer, runtime: RuntimeDep, session: SessionDep):
    """The image as uploaded, for a stored model-input image."""
    row = session.get(Original, image_id)
    if row is None:
        raise HTTPException(404, f"no original for image {image_id!r}")
    return _original_file(runtime.store.absolute(row.path))
