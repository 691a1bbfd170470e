"""The interactive feedback app: a clinician corrects the class and the explanation, and the
model learns from it (``feedbackcam serve``).

Layout: ``app.py`` (the FastAPI app and its lifespan), ``settings.py``, ``db.py`` (tables),
``auth.py`` (users, tokens), ``store.py`` (files on disk), ``uploads.py`` (checking what users
send), ``registry.py`` (the served model and its versions), ``update.py`` (fine-tune and gate),
``worker.py`` (the background updater), ``datasets.py`` (validation and replay sets) and
``gallery.py`` (data the app is given), ``demo.py`` (the demo's model and data), ``deps.py``
(FastAPI dependencies), ``runtime.py`` (what a running app holds), ``routers/`` (the API),
``static/`` (the page, no build step).
"""

from .settings import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str):
    # The app (FastAPI, SQLAlchemy, the model registry) loads when it is first asked for, so
    # that the command line's other commands (the demo, simulate) do not pay for it at start.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
