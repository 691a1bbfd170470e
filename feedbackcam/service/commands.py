"""``feedbackcam serve``, ``users`` and ``doctor``: what the command line runs.

User errors (a bad checkpoint, a port out of range, a database without its driver) raise
``ValueError`` with one line; the CLI prints it without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


def preflight(settings: Settings) -> None:
    """Everything that can stop a start, done before the server binds its port: the current
    version's file is verified and a new ``--model`` is checked before it is registered."""
    from .db import connect
    from .registry import Registry
    from .store import Store

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = settings.model
    if checkpoint is None:
        from .demo import ensure_demo

        checkpoint = ensure_demo(settings.data_dir)
    engine, sessions = connect(settings.database_url)
    try:
        Registry(sessions, Store(settings.data_dir), device=settings.device).open(checkpoint)
    finally:
        engine.dispose()


def serve(args) -> int:
    import uvicorn

    from .app import create_app

    settings = Settings(
        data_dir=args.data_dir,
        model=args.model,
        db_url=args.db,
        update_every=args.update_every,
        steps=args.steps,
        replay_per_class=args.replay_per_class,
        lr=args.lr,
        lam=args.lam,
        tolerance=args.tolerance,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        device=args.device,
        low_confidence=args.low_confidence,
        unfamiliar_quantile=args.unfamiliar_quantile,
    )
    preflight(settings)
    print(f"feedbackcam serve: http://{args.host}:{args.port}/  (API docs: /docs)", flush=True)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


@contextmanager
def _store_session(args) -> Iterator[tuple[Settings, Session]]:
    """The settings of ``--data-dir``/``--db`` and a session on that store, closed after."""
    from .db import connect

    settings = Settings(data_dir=args.data_dir, db_url=args.db)
    engine, sessions = connect(settings.database_url)
    try:
        with sessions() as session:
            yield settings, session
    finally:
        engine.dispose()


def users(args) -> int:
    from sqlalchemy import select

    from .auth import add_user, revoke
    from .db import User, iso

    with _store_session(args) as (settings, session):
        if args.users_command == "add":
            token = add_user(session, args.name, args.role, args.days)
            expiry = f", expires in {args.days:g} days" if args.days else ""
            print(f"user {args.name!r} ({args.role}{expiry}); token, shown only this once:")
            print(token)
        elif args.users_command == "revoke":
            revoke(session, args.name)
            print(f"user {args.name!r}: token revoked")
        else:
            for user in session.scalars(select(User).order_by(User.id)):
                state = "revoked" if user.revoked else iso(user.expires) or "no expiry"
                print(f"{user.name}\t{user.role}\t{state}")
    return 0


def worklist(args) -> int:
    from sqlalchemy import select

    from . import worklist as lists
    from .db import Worklist
    from .store import Store

    with _store_session(args) as (settings, session):
        if args.worklist_command == "add":
            files = lists.read_folder(args.folder, settings.max_upload_bytes)
            made, skipped = lists.create(
                session,
                Store(settings.data_dir),
                args.name or args.folder.name,
                files,
                max_bytes=settings.max_upload_bytes,
                max_pixels=settings.max_pixels,
            )
            for reason in skipped:
                print(f"skipped: {reason}")
            n = len(lists.entries(session, made.id))
            print(f"worklist {made.id} {made.name!r}: {n} image(s)")
        else:
            for w in session.scalars(select(Worklist).order_by(Worklist.id)):
                counts = lists.counts(lists.entries(session, w.id))
                print(f"{w.id}\t{w.name}\t" + " ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


def export(args) -> int:
    from .export import export_folder
    from .store import Store

    with _store_session(args) as (settings, session):
        n = export_folder(session, Store(settings.data_dir), args.out)
    print(f"{n} feedback item(s) -> {args.out} (images/, masks/, ignore/, labels.csv)")
    return 0
