"""Model versions (admin): list them with their metrics, make any promoted one current."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query
from sqlalchemy import select

from ..db import Version, current_version, iso
from ..deps import Admin, Clinician, RuntimeDep, SessionDep
from ..limits import MAX_ID
from ..schemas import VersionInfo

router = APIRouter(tags=["versions"])


WATCHED = (("jaccard_mean", "validation Jaccard"), ("avg_sensitivity", "average sensitivity"))


def compare(version: Version, parent: Version | None) -> tuple[dict, list[str]]:
    """The parent's scores, and the watched scores this promoted version lowered."""
    if parent is None or parent.metrics.get("validation") != version.metrics.get("validation"):
        return {}, []
    keys = ("accuracy", "avg_sensitivity", "jaccard_mean")
    before = {k: parent.metrics.get(k) for k in keys}
    lowered = []
    for key, name in WATCHED:
        b, a = before.get(key), version.metrics.get(key)
        if version.status == "promoted" and b is not None and a is not None and a < b - 1e-9:
            lowered.append(f"{name} fell {b:.3f} -> {a:.3f}")
    return before, lowered


def version_info(version: Version, current_id: int | None, session=None) -> VersionInfo:
    parent = session.get(Version, version.parent_id) if session and version.parent_id else None
    before, lowered = compare(version, parent)
    return VersionInfo(
        id=version.id,
        parent=version.parent_id,
        created=iso(version.created),
        status=version.status,
        reason=version.reason,
        current=version.id == current_id,
        metrics=version.metrics,
        parent_metrics=before,
        regressions=lowered,
    )


@router.get("/versions", response_model=list[VersionInfo])
def list_versions(user: Admin, session: SessionDep) -> list[VersionInfo]:
    """Every version, newest first: promoted, rejected (with the gate's reason), candidates."""
    current = current_version(session)
    versions = session.scalars(select(Version).order_by(Version.id.desc())).all()
    return [version_info(v, current.id if current else None, session) for v in versions]


@router.get("/versions/{version_id}", response_model=VersionInfo)
def get_version(
    version_id: Annotated[int, Path(ge=1, le=MAX_ID)], user: Clinician, session: SessionDep
) -> VersionInfo:
    """One version with its parent's scores (what an update did: the page's outcome)."""
    version = session.get(Version, version_id)
    if version is None:
        raise HTTPException(404, f"no version {version_id}")
    current = current_version(session)
    return version_info(version, current.id if current else None, session)


@router.post("/versions/{version_id}/activate", response_model=VersionInfo)
def activate(
    version_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    user: Admin,
    runtime: RuntimeDep,
    session: SessionDep,
    confirm: Annotated[bool, Query(description="must be true: every user gets this model")] = False,
) -> VersionInfo:
    """Serve this promoted version from now on (a rollback, or forward again).

    Needs ``confirm=true``: it changes the answers every user sees, at once."""
    if session.get(Version, version_id) is None:
        raise HTTPException(404, f"no version {version_id}")
    if not confirm:
        raise HTTPException(
            422, "confirm: making a version current changes every user's answers; send confirm=true"
        )
    version = runtime.registry.activate(version_id)
    return version_info(version, version.id, session)
