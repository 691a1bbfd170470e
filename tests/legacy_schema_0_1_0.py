"""The service's tables exactly as release 0.1.0 made them (``create_all``, before migrations):
a frozen copy of ``feedbackcam/service/db.py`` at that release, for the upgrade test. Never edit."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, ForeignKey, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ROLES = ("viewer", "clinician", "admin")
ITEM_STATUSES = ("pending", "used")
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


class Current(Base):
    """A single row: the version being served."""

    __tablename__ = "current_version"

    id: Mapped[int] = mapped_column(primary_key=True, default=1)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    changed: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
