"""The API's front door, before any body is read: a request that carries a body needs a known
token, and every API request counts against a per-token rate limit.

FastAPI parses a multipart body before it runs the route's dependencies, so without this a
client with no token could make the server read (and spool) a 20 MB upload only to get 401.
The route's own dependencies still check the token and the role; this only refuses early.
"""

from __future__ import annotations

import math

import anyio
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from .auth import find_user, hash_token
from .errors import unavailable
from .limits import RateLimiter

_BODY_METHODS = {"POST", "PUT", "PATCH"}
SIGN_IN = "sign in: send 'Authorization: Bearer TOKEN'"


def bearer(value: bytes | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Guard:
    def __init__(self, app, limiter: RateLimiter) -> None:
        self.app, self.limiter = app, limiter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        token = bearer(headers.get(b"authorization"))
        client = scope.get("client") or ("unknown", 0)
        key = f"token:{hash_token(token)}" if token else f"addr:{client[0]}"
        wait = self.limiter.retry_after(key)
        if wait:
            return await self._answer(
                scope,
                send,
                429,
                f"too many requests: at most {self.limiter.per_minute} a minute",
                {"Retry-After": str(math.ceil(wait))},
            )
        declared = headers.get(b"content-length", b"0")
        has_body = scope["method"] in _BODY_METHODS and (
            declared != b"0" or b"transfer-encoding" in headers
        )
        if has_body:
            if token is None:
                return await self._refuse(scope, send, SIGN_IN)
            try:
                known = await anyio.to_thread.run_sync(self._known, scope, token)
            except SQLAlchemyError as err:
                scope["app"].state.runtime.engine.dispose()
                reason = str(getattr(err, "orig", None) or err).splitlines()[0][:200]
                return await unavailable(f"the database failed ({reason})")(scope, receive, send)
            if not known:
                return await self._refuse(scope, send, "unknown or revoked token")
        await self.app(scope, receive, send)

    @staticmethod
    def _known(scope, token: str) -> bool:
        with scope["app"].state.runtime.sessions() as session:
            return find_user(session, token) is not None

    async def _refuse(self, scope, send, detail: str) -> None:
        await self._answer(scope, send, 401, detail, {"WWW-Authenticate": "Bearer"})

    @staticmethod
    async def _answer(scope, send, status: int, detail: str, headers: dict) -> None:
        # no "Connection: close": uvicorn discards the unread body as it arrives (nothing is
        # buffered) and keeps the connection; closing it with data unread would reset it, and
        # the client could lose this answer
        response = JSONResponse({"detail": detail}, status, headers)
        await response(scope, None, send)
