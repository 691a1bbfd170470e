"""Model versions in memory: the served model, swapped whole under a lock, never edited in place.

The served model object is shared by request threads; a prediction holds its lock (its forward
pass registers hooks on the modules, so two concurrent passes would mix their activations). The
updater fine-tunes a deep copy and, when the gate promotes it, swaps in a new :class:`Served`.
``switching`` serialises every change of the current version (promotion, activation), so the
database pointer and the model in memory change together.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ..checkpoint import ModelSpec, load_checkpoint
from ..explain import Explanation, explain_with_features
from ..self_explaining import SelfExplaining
from .db import Version, current_version, set_current
from .startup import StartupError, check_model, last_good_version, offer, verify_file
from .store import Store, file_sha256

log = logging.getLogger(__name__)


class VersionError(ValueError):
    """A version that cannot be made current; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Seen(NamedTuple):
    """One prediction: the explanation, and from the same forward pass the logits (1, C) and
    the pooled explanation-layer activations (1, K) the unfamiliar-input check reads."""

    explanation: Explanation
    logits: np.ndarray
    pooled: np.ndarray


@dataclass(eq=False)
class Served:
    version_id: int
    model: SelfExplaining
    spec: ModelSpec
    lock: threading.Lock = field(default_factory=threading.Lock)

    def explain(self, rgb: np.ndarray) -> Seen:
        """Predict and explain one (S, S, 3) uint8 image at the model's input size, in one
        forward pass and one backward to the explanation layer; the same pass gives the
        unfamiliar-input check its logits and pooled features."""
        images = torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1)[None].float() / 255
        with self.lock:
            device = next(self.model.parameters()).device
            out, logits, pooled = explain_with_features(self.model, images.to(device))
        return Seen(
            Explanation(*(t.cpu() for t in out)),
            logits.cpu().numpy(),
            pooled.cpu().numpy().astype(np.float64),
        )

    def copy_model(self) -> SelfExplaining:
        with self.lock:  # not mid-forward: a copy would carry that call's temporary hooks
            return copy.deepcopy(self.model)


class Registry:
    def __init__(self, sessions: sessionmaker[Session], store: Store, device: str = "cpu") -> None:
        self.sessions = sessions
        self.store = store
        self.device = device
        self.switching = threading.Lock()
        self._served: Served | None = None

    @property
    def served(self) -> Served:
        served = self._served
        if served is None:
            raise RuntimeError("no model loaded; call Registry.open first")
        return served

    def open(self, checkpoint: Path) -> Served:
        """Serve the current version; a checkpoint the database has not seen becomes current,
        but only after it loads, fits the current version and explains a test image.

        Restarting with the same ``--model`` resumes the fine-tuned version that was current.
        Raises :class:`StartupError` (one line, naming the file) and changes nothing when the
        current version's file is damaged or the new checkpoint cannot replace it.
        """
        checkpoint = Path(checkpoint)
        with self.sessions() as session:
            current = current_version(session)
            served = None
            if current is not None:
                try:
                    served = self.load(current)
                except VersionError as err:
                    raise StartupError(str(err)) from err
            if not checkpoint.is_file():
                raise StartupError(f"{checkpoint}: checkpoint not found")
            sha = file_sha256(checkpoint)
            known = session.scalar(select(Version).where(Version.sha256 == sha).limit(1))
            if served is None and known is not None:  # known, but nothing is current
                try:
                    served = self.load(known)
                except VersionError as err:
                    raise StartupError(str(err)) from err
                set_current(session, known)
                session.commit()
                self._served = served
                return served
            if served is not None and known is not None:
                if known.id != current.id:
                    log.warning(
                        "%s is version %d; serving version %d, current since the last run",
                        checkpoint,
                        known.id,
                        current.id,
                    )
                self._served = served
                return served
            try:
                checked = check_model(
                    checkpoint, reference=served.spec if served else None, device=self.device
                )
            except ValueError as err:
                kept = "nothing was changed" if current is None else f"version {current.id} stays"
                raise StartupError(f"{err}; {kept} current") from err
            version = Version(
                path=self._stored_path(checkpoint),
                sha256=checked.sha256,
                status="promoted",
                reason="the model given at start"
                + ("" if current is None else f"; replaces version {current.id}"),
            )
            session.add(version)
            session.flush()
            set_current(session, version)
            session.commit()
        self._served = Served(version.id, checked.model, checked.spec)
        return self._served

    def _stored_path(self, path: Path) -> str:
        path = path.resolve()
        root = self.store.root.resolve()
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)

    def load(self, version: Version) -> Served:
        """Load a version's checkpoint after checking it against the SHA-256 recorded for it."""
        try:
            path = verify_file(self.store, version)
            model, spec, _ = load_checkpoint(path)
        except (FileNotFoundError, ValueError) as err:
            with self.sessions() as session:
                good = last_good_version(session, self.store, exclude=version.id)
            raise VersionError(409, f"{err}; {offer(good, self.store.root)}") from err
        model.to(self.device).eval()
        return Served(version.id, model, spec)

    def sync(self) -> bool:
        """Serve the database's current version if another process changed it; True if so."""
        with self.switching:
            with self.sessions() as session:
                current = current_version(session)
                if current is None or current.id == self.served.version_id:
                    return False
                served = self.load(current)
            self.install(served)
        log.info("version %d is current (changed by another process)", served.version_id)
        return True

    def install(self, served: Served) -> None:
        self._served = served

    def activate(self, version_id: int) -> Version:
        """Make a promoted version current again (rollback, or forward again)."""
        with self.switching:
            with self.sessions() as session:
                version = session.get(Version, version_id)
                if version is None:
                    raise VersionError(404, f"no version {version_id}")
                if version.status != "promoted":
                    raise VersionError(
                        409, f"version {version_id} is {version.status}; only promoted versions run"
                    )
                served = self.load(version)
                if served.spec.classes != self.served.spec.classes:
                    raise VersionError(409, f"version {version_id} has other classes")
                set_current(session, version)
                session.commit()
            self.install(served)
            log.info("version %d is current", version_id)
            return version
