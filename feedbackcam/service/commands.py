"""``feedbackcam serve``, ``users``, ``worklist``, ``export`` and ``doctor``: their flags and what
they run (``feedbackcam.cli`` adds :data:`SERVICE_COMMANDS` to its parser).

User errors (a bad checkpoint, a port out of range, a database without its driver) raise
``ValueError`` with one line; the CLI prints it without a traceback.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..options import add_feedback_args, command, feedback_config
from .settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


def preflight(settings: Settings) -> None:
    """Everything that can stop a start, done before the server binds its port: the current
    version's file is verified and a new ``--model`` is checked before it is registered."""
    check_device(settings.device)
    if settings.model is not None and not settings.model.is_file():
        raise ValueError(f"--model {settings.model}: no such checkpoint file")
    created = not settings.data_dir.exists()
    try:
        _open_store(settings)
    except BaseException:
        if created:  # a refused start leaves no empty store behind
            import shutil

            shutil.rmtree(settings.data_dir, ignore_errors=True)
        raise


def _open_store(settings: Settings) -> None:
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


def check_device(name: str) -> None:
    """Refuse a device torch cannot parse, or a CUDA device this machine does not have, in one
    line before anything is loaded."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r}: not a device (expected cpu, cuda or cuda:N)") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name!r}: this machine has no usable CUDA device")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name!r}: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N")


def serve(args) -> int:
    """The interactive feedback app: predict, explain, correct, learn (web page + API).

    Serve a checkpoint with a web page and a JSON API (docs at /docs). Without --model, serves
    the demo's model, training it first if absent. Updates learn as the feedback flags say
    (Settings.feedback)."""
    import uvicorn

    from .app import create_app

    settings = Settings(
        data_dir=args.data_dir,
        model=args.model,
        db_url=args.db,
        update_every=args.update_every,
        grace_seconds=args.grace_seconds,
        steps=args.steps,
        replay_per_class=args.replay_per_class,
        lr=args.lr,
        feedback=feedback_config(args),
        tolerance=args.tolerance,
        gate_per_class=args.gate_per_class,
        propose_with=args.propose_with,
        gate_images=args.gate_images,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_concurrent=args.max_concurrent,
        rate_limit_per_minute=args.rate_limit,
        device=args.device,
        low_confidence=args.low_confidence,
        unfamiliar_quantile=args.unfamiliar_quantile,
    )
    preflight(settings)
    print(f"feedbackcam serve: http://{args.host}:{args.port}/  (API docs: /docs)", flush=True)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


@contextmanager
def _store_session(args, create: bool = False) -> Iterator[tuple[Settings, Session]]:
    """The settings of ``--data-dir``/``--db`` and a session on that store, closed after.

    The store must exist (a mistyped ``--data-dir`` is an error, not a new empty store) unless
    ``create``; a store created here is announced on stderr."""
    import sys

    from .db import connect, store_exists

    settings = Settings(data_dir=args.data_dir, db_url=args.db)
    if not store_exists(settings):
        if not create:
            raise ValueError(
                f"--data-dir {settings.data_dir}: no feedbackcam store there (no "
                "feedbackcam.db); is the path right? ('feedbackcam serve --data-dir DIR' "
                "creates a store)"
            )
        print(
            f"feedbackcam: no store in {settings.data_dir} yet; created one (serve it with "
            f"--data-dir {settings.data_dir})",
            file=sys.stderr,
        )
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

    with _store_session(args, create=args.users_command == "add") as (settings, session):
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
            rank = None
            if args.order == "suspicious":
                model, size = _ranking_model(args, session, settings)
                print("suspicion  image  (signs)")
                rank = lists.suspicious_order(
                    model, size, max_pixels=settings.max_pixels, masks=args.masks
                )
            made, skipped = lists.create(
                session,
                Store(settings.data_dir),
                args.name or args.folder.name,
                files,
                max_bytes=settings.max_upload_bytes,
                max_pixels=settings.max_pixels,
                rank=rank,
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


def _ranking_model(args, session, settings):
    """The model that orders a suspicious-first worklist: ``--model``, else the store's current
    version (checked against its recorded SHA-256). Returns (model, input size)."""
    from ..checkpoint import load_checkpoint
    from .db import current_version
    from .startup import verify_file
    from .store import Store

    if args.masks is not None and not args.masks.is_dir():
        raise FileNotFoundError(f"{args.masks}: not a folder (--masks: lesion masks <name>.png)")
    path = args.model
    if path is None:
        version = current_version(session)
        if version is None:
            raise ValueError(
                "--order suspicious needs a model: give --model CKPT, or serve one first"
            )
        path = verify_file(Store(settings.data_dir), version)
    model, spec, _ = load_checkpoint(path)
    return model.eval(), spec.input_size


def export(args) -> int:
    """The feedback app's feedback as a dataset (images/, masks/, ignore/, labels.csv)."""
    from .export import export_folder
    from .store import Store

    with _store_session(args) as (settings, session):
        n = export_folder(session, Store(settings.data_dir), args.out)
    print(f"{n} feedback item(s) -> {args.out} (images/, masks/, ignore/, labels.csv)")
    return 0


# ----------------------------------------------------------------------------- parsers


def _port(text: str) -> int:
    port = int(text) if text.isdigit() else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return port


def finite(minimum: float | None = None, above: bool = False):
    """An argparse type: a finite float (NaN and infinities refused), optionally bounded below."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and (value <= minimum if above else value < minimum):
            raise argparse.ArgumentTypeError(
                f"expected a number {'>' if above else '>='} {minimum:g}, got {text!r}"
            )
        return value

    return parse


def add_store_args(p) -> None:
    """The app's store: ``--data-dir`` and ``--db``, defaults from ``Settings`` (one place)."""
    d = Settings()
    p.add_argument("--db", default=d.db_url, help="SQLAlchemy URL (default: SQLite in --data-dir)")
    p.add_argument("--data-dir", type=Path, default=d.data_dir)


