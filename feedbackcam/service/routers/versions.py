"""Model versions (admin): list them with their metrics, make any promoted one current."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from sqlalchemy import select

from ..db import Version, current_version, iso
from ..deps import Admin, RuntimeDep, SessionDep
from ..limits import MAX_ID
from ..schemas import VersionInfo

router = APIRouter(tags=["versions"])


def version_info(version: Version, current_id: int | None) -> VersionInfo:
    return VersionInfo(
        id=version.id,
        parent=version.parent_id,
        created=iso(version.created),
        status=version.status,
        reason=version.reason,
        current=version.id == current_id,
        metrics=version.metrics,
    )


@router.get("/versions", response_model=list[VersionInfo])
def list_versions(user: Admin, session: SessionDep) -> list[VersionInfo]:
    """Every version, newest first: promoted, rejected (with the gate's reason), candidates."""
    current = current_version(session)
    versions = session.scalars(select(Version).order_by(Version.id.desc())).all()
    return [version_info(v, current.id if current else None) for v in versions]


@router.post("/versions/{version_id}/activate", response_model=VersionInfo)
def activate(
    version_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    user: Admin,
    runtime: RuntimeDep,
    session: SessionDep,
) -> VersionInfo:
    """Serve this promoted version from now on (a rollback, or forward again)."""
    version = runtime.registry.activate(version_id)
    return version_info(version, version.id)
