"""``feedbackcam serve``, ``users`` and ``doctor``: what the command line runs.

User errors (a bad checkpoint, a port out of range, a database without its driver) raise
``ValueError`` with one line; the CLI prints it without a traceback.
"""

from __future__ import annotations

from .settings import Settings


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
    )
    preflight(settings)
    print(f"feedbackcam serve: http://{args.host}:{args.port}/  (API docs: /docs)", flush=True)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


def users(args) -> int:
    from sqlalchemy import select

    from .auth import add_user
    from .db import User, connect

    engine, sessions = connect(Settings(data_dir=args.data_dir, db_url=args.db).database_url)
    try:
        with sessions() as session:
            if args.users_command == "add":
                token = add_user(session, args.name, args.role)
                print(f"user {args.name!r} ({args.role}); token, shown only this once:")
                print(token)
            else:
                for user in session.scalars(select(User).order_by(User.id)):
                    print(f"{user.name}\t{user.role}")
    finally:
        engine.dispose()
    return 0
