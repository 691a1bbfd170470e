"""FastAPI dependencies: the app's runtime, a database session per request, the signed-in user."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from .auth import allowed, find_user
from .db import User
from .runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    with runtime.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
_bearer = HTTPBearer(auto_error=False, description="a token from `feedbackcam users add`")


def current_user(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise HTTPException(401, "sign in: send 'Authorization: Bearer TOKEN'", headers=challenge)
    user = find_user(session, credentials.credentials)
    # end the read: the connection goes back to the pool while the request waits for a decode
    # slot or the model (a burst held every connection for that wait before)
    session.commit()
    if user is None:
        raise HTTPException(401, "unknown, expired or revoked token", headers=challenge)
    return user


def require(role: str):
    def check(user: Annotated[User, Depends(current_user)]) -> User:
        if not allowed(user.role, role):
            raise HTTPException(403, f"a {user.role} may not do this; it needs the {role} role")
        return user

    check.required_role = role  # read by the front door (guard.py) before a body is read
    return check


Viewer = Annotated[User, Depends(require("viewer"))]
Clinician = Annotated[User, Depends(require("clinician"))]
Admin = Annotated[User, Depends(require("admin"))]
