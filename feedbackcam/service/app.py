"""The FastAPI app: ``create_app(settings)``; the model and the updater start in its lifespan."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from .. import __version__
from . import errors
from .guard import Guard, Roles
from .headers import SecurityHeaders
from .limits import Concurrency, RateLimiter
from .registry import VersionError
from .routers import (
    export,
    feedback,
    images,
    originals,
    predict,
    proposals,
    updates,
    users,
    versions,
    worklists,
)
from .runtime import Runtime
from .schemas import ERROR_RESPONSES
from .settings import Settings
from .uploads import UploadError

STATIC = Path(__file__).parent / "static"
log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI):
    runtime = Runtime.open(app.state.settings)
    app.state.runtime = runtime
    app.state.offline_warmup = None
    if app.state.settings.propose_with == "offline":
        app.state.offline_warmup = threading.Thread(
            target=_warm_offline, args=(runtime,), name="offline-warmup", daemon=True
        )
        app.state.offline_warmup.start()
    try:
        yield
    finally:
        runtime.close()


def _warm_offline(runtime) -> None:
    """The offline proposer's activations of the stored images, computed at start
    (:func:`.routers.proposals.warm_offline`); a failure only leaves them to the first request."""
    from .routers.proposals import warm_offline

    try:
        done = warm_offline(runtime)
        log.info("offline proposer: activations of %d stored images computed at start", done)
    except Exception:  # noqa: BLE001 - the requests compute what is missing
        log.exception("offline proposer: computing the stored images' activations at start failed")


class BodyLimit:
    """Refuse a request body beyond ``max_bytes`` while it streams in, before any parsing
    spools it to disk (a per-file limit alone would let a huge body be read first)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        seen, tracked = 0, errors.TrackedSend(send)

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, tracked)
        except _TooLarge:
            if not tracked.started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        response = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, 413)
        await response({"type": "http"}, None, send)


class _TooLarge(BaseException):
    """Raised from ``receive``; not an Exception, so body parsers cannot turn it into a 400."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """The feedback app. Nothing is loaded until it starts (its lifespan opens the runtime)."""
    settings = settings or Settings()
    # FastAPIOffline serves the /docs viewer's scripts itself: no CDN, so it works air-gapped.
    app = FastAPIOffline(
        title="feedbackcam",
        version=__version__,
        description="Predict and explain; collect clinicians' class and region feedback; "
        "fine-tune gated model versions from it. Sign in with a bearer token.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    # an image and a mask at the upload limit, plus the form fields
    app.add_middleware(BodyLimit, max_bytes=2 * settings.max_upload_bytes + 2**20)
    roles = Roles()
    app.add_middleware(Guard, limiter=RateLimiter(settings.rate_limit_per_minute), roles=roles)
    # outside the guard: a request waiting for a slot holds no database connection
    app.add_middleware(Concurrency, limit=settings.max_concurrent)
    errors.install(app)
    app.add_middleware(SecurityHeaders)
    for module in (
        predict,
        feedback,
        images,
        originals,
        versions,
        updates,
        users,
        worklists,
        export,
        proposals,
    ):
        app.include_router(module.router, prefix="/api", responses=ERROR_RESPONSES)
        roles.add_router(module.router, "/api")

    @app.exception_handler(UploadError)
    @app.exception_handler(VersionError)
    async def refused(_request: Request, err: UploadError | VersionError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app
