"""The collected feedback as a dataset, for an admin to download (layout: ``export.py``)."""

from __future__ import annotations

import os
import tempfile

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from ..deps import Admin, RuntimeDep, SessionDep
from ..export import export_zip

router = APIRouter(tags=["export"])


@router.get("/export.zip", response_class=FileResponse)
def export(user: Admin, runtime: RuntimeDep, session: SessionDep):
    """All feedback as a dataset (ZIP; the layout is in its README.txt and in ``export.py``)."""
    with tempfile.NamedTemporaryFile(suffix=".zip", delete=False) as target:
        export_zip(session, runtime.store, target)
    return FileResponse(
        target.name,
        media_type="application/zip",
        filename="feedbackcam-feedback.zip",
        background=BackgroundTask(os.unlink, target.name),
    )