def add_serve(sub) -> None:
    p = command(sub, "serve", serve)
    d = Settings()
    p.add_argument("--model", type=Path, default=None, help="a checkpoint (default: the demo's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    add_store_args(p)
    p.add_argument("--update-every", type=int, default=d.update_every, help="fine-tune after N")
    p.add_argument(
        "--grace-seconds",
        type=finite(0),
        default=d.grace_seconds,
        help="an update learns from an item only this long after it was given (until then its "
        "author can withdraw it); an admin's 'update now' does not wait",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per update")
    p.add_argument("--replay-per-class", type=int, default=d.replay_per_class)
    p.add_argument("--lr", type=finite(0, above=True), default=d.lr)
    add_feedback_args(p)  # how an update learns: lambda, losses, CAM (Settings.feedback)
    p.add_argument(
        "--tolerance",
        type=finite(),
        default=d.tolerance,
        help="largest drop in validation accuracy or average sensitivity a promotion may cost",
    )
    p.add_argument(
        "--gate-per-class",
        action=argparse.BooleanOptionalAction,
        default=d.gate_per_class,
        help="also refuse an update that loses one class (its validation Youden's J, "
        "sensitivity + specificity - 1) while accuracy and average sensitivity hold (the default)",
    )
    p.add_argument(
        "--propose-with",
        choices=("served", "offline"),
        default=d.propose_with,
        help="score 'N more images look like this' with the offline ImageNet "
        "EfficientNet-Lite0 at 256 px and query expansion (the default: the setting measured on "
        "ISIC's real patches, docs/propagation.md; the stored images' activations are computed "
        "in the background at start), or with the served model's explanation layer",
    )
    p.add_argument(
        "--gate-images",
        type=int,
        default=d.gate_images,
        help="score each version on a class-stratified N of the validation images (default: "
        "all); the verdict says how many",
    )
    p.add_argument(
        "--max-upload-mb", type=finite(0, above=True), default=d.max_upload_bytes / 2**20
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=d.max_concurrent,
        help="API requests in progress at once; one more waits up to 3 s, then gets 503",
    )
    p.add_argument(
        "--rate-limit",
        type=int,
        default=d.rate_limit_per_minute,
        help="API requests a minute per signed-in user (per address without a valid token); "
        "0: no limit",
    )
    p.add_argument("--device", default=d.device, help="where the model predicts and learns")
    p.add_argument(
        "--low-confidence",
        type=finite(0),
        default=d.low_confidence,
        help="warn below this top probability",
    )
    p.add_argument(
        "--unfamiliar-quantile",
        type=finite(0),
        default=d.unfamiliar_quantile,
        help="warn when an image's energy is above this quantile of the validation set's",
    )


def add_users(sub) -> None:
    p = sub.add_parser("users", help="users of the feedback app (token sign-in)")
    usub = p.add_subparsers(dest="users_command", required=True)
    add = usub.add_parser("add", help="create a user and print their token once")
    add.add_argument("name")
    add.add_argument("--role", choices=("viewer", "clinician", "admin"), required=True)
    add.add_argument(
        "--days", type=finite(0, above=True), default=None, help="the token expires after N days"
    )
    listing = usub.add_parser("list", help="list users, roles and token expiry")
    revoke = usub.add_parser("revoke", help="revoke a user's token: it signs in no more")
    revoke.add_argument("name")
    for q in (add, listing, revoke):
        add_store_args(q)

    p.set_defaults(func=users)


def add_worklist(sub) -> None:
    p = sub.add_parser("worklist", help="worklists of the feedback app: images to review")
    wsub = p.add_subparsers(dest="worklist_command", required=True)
    add = wsub.add_parser("add", help="import a folder's PNG and JPEG images as a worklist")
    add.add_argument("folder", type=Path)
    add.add_argument("--name", default=None, help="none: the folder's name")
    add.add_argument(
        "--order",
        choices=("name", "suspicious"),
        default="name",
        help="suspicious: most suspicious first (explanation outside the lesion, prediction "
        "changed by other surroundings, model unsure; docs/discovery.md)",
    )
    add.add_argument(
        "--model",
        type=Path,
        default=None,
        help="--order suspicious: the checkpoint that judges; none: the served version",
    )
    add.add_argument(
        "--masks",
        type=Path,
        default=None,
        help="--order suspicious: a folder of lesion masks <image stem>.png (white on the "
        "lesion); without one an image is judged by the model's uncertainty alone",
    )
    listing = wsub.add_parser("list", help="list worklists and their counts")
    for q in (add, listing):
        add_store_args(q)

    p.set_defaults(func=worklist)


def add_export(sub) -> None:
    p = command(sub, "export", export)
    add_store_args(p)
    p.add_argument("--out", type=Path, required=True, help="a new or empty folder")


def add_doctor(sub) -> None:
    p = command(sub, "doctor", _doctor)
    add_store_args(p)
    p.add_argument("--repair", action="store_true", help="repair what can be repaired safely")


def _doctor(args) -> int:
    """Check the feedback app's data dir and database; --repair what can be repaired.

    Check the database, the current version's checkpoint and its SHA-256, every promoted
    version, the feedback files and unknown checkpoints. --repair makes the last good version
    current and tidies files; no feedback is changed."""
    from .doctor import doctor

    return doctor(args)


SERVICE_COMMANDS = (add_serve, add_users, add_worklist, add_export, add_doctor)
