"""Users and bearer tokens: create a user, find the user a token belongs to, rank roles.

Tokens are 256-bit random strings shown once; only their SHA-256 is stored. A fast hash is
enough here (unlike for passwords) because a random token cannot be guessed from a dictionary.
A token may expire (``days``) and can be revoked (``feedbackcam users revoke NAME``); either way
it no longer signs in.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .db import ROLES, User, utcnow

RANK = {role: i for i, role in enumerate(ROLES)}
MAX_DAYS = 36_500  # a token's longest life (a hundred years); no expiry: leave days out
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_user(session: Session, name: str, role: str, days: float | None = None) -> str:
    """Create a user and return their token (the only time it exists in clear); it expires
    after ``days`` (None: never). Commits."""
    if days is not None and not 0 < days <= MAX_DAYS:
        raise ValueError(f"days: expected more than 0 and at most {MAX_DAYS}, got {days!r}")
    if role not in ROLES:
        raise ValueError(f"role: expected one of {ROLES}, got {role!r}")
    if not _NAME.match(name):
        raise ValueError(f"name: expected 1-64 letters, digits or _.@-, got {name!r}")
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise ValueError(f"user {name!r} exists already")
    token = secrets.token_urlsafe(32)
    expires = None if days is None else utcnow() + timedelta(days=days)
    session.add(User(name=name, role=role, token_hash=hash_token(token), expires=expires))
    session.commit()
    return token


def find_user(session: Session, token: str) -> User | None:
    """The user a token signs in, or None (unknown, expired or revoked)."""
    user = session.scalar(select(User).where(User.token_hash == hash_token(token)))
    if user is None or user.revoked is not None:
        return None
    if user.expires is not None and user.expires <= utcnow():
        return None
    return user


def revoke(session: Session, name: str) -> None:
    """Revoke a user's token: it signs in no more. Commits."""
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise ValueError(f"no user {name!r}")
    user.revoked = utcnow()
    session.commit()


def count_users(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(User))


def allowed(role: str, needed: str) -> bool:
    return RANK[role] >= RANK[needed]
