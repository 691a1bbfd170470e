"""The gallery and the stored images and masks (behind sign-in: they are patient data)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from ..deps import Clinician, RuntimeDep, Viewer
from ..schemas import GalleryEntry

router = APIRouter(tags=["images"])


@router.get("/gallery", response_model=list[GalleryEntry])
def gallery(user: Viewer, runtime: RuntimeDep) -> list[GalleryEntry]:
    """Images of the dataset to pick from instead of uploading one."""
    return [
        GalleryEntry(
            image_id=g.image_id, name=g.name, label=g.label, image_url=f"/api/images/{g.image_id}"
        )
        for g in runtime.gallery
    ]


def _file(runtime, area: str, content_id: str) -> FileResponse:
    path = runtime.store.path_of(area, content_id)
    if path is None:
        raise HTTPException(404, f"no {area[:-1]} {content_id!r}")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private"})


@router.get("/images/{image_id}", response_class=FileResponse)
def image(image_id: str, user: Viewer, runtime: RuntimeDep):
    """A stored image (PNG, at the model's input size)."""
    return _file(runtime, "images", image_id)


@router.get("/masks/{mask_id}", response_class=FileResponse)
def mask(mask_id: str, user: Clinician, runtime: RuntimeDep):
    """A stored feedback mask (PNG: 255 inside the region)."""
    return _file(runtime, "masks", mask_id)
