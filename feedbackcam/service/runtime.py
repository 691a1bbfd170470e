"""Everything one running app holds: database, files, the served model, validation set, gallery
and the updater. Opened in the app's lifespan, closed when it ends."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from ..data.dataset import ArrayDataset
from . import limits
from .auth import add_user, count_users
from .datasets import load_labelled
from .db import connect
from .gallery import GalleryImage, load_gallery
from .lease import DbLease
from .ood import Familiarity
from .registry import Registry
from .settings import Settings
from .store import Store
from .worker import Worker, mark_interrupted

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: Store
    registry: Registry
    validation: ArrayDataset | None
    gallery: list[GalleryImage]
    worker: Worker
    familiarity: Familiarity | None = None

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        data_dir = settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = settings.model
        if checkpoint is None:
            from .demo import ensure_demo

            checkpoint = ensure_demo(data_dir)
        limits.configure(settings.max_concurrent_decodes)
        store = Store(data_dir)
        engine, sessions = connect(
            settings.database_url,
            pool_size=settings.max_concurrent + 4,
            pool_timeout=limits.QUEUE_WAIT_S,
        )
        try:
            # a candidate is unfinished only if no other live process is updating it
            interrupted = 0 if DbLease(sessions).held_by_other() else mark_interrupted(sessions)
            if interrupted:
                log.warning("%d update(s) were interrupted; their feedback is pending", interrupted)
            registry = Registry(sessions, store, device=settings.device)
            spec = registry.open(checkpoint).spec
            if settings.bootstrap_admin:  # only once the model is known to serve
                _bootstrap_admin(sessions, data_dir)
            validation = load_labelled(data_dir, "validation", spec.classes, spec.input_size)
            replay = load_labelled(data_dir, "replay", spec.classes, spec.input_size)
            gallery = load_gallery(
                data_dir / "gallery",
                store,
                spec.input_size,
                max_pixels=settings.max_pixels,
                sessions=sessions,
            )
        except BaseException:
            engine.dispose()
            raise
        worker = Worker(settings, sessions, store, registry, validation, replay)
        runtime = cls(settings, engine, sessions, store, registry, validation, gallery, worker)
        runtime.familiarity = Familiarity(validation, settings.unfamiliar_quantile)
        worker.prepare = runtime.familiarity.reference
        worker.reference_rows = runtime.familiarity.rows
        if not worker.enabled:
            log.warning(worker.message)
        if settings.worker:
            worker.start()
        return runtime

    def close(self) -> None:
        self.worker.stop()
        self.engine.dispose()


def _bootstrap_admin(sessions: sessionmaker[Session], data_dir: Path) -> None:
    """First start, no users: create ``admin`` and show its token once (only its hash is kept).

    The token goes to the terminal, never through ``logging``; when stdout is not a terminal
    (a service manager that keeps stdout as its log) it goes to a file only its owner can read.
    """
    with sessions() as session:
        if count_users(session):
            return
        token = add_user(session, "admin", "admin")
    if sys.stdout.isatty():
        where = f"  Its token, shown only this once: {token}"
    else:
        path = data_dir / "admin-token.txt"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        where = f"  Its token is in {path} (readable by its owner only); delete the file after use"
    print(
        "feedbackcam serve: no users yet, so user 'admin' (role admin) was created.\n"
        f"{where}\n"
        "  Sign in on the page with it; add users with: "
        "feedbackcam users add NAME --role clinician",
        flush=True,
    )
