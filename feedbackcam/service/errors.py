"""Every failure answers with JSON and a status that says whose it is: 4xx for the request,
503 for storage the app cannot use right now (read-only or full disk, a lost database
connection, every connection busy), and a plain 500 only for a bug. None of them closes the
client's connection.

After a database error the connection pool is thrown away, so the next request opens fresh
connections and the app recovers when the fault clears, without a restart.
"""

from __future__ import annotations

import errno
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

log = logging.getLogger(__name__)

RETRY_AFTER = "5"
_STORAGE_ERRNOS = {
    errno.EROFS: "the data dir is read-only",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "the data dir is not writable",
    errno.EPERM: "the data dir is not writable",
    errno.ENOTDIR: "a folder of the data dir is missing or replaced by a file",
    errno.ENOENT: "a folder of the data dir is missing",
    errno.EIO: "the disk reports an I/O error",
}


def retry_later(detail: str) -> JSONResponse:
    """503 with Retry-After: the request was fine, the server cannot serve it right now."""
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": RETRY_AFTER})


def unavailable(message: str) -> JSONResponse:
    return retry_later(f"storage unavailable: {message}; try again later")


def _reset_pool(request: Request) -> None:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is not None:
        runtime.engine.dispose()


async def database_error(request: Request, err: SQLAlchemyError) -> JSONResponse:
    _reset_pool(request)
    reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0][:200]
    log.warning("database error on %s %s: %s", request.method, request.url.path, reason)
    return unavailable(f"the database failed ({reason})")


async def invalid_value(request: Request, err: DataError) -> JSONResponse:
    """A value the database cannot hold (PostgreSQL refuses a NUL byte in text) is the request's
    fault: 422, and the connection pool stays (it is healthy)."""
    reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0][:200]
    log.info("refused a value on %s %s: %s", request.method, request.url.path, reason)
    return JSONResponse({"detail": f"a value the database cannot take: {reason}"}, status_code=422)


async def pool_exhausted(request: Request, _err: PoolTimeout) -> JSONResponse:
    """Every database connection stayed in use for the pool's whole wait: busy, not broken."""
    log.warning("no database connection free for %s %s", request.method, request.url.path)
    return busy("every database connection is in use")


def busy(what: str) -> JSONResponse:
    return retry_later(f"the server is busy ({what}); try again in a few seconds")


def _json_safe(value):
    """NaN and infinities as text (JSON has no such numbers; the reply must still be JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


async def invalid_request(_request: Request, err: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, except that the echoed input may hold NaN or Infinity, which Python's
    JSON parser accepts but JSON does not: the default answer failed to encode them (500)."""
    from fastapi.encoders import jsonable_encoder

    errors = _json_safe(jsonable_encoder(err.errors()))
    return JSONResponse({"detail": errors}, status_code=422)


async def storage_error(request: Request, err: OSError) -> JSONResponse:
    what = _STORAGE_ERRNOS.get(err.errno, f"a file operation failed ({err.strerror or err})")
    log.warning("storage error on %s %s: %s", request.method, request.url.path, err)
    return unavailable(what)


async def overflow_error(_request: Request, err: OverflowError) -> JSONResponse:
    return JSONResponse({"detail": f"a number is out of range ({err})"}, status_code=422)


def install(app: FastAPI) -> None:
    """Register the handlers and the outermost guard on ``app``."""
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(DataError, invalid_value)
    app.add_exception_handler(PoolTimeout, pool_exhausted)
    app.add_exception_handler(OperationalError, database_error)
    app.add_exception_handler(DBAPIError, database_error)
    app.add_exception_handler(OSError, storage_error)
    app.add_exception_handler(OverflowError, overflow_error)
    app.add_middleware(CatchAll)


class TrackedSend:
    """An ASGI ``send`` that remembers whether the response has started (after which no other
    response can be sent in its place)."""

    def __init__(self, send) -> None:
        self.send, self.started = send, False

    async def __call__(self, message) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self.send(message)


class CatchAll:
    """Answer a bug with a JSON 500 and keep the connection: Starlette's own error middleware
    re-raises to the server, which then drops the client's keep-alive connection."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tracked = TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if tracked.started:
                raise
            response = JSONResponse({"detail": "internal error; it has been logged"}, 500)
            await response(scope, receive, send)
