"""The app's tables (SQLAlchemy 2): users, feedback items, model versions, the current version.

One code path for SQLite (the default, a file in the data dir) and PostgreSQL: only the engine
options differ. Files (images, masks, checkpoints) live on disk; rows hold their paths relative to
the data dir, and a row is written only after its files exist.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text, create_engine, event, func, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from . import migrations

ROLES = ("viewer", "clinician", "admin")
ITEM_STATUSES = ("pending", "used", "withdrawn")
VERSION_STATUSES = ("candidate", "promoted", "rejected")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def iso(moment: datetime | None) -> str | None:
    """Timestamps are stored as naive UTC (SQLite keeps no zone); give them back as UTC."""
    return None if moment is None else moment.replace(tzinfo=timezone.utc).isoformat()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    expires: Mapped[datetime | None] = mapped_column()  # None: the token never expires
    revoked: Mapped[datetime | None] = mapped_column()  # set: the token no longer signs in


class Version(Base):
    """A model version: the served checkpoint, or a fine-tuned candidate and the gate's verdict."""

    __tablename__ = "versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str | None] = mapped_column(Text)  # None: a candidate never saved (rejected)
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))
    created: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Item(Base):
    """One feedback submission: what was shown, and what the clinician said about it."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_path: Mapped[str] = mapped_column(Text)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created: Mapped[datetime] = mapped_column(default=utcnow)
    label: Mapped[str] = mapped_column(String(64))  # the class the clinician says is right
    predicted: Mapped[str] = mapped_column(String(64))  # the class the shown model gave
    agree: Mapped[bool] = mapped_column(default=False)
    mask_path: Mapped[str | None] = mapped_column(Text)
    shown_version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    update_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))  # the update it fed
    ignore_mask_path: Mapped[str | None] = mapped_column(Text)  # the region that must not matter
    # a proposal the clinician accepted (POST /api/proposals/accept): the item it was found from
    propagated_from: Mapped[int | None] = mapped_column(ForeignKey("feedback.id"))
    # the client's Idempotency-Key, or a digest of the content: one row per key and user
    idempotency_key: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_feedback_user_key", "user_id", "idempotency_key", unique=True),)


class Current(Base):
    """A single row: the version being served."""

    __tablename__ = "current_version"

    id: Mapped[int] = mapped_column(primary_key=True, default=1)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    changed: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Original(Base):
    """The upload as received, for a stored model-input image (``image_id``): the page shows it,
    and masks drawn on it are mapped to the model's input (see ``originals.py``)."""

    __tablename__ = "originals"

    image_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)  # originals/<sha256 of the bytes>.<png|jpg>
    width: Mapped[int] = mapped_column()
    height: Mapped[int] = mapped_column()


class Worklist(Base):
    """A set of images to review in order (imported from a folder or from uploads)."""

    __tablename__ = "worklists"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created: Mapped[datetime] = mapped_column(default=utcnow)


ENTRY_STATES = ("new", "reviewed", "feedback", "skipped")


class WorklistEntry(Base):
    """One image of a worklist and how far its review got."""

    __tablename__ = "worklist_entries"

    id: Mapped[int] = mapped_column(primary_key=True)
    worklist_id: Mapped[int] = mapped_column(ForeignKey("worklists.id"), index=True)
    position: Mapped[int] = mapped_column()
    name: Mapped[str] = mapped_column(String(255))
    original_id: Mapped[str] = mapped_column(String(64))  # content id of the original's bytes
    image_id: Mapped[str | None] = mapped_column(String(64))  # set once predicted
    state: Mapped[str] = mapped_column(String(16), default="new")
    feedback_id: Mapped[int | None] = mapped_column(ForeignKey("feedback.id"))
    updated: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Lease(Base):
    """A named lease: which app process may run updates, and until when (see ``lease.py``)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(128))
    expires: Mapped[datetime | None]


def connect(
    url: str, pool_size: int | None = None, pool_timeout: float | None = None
) -> tuple[Engine, sessionmaker[Session]]:
    """Open the database at ``url``, creating it or upgrading its schema as needed.

    ``pool_size`` connections are kept (SQLAlchemy's default 5 plus 10 overflow when None);
    a caller that finds none free waits ``pool_timeout`` seconds (default 30) and then gets
    ``sqlalchemy.exc.TimeoutError``, which the app answers 503.
    """
    options: dict[str, Any] = {}
    if pool_size is not None:
        options.update(pool_size=pool_size, max_overflow=0)
    if pool_timeout is not None:
        options["pool_timeout"] = pool_timeout
    if url.startswith("sqlite"):
        database = url.split("///", 1)[1] if "///" in url else ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        # request threads and the worker thread share the engine; SQLite serialises writers
        options["connect_args"] = {"check_same_thread": False, "timeout": 30}
    try:
        engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"), **options)
    except ModuleNotFoundError as err:
        raise ValueError(
            f"database {_shown(url)}: its driver is not installed ({err.name}); for PostgreSQL "
            "install 'psycopg[binary]' and use a postgresql+psycopg:// URL"
        ) from err
    except ArgumentError as err:
        raise ValueError(f"database {_shown(url)}: not a usable SQLAlchemy URL ({err})") from err
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the worker
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    try:
        migrations.upgrade(engine)
    except DatabaseError as err:  # cannot connect, or a file that is not a database
        engine.dispose()
        reason = str(err.orig).strip().splitlines()[0] if err.orig else str(err)
        raise ValueError(f"database {_shown(url)}: cannot open it ({reason})") from err
    return engine, sessionmaker(engine, expire_on_commit=False)


def store_exists(settings) -> bool:
    """Whether the store of ``settings`` exists: its SQLite file, or (for a ``--db`` URL) its
    data dir. Commands that read a store check this first, so a mistyped ``--data-dir`` is an
    error rather than a new, empty store."""
    if settings.db_url:
        return settings.data_dir.is_dir()
    return (settings.data_dir / "feedbackcam.db").is_file()


def _shown(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return repr(url)


def current_version(session: Session) -> Version | None:
    row = session.get(Current, 1)
    return None if row is None else session.get(Version, row.version_id)


def set_current(session: Session, version: Version) -> None:
    row = session.get(Current, 1)
    if row is None:
        session.add(Current(id=1, version_id=version.id))
    else:
        row.version_id = version.id


def count_pending(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Item).where(Item.status == "pending"))
