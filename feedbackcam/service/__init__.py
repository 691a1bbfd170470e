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

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
