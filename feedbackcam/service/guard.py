"""The API's front door, before any body is read: a request that carries a body needs a known
token whose role may use the route, and every API request counts against a rate limit: its
user's when the token is known, its client address's otherwise (a made-up token is not a fresh
allowance).

FastAPI parses a multipart body before it runs the route's dependencies, so without this a
client with no token, or a viewer, could make the server read (and spool) a 20 MB upload only
to get 401 or 403. The route's own dependencies still check the token and the role; this only
refuses early.
"""

from __future__ import annotations

import math
import time

import anyio
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.routing import compile_path

from .auth import allowed, find_user, hash_token
from .errors import busy, unavailable
from .limits import RateLimiter

KNOWN_FOR_S = 30.0  # how long a token seen valid keys its own rate-limit bucket unchecked

_BODY_METHODS = {"POST", "PUT", "PATCH"}
SIGN_IN = "sign in: send 'Authorization: Bearer TOKEN'"


def bearer(value: bytes | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Guard:
    def __init__(self, app, limiter: RateLimiter, roles: Roles | None = None) -> None:
        self.app, self.limiter, self.roles = app, limiter, roles or Roles()
        self._known: dict[str, float] = {}  # token hash -> until when it keys its own bucket

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        token = bearer(headers.get(b"authorization"))
        declared = headers.get(b"content-length", b"0")
        has_body = scope["method"] in _BODY_METHODS and (
            declared != b"0" or b"transfer-encoding" in headers
        )
        role = None
        limiting = self.limiter.per_minute > 0
        if token is not None and (has_body or (limiting and not self._recently_known(token))):
            try:
                role = await anyio.to_thread.run_sync(self._role, scope, token)
            except PoolTimeout:  # busy, not broken: the pool stays
                return await busy("every database connection is in use")(scope, receive, send)
            except SQLAlchemyError as err:
                scope["app"].state.runtime.engine.dispose()
                reason = str(getattr(err, "orig", None) or err).splitlines()[0][:200]
                return await unavailable(f"the database failed ({reason})")(scope, receive, send)
            if role is not None:
                self._remember(token)
        client = scope.get("client") or ("unknown", 0)
        known = token is not None and (role is not None or self._recently_known(token))
        key = f"token:{hash_token(token)}" if known else f"addr:{client[0]}"
        wait = self.limiter.retry_after(key)
        if wait:
            return await self._answer(
                scope,
                send,
                429,
                f"too many requests: at most {self.limiter.per_minute} a minute",
                {"Retry-After": str(math.ceil(wait))},
            )
        if has_body:
            if token is None:
                return await self._refuse(scope, send, SIGN_IN)
            if role is None:
                return await self._refuse(scope, send, "unknown, expired or revoked token")
            needed = self.roles.required(scope["method"], scope["path"])
            if needed is not None and not allowed(role, needed):
                detail = f"a {role} may not do this; it needs the {needed} role"
                return await self._answer(scope, send, 403, detail, {})
        await self.app(scope, receive, send)

    def _recently_known(self, token: str) -> bool:
        return self._known.get(hash_token(token), 0.0) > time.monotonic()

    def _remember(self, token: str) -> None:
        now = time.monotonic()
        if len(self._known) > 10_000:  # never grows without bound
            self._known = {k: t for k, t in self._known.items() if t > now}
        self._known[hash_token(token)] = now + KNOWN_FOR_S

    @staticmethod
    def _role(scope, token: str) -> str | None:
        with scope["app"].state.runtime.sessions() as session:
            user = find_user(session, token)
            return None if user is None else user.role

    async def _refuse(self, scope, send, detail: str) -> None:
        await self._answer(scope, send, 401, detail, {"WWW-Authenticate": "Bearer"})

    @staticmethod
    async def _answer(scope, send, status: int, detail: str, headers: dict) -> None:
        # no "Connection: close": uvicorn discards the unread body as it arrives (nothing is
        # buffered) and keeps the connection; closing it with data unread would reset it, and
        # the client could lose this answer
        response = JSONResponse({"detail": detail}, status, headers)
        await response(scope, None, send)


class Roles:
    """Which role each API route requires, read from its ``deps.require`` dependency when the
    routers are included (so the front door needs no copy of the table)."""

    def __init__(self) -> None:
        self.routes: list[tuple[set[str], object, str]] = []

    def add_router(self, router, prefix: str) -> None:
        for route in router.routes:
            role = _role_of(getattr(route, "dependant", None))
            if role is not None:
                regex, _, _ = compile_path(prefix + route.path)
                self.routes.append((set(route.methods or ()), regex, role))

    def required(self, method: str, path: str) -> str | None:
        for methods, regex, role in self.routes:
            if method in methods and regex.match(path):
                return role
        return None


def _role_of(dependant) -> str | None:
    if dependant is None:
        return None
    role = getattr(dependant.call, "required_role", None)
    if role is not None:
        return role
    for sub in dependant.dependencies:
        found = _role_of(sub)
        if found is not None:
            return found
    return None
