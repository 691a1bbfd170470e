"""A lease in the database: of several app processes on one database, only the holder runs an
update, so the same feedback is never trained on twice at once.

The lease is a row (``leases``) taken with one conditional UPDATE, atomic in SQLite and
PostgreSQL alike: it succeeds only if the row is free, expired, or already ours. A holder that
dies without releasing it loses it when it expires, or at once to a process of the same machine
that sees its process is gone (kill -9); a long update renews it as it goes.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import timedelta

from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .db import Lease, utcnow

UPDATER = "updater"


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _dead(holder: str) -> bool:
    """Whether ``holder`` names a process of this machine that no longer runs."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


class DbLease:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        name: str = UPDATER,
        *,
        holder: str | None = None,
        seconds: float = 600.0,
    ) -> None:
        if not seconds > 0:
            raise ValueError(f"seconds: expected > 0, got {seconds!r}")
        self.sessions, self.name, self.seconds = sessions, name, seconds
        self.holder = holder or holder_name()

    def acquire(self) -> bool:
        """Take (or renew) the lease; False if another live holder has it."""
        self._ensure_row()
        now = utcnow()
        with self.sessions() as session:
            row = session.get(Lease, self.name)
            dead = row.holder if row.holder and _dead(row.holder) else None
        free = or_(Lease.holder.is_(None), Lease.expires < now, Lease.holder == self.holder)
        if dead is not None:  # killed on this machine: its lease need not run out first
            free = or_(free, Lease.holder == dead)
        with self.sessions.begin() as session:
            taken = session.execute(
                update(Lease)
                .where(Lease.name == self.name, free)
                .values(holder=self.holder, expires=now + timedelta(seconds=self.seconds))
            )
            return taken.rowcount == 1

    def release(self) -> None:
        with self.sessions.begin() as session:
            session.execute(
                update(Lease)
                .where(Lease.name == self.name, Lease.holder == self.holder)
                .values(holder=None, expires=None)
            )

    def held_by_other(self) -> bool:
        """Whether another holder has the lease now (not expired)."""
        with self.sessions() as session:
            row = session.get(Lease, self.name)
            return (
                row is not None
                and row.holder not in (None, self.holder)
                and row.expires is not None
                and row.expires >= utcnow()
                and not _dead(row.holder)
            )

    def _ensure_row(self) -> None:
        with self.sessions() as session:
            if session.get(Lease, self.name) is not None:
                return
            session.add(Lease(name=self.name))
            try:
                session.commit()
            except IntegrityError:  # another process made it first
                session.rollback()
