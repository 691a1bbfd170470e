"""The updater: its status (anyone signed in), and an update on demand (admin)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sqlalchemy import select

from ..db import Version, count_pending
from ..deps import Admin, RuntimeDep, SessionDep, Viewer
from ..schemas import UpdateStatus
from .versions import version_info

router = APIRouter(tags=["updates"])


def _status(runtime, session) -> UpdateStatus:
    worker = runtime.worker
    current = runtime.registry.served.version_id
    last = session.scalar(
        select(Version)
        .where(Version.parent_id.is_not(None), Version.status != "candidate")
        .order_by(Version.id.desc())
        .limit(1)
    )
    progress = worker.progress
    pending = count_pending(session)
    phase = progress["phase"] if progress else ("queued" if pending else "idle")
    return UpdateStatus(
        enabled=worker.enabled and runtime.settings.worker,
        message=worker.message,
        current_version=current,
        pending=pending,
        update_every=runtime.settings.update_every,
        running=worker.candidate_id is not None,
        candidate=worker.candidate_id,
        phase=phase,
        step=progress["step"] if progress else None,
        steps=progress["steps"] if progress else None,
        training_items=progress["items"] if progress else None,
        last_update=version_info(last, current, session) if last else None,
        last_error=worker.last_error,
        learning=learning(runtime.settings.feedback),
    )


def learning(feedback) -> dict:
    """What the page shows of how updates learn (``Settings.feedback``)."""
    keys = ("lam", "explanation_loss", "surroundings_loss", "ignore_loss", "cam")
    return {k: getattr(feedback, k) for k in keys}


@router.get("/update/status", response_model=UpdateStatus)
def status(user: Viewer, runtime: RuntimeDep, session: SessionDep) -> UpdateStatus:
    """Current version, pending feedback, and the last update's verdict."""
    return _status(runtime, session)


@router.post("/update", response_model=UpdateStatus, status_code=202)
def update_now(user: Admin, runtime: RuntimeDep, session: SessionDep) -> UpdateStatus:
    """Start an update with whatever feedback is pending, fewer than N items included."""
    if not (runtime.worker.enabled and runtime.settings.worker):
        raise HTTPException(409, runtime.worker.message)
    if count_pending(session) == 0:
        raise HTTPException(409, "no pending feedback to learn from")
    runtime.worker.notify(force=True)
    return _status(runtime, session)
