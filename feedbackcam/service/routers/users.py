"""Who is signed in, and (admin) the users."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sqlalchemy import select

from ..auth import add_user, revoke
from ..db import User, iso
from ..deps import Admin, SessionDep, Viewer
from ..schemas import CreatedUser, Me, NewUser

router = APIRouter(tags=["users"])


@router.get("/me", response_model=Me)
def me(user: Viewer) -> Me:
    """The signed-in user's name, role and token expiry (any role)."""
    return Me(name=user.name, role=user.role, expires=iso(user.expires))


@router.get("/users", response_model=list[Me])
def list_users(user: Admin, session: SessionDep) -> list[Me]:
    """Every user with their role, oldest first (admins only)."""
    return [Me(name=u.name, role=u.role) for u in session.scalars(select(User).order_by(User.id))]


@router.post("/users", response_model=CreatedUser, status_code=201)
def create_user(body: NewUser, user: Admin, session: SessionDep) -> CreatedUser:
    """Create a user; the answer holds their token, the only time it is shown."""
    try:
        token = add_user(session, body.name, body.role, body.days)
    except ValueError as err:
        raise HTTPException(409 if "exists" in str(err) else 422, str(err)) from err
    return CreatedUser(name=body.name, role=body.role, token=token)


@router.post("/users/{name}/revoke", status_code=204)
def revoke_token(name: str, user: Admin, session: SessionDep) -> None:
    """Revoke a user's token at once (``feedbackcam users revoke NAME`` does the same).

    An admin cannot revoke their own token here (409): the last admin would lock everyone out
    of the page, with no way back but the command line. Another admin, or the command, can."""
    if name == user.name:
        raise HTTPException(
            409,
            "you cannot revoke your own token here; another admin or 'feedbackcam users "
            "revoke' can",
        )
    try:
        revoke(session, name)
    except ValueError as err:
        raise HTTPException(404, str(err)) from err
