"""The background updater: turns pending feedback into a gated model version.

Runs in its own thread, so predictions never wait for training (they only wait the moment a
promoted model is swapped in). Crash safety comes from the order of writes: the candidate row
first, then the checkpoint file (new name, atomic), then one transaction that records the verdict,
moves the current pointer and marks the items used. A crash anywhere before that commit leaves
every item pending; the next start marks the unfinished candidate interrupted and resumes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta

import numpy as np
import torch
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from ..checkpoint import ModelSpec, save_checkpoint
from ..data.dataset import ArrayDataset
from ..evaluate import predict_features
from .datasets import concat, fingerprint
from .db import Item, Version, count_pending, current_version, set_current, utcnow
from .lease import DbLease
from .ood import check_inputs
from .registry import Registry, Served
from .settings import Settings
from .startup import check_model
from .store import Store, read_image
from .update import (
    Interrupted,
    UpdateConfig,
    fine_tune,
    gate,
    gate_rows,
    gate_set,
    pass_batch,
    plan_replay,
    replay_scales,
    scores,
)

log = logging.getLogger(__name__)


def mark_interrupted(sessions: sessionmaker[Session]) -> int:
    """Candidates left by a crash or a stop: record them as rejected. Returns how many."""
    with sessions.begin() as session:
        left = session.scalars(select(Version).where(Version.status == "candidate")).all()
        for version in left:
            version.status = "rejected"
            version.reason = "interrupted: the app stopped before this update finished"
        return len(left)


class Worker:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        store: Store,
        registry: Registry,
        validation: ArrayDataset | None,
        replay: ArrayDataset | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = UpdateConfig.from_settings(settings)
        self.sessions, self.store, self.registry = sessions, store, registry
        self.validation, self.replay = validation, replay
        # what the gate scores on: the validation set or a fixed stratified part of it
        self.gate_rows = (
            gate_rows(validation, settings.gate_images, settings.seed)
            if validation is not None
            else None
        )
        self.gate = (
            gate_set(validation, settings.gate_images, settings.seed)
            if validation is not None
            else None
        )
        self.validation_id = fingerprint(self.gate) if self.gate is not None else None
        self.rng = np.random.default_rng(settings.seed)
        self._wake, self._stop = threading.Event(), threading.Event()
        self.ready = threading.Event()  # set once the start-up work is done (see _loop)
        self._force = False
        self._thread: threading.Thread | None = None
        self.candidate_id: int | None = None
        # what the running update is doing, for the page: phase, steps done of steps, items
        self.progress: dict | None = None
        self.last_error: str | None = None
        self._failed: tuple[int, ...] = ()  # pending items whose update failed: wait for more
        self.lease = DbLease(sessions)  # one updater at a time across processes on this database
        self._renewed = 0.0
        # what a version needs before it answers (the unfamiliar-input check's reference):
        # measured here, in the updater's thread, not by the first prediction; it is given
        # the (energies, pooled activations) of the validation rows ``reference_rows`` from
        # the pass that scored the version, so it forwards nothing itself
        self.prepare: Callable[[Served, tuple | None], object] | None = None
        self.reference_rows: np.ndarray | None = None

    @property
    def enabled(self) -> bool:
        return self.validation is not None

    @property
    def message(self) -> str:
        if self.validation is None:
            return (
                f"updates are off: no validation set in {self.settings.data_dir} (validation/ "
                "or validation.npz); feedback is stored and waits"
            )
        if not self.settings.worker:
            return "updates are off (no worker in this app instance); feedback waits"
        return f"an update after every {self.settings.update_every} new item(s), or on demand"

    # ----------------------------------------------------------------- thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="feedbackcam-updater", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def notify(self, force: bool = False) -> None:
        """Wake the worker (a new item arrived); ``force`` updates even below ``update_every``."""
        self._force = self._force or force
        self._wake.set()

    def _loop(self) -> None:
        try:
            served = self.registry.served
            _, seen = self.baseline(served)
            if self.prepare is not None:
                self.prepare(served, seen)
            self.calibrate(served)
        except Exception as err:  # the app keeps serving; the error shows in the status
            log.exception("scoring the current version failed")
            self.last_error = f"scoring the current version failed: {err}"
        finally:
            self.ready.set()  # start-up work done: scores, the check's reference, scales
        while not self._stop.is_set():
            self._wake.clear()
            force, self._force = self._force, False
            try:
                self.registry.sync()  # another process on this database may have promoted
                self.run_once(force=force)
            except Interrupted:
                break
            except Exception as err:
                log.exception("update failed; its feedback stays pending")
                self.last_error = f"{type(err).__name__}: {err}"
            self._wake.wait(self.settings.poll_seconds)

    # ----------------------------------------------------------------- one update
    def baseline(self, served: Served, model=None) -> tuple[dict, tuple | None]:
        """The served version's validation scores, computed once per validation set, and,
        when this call measured them, the check's inputs from the same pass (for ``prepare``;
        None when the scores were kept from before)."""
        if self.validation is None:
            return {}, None
        with self.sessions() as session:
            version = session.get(Version, served.version_id)
            if version.metrics.get("validation") == self.validation_id:
                return dict(version.metrics), None
        measured, seen = self._measure(model if model is not None else served.copy_model())
        measured["validation"] = self.validation_id
        with self.sessions.begin() as session:
            version = session.get(Version, served.version_id)
            version.metrics = {**version.metrics, **measured}
        return measured, seen

    def _measure(self, model) -> tuple[dict, tuple[np.ndarray, np.ndarray] | None]:
        """The gate's scores of ``model`` and, from the same forward pass over the union of
        the gate's rows and ``reference_rows``, the (energies, pooled activations) of the
        latter (None without them): one pass where the gate and the unfamiliar-input check
        each made one."""
        total = {"n_validation_total": len(self.validation)}
        extra = self.reference_rows
        if extra is None or not len(extra):
            return {**scores(model, self.gate), **total}, None
        rows = np.union1d(self.gate_rows, extra)
        device = next(model.parameters()).device
        images = np.asarray(self.validation.images[rows])
        logits, pooled = predict_features(
            model, images, batch_size=pass_batch(device), device=device, pooled=True
        )
        gate = torch.from_numpy(np.searchsorted(rows, self.gate_rows))
        own = torch.from_numpy(np.searchsorted(rows, extra))
        seen = check_inputs(logits[own], pooled[own])
        return {**scores(model, self.gate, logits=logits[gate]), **total}, seen

    def run_once(self, force: bool = False) -> Version | None:
        """Update from the pending items if there are enough (or any, with ``force``), holding
        the database lease so no other process on the database updates at the same time."""
        if self.validation is None:
            return None
        with self.sessions() as session:
            if not count_pending(session):
                return None
        if not self.lease.acquire():
            return None
        self._renewed = time.monotonic()
        try:
            self.registry.sync()
            return self._run_leased(force)
        finally:
            self.lease.release()

    def _should_stop(self) -> bool:
        """Called between optimizer steps: renews the lease now and then; True to stop."""
        if time.monotonic() - self._renewed > self.lease.seconds / 4:
            self.lease.acquire()
            self._renewed = time.monotonic()
        return self._stop.is_set()

    def _run_leased(self, force: bool) -> Version | None:
        with self.sessions() as session:
            query = select(Item).where(Item.status == "pending")
            if not force:  # the author's withdraw window; an admin's "update now" skips it
                ready = utcnow() - timedelta(seconds=self.settings.grace_seconds)
                query = query.where(Item.created <= ready)
            pending = session.scalars(query.order_by(Item.id)).all()
            if not pending or (len(pending) < self.settings.update_every and not force):
                return None
            ids = tuple(i.id for i in pending)
            if ids == self._failed and not force:
                return None  # retried when new feedback arrives, on demand, or after a restart
            earlier = session.execute(
                select(Item.id, Item.label, Item.image_path, Item.mask_path, Item.ignore_mask_path)
                .where(Item.status == "used")
                .order_by(Item.id)
            ).all()
        served = self.registry.served
        with self.sessions.begin() as session:
            candidate = Version(
                status="candidate",
                parent_id=served.version_id,
                reason=f"fine-tuning on {len(pending)} new item(s)",
            )
            session.add(candidate)
        self.candidate_id = candidate.id
        try:
            return self._update(served, candidate.id, pending, earlier)
        except Interrupted:
            self._finish_candidate(candidate.id, "interrupted: the app stopped; feedback pending")
            raise
        except Exception as err:
            self._failed = ids
            self._finish_candidate(candidate.id, f"failed ({err}); its feedback stays pending")
            raise
        finally:
            self.candidate_id = None
            self.progress = None

    def _update(self, served: Served, candidate_id: int, pending, earlier) -> Version:
        spec = served.spec
        model = served.copy_model()
        before, _ = self.baseline(served, model)
        new = self._dataset(
            [(i.label, i.image_path, i.mask_path, i.ignore_mask_path) for i in pending], spec
        )
        replay, plan, from_feedback = self._replay(earlier, spec)
        steps = max(self.cfg.steps, math.ceil(len(new) / self.cfg.batch_size))
        progress = {"phase": "training", "step": 0, "steps": steps, "items": len(pending)}
        self.progress = progress

        def should_stop() -> bool:  # asked once before each step: counts the steps
            progress["step"] = min(progress["step"] + 1, steps)
            return self._should_stop()  # and renews the lease now and then

        stats = fine_tune(
            model, new, replay, plan, self.cfg, should_stop=should_stop, scales=self._scales(served)
        )
        progress["phase"] = "checking"  # the gate scores the candidate on the validation set
        outcomes = self._outcomes(model, new, pending, spec)
        after, seen = self._measure(model)
        promote, reason = gate(
            before,
            after,
            self.cfg.tolerance,
            self._original(served),
            per_class=self.settings.gate_per_class,
        )
        metrics = {
            **after,
            "validation": self.validation_id,
            "update": {
                **stats,
                "items": [i.id for i in pending],
                "outcomes": outcomes,
                "replay_items": int(sum(len(p) for p in plan)),
                "replay_from_feedback": from_feedback,
                "config": asdict(self.cfg),
                "parent_metrics": {k: before.get(k) for k in ("accuracy", "avg_sensitivity")},
            },
        }
        return self._record(served, candidate_id, model, metrics, promote, reason, pending, seen)

    @staticmethod
    def _outcomes(model, new: ArrayDataset, pending, spec: ModelSpec) -> dict[str, str]:
        """The class the candidate gives each item's image (item id -> class): kept with the
        version, so "does the model now agree with you" survives a reload."""
        x = torch.from_numpy(np.ascontiguousarray(new.images)).permute(0, 3, 1, 2).float() / 255
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                device = next(model.parameters()).device
                logits = torch.cat([model(part.to(device)).logits for part in x.split(32)])
        finally:
            model.train(was)
        return {
            str(item.id): spec.classes[int(k)]
            for item, k in zip(pending, logits.argmax(1).tolist(), strict=True)
        }

    def _replay(self, earlier, spec: ModelSpec):
        """Each step's class-balanced draw from earlier feedback and the replay set: the rows
        drawn (feedback items first, then replay-set rows), the plan (indices into those rows
        per step) and how many draws were feedback."""
        n = len(earlier)
        labels = [spec.classes.index(row.label) for row in earlier]
        if self.replay is not None:
            labels += self.replay.labels.tolist()
        if not labels or not self.cfg.replay_per_class:
            return None, [], 0
        plan = plan_replay(np.array(labels), self.cfg.steps, self.cfg.replay_per_class, self.rng)
        from_feedback = int(sum((p < n).sum() for p in plan))
        needed = np.unique(np.concatenate(plan))
        parts = []
        if (needed < n).any():
            parts.append(self._dataset([tuple(earlier[i])[1:] for i in needed[needed < n]], spec))
        if (needed >= n).any():
            parts.append(self.replay.subset(needed[needed >= n] - n))
        return concat(parts), [np.searchsorted(needed, p) for p in plan], from_feedback

    def _scales(self, served: Served) -> dict[str, float]:
        """The loss scales the served version's update calibrated or kept, and those measured
        on the replay set at start (:meth:`calibrate`): its descendants keep them
        (update.fine_tune)."""
        with self.sessions() as session:
            metrics = session.get(Version, served.version_id).metrics
            made = (metrics.get("update") or {}).get("calibrated") or {}
            return {**(metrics.get("calibrated") or {}), **made}

    def calibrate(self, served: Served) -> dict[str, float]:
        """For a served version with no loss scales (one not made by an update), measure at
        start those its replay set can feed (the keep-mask terms, ``update.replay_scales``)
        and keep them with it, so that its first update measures only the terms a user's
        marks alone feed (the ignore term): fewer probe passes while a clinician waits."""
        if self.replay is None or self._scales(served):
            return {}
        rng = np.random.default_rng(self.settings.seed + 1)  # not the updates' draws
        measured = replay_scales(served.copy_model(), self.replay, self.cfg, rng)
        if measured:
            with self.sessions.begin() as session:
                version = session.get(Version, served.version_id)
                version.metrics = {**version.metrics, "calibrated": measured}
        return measured

    def _original(self, served: Served) -> dict | None:
        """Scores of the first version in the served version's lineage, if on this set."""
        with self.sessions() as session:
            version = session.get(Version, served.version_id)
            while version.parent_id is not None:
                version = session.get(Version, version.parent_id)
            same = version.metrics.get("validation") == self.validation_id
            return dict(version.metrics) if same and version.id != served.version_id else None

    def _record(
        self, served, candidate_id, model, metrics, promote, reason, pending, seen=None
    ) -> Version:
        with self.registry.switching:
            with self.sessions() as session:
                moved = current_version(session).id != served.version_id
            path = None
            if promote and not moved:
                path = self.store.new_checkpoint_path(candidate_id)
                save_checkpoint(
                    path,
                    model,
                    served.spec,
                    config={"parent_version": served.version_id, **metrics["update"]},
                    metrics={k: v for k, v in metrics.items() if k != "update"},
                )
                try:  # what is served is what was written, and its hash is the file's
                    model = check_model(path, reference=served.spec, device=self.registry.device)
                except ValueError as err:
                    path.unlink(missing_ok=True)
                    raise RuntimeError(f"the saved candidate does not load back: {err}") from err
                promoted = Served(candidate_id, model.model, served.spec)
                if self.prepare is not None:  # before it is current: the old one answers
                    try:
                        self.prepare(promoted, seen)
                    except Exception:  # promoted all the same; the first prediction retries
                        log.exception("preparing version %d failed", candidate_id)
            with self.sessions.begin() as session:
                version = session.get(Version, candidate_id)
                version.metrics = metrics
                if moved:
                    # an admin changed the current version meanwhile: this candidate's parent is
                    # stale, so drop it and let the items train the version now current
                    version.status = "rejected"
                    version.reason = (
                        f"version {current_version(session).id} was made current during the "
                        "update; its feedback stays pending for the next update"
                    )
                    return version
                version.status = "promoted" if promote else "rejected"
                version.reason = reason
                if path is not None:
                    version.path = self.store.relative(path)
                    version.sha256 = model.sha256
                    set_current(session, version)
                session.execute(
                    update(Item)
                    .where(Item.id.in_([i.id for i in pending]))
                    .values(status="used", update_id=candidate_id)
                )
            if path is not None:
                self.registry.install(promoted)
            log.info("version %d %s", candidate_id, reason)
            return version

    def _finish_candidate(self, candidate_id: int, reason: str) -> None:
        with self.sessions.begin() as session:
            version = session.get(Version, candidate_id)
            version.status, version.reason = "rejected", reason

    def _dataset(self, rows, spec: ModelSpec) -> ArrayDataset:
        """Stored items (label, image path, mask path or None, ignore mask path or None) as
        arrays at the input size; ignore masks only when some item has one."""
        s = spec.input_size
        images = np.zeros((len(rows), s, s, 3), np.uint8)
        masks = np.zeros((len(rows), s, s), np.uint8)
        ignore = np.zeros((len(rows), s, s), np.uint8)
        has_mask = np.zeros(len(rows), bool)
        has_ignore = np.zeros(len(rows), bool)
        for k, (_, image_path, mask_path, ignore_path) in enumerate(rows):
            images[k] = read_image(self.store.absolute(image_path), "RGB", s)
            if mask_path is not None:
                masks[k] = read_image(self.store.absolute(mask_path), "L", s) > 0
                has_mask[k] = True
            if ignore_path is not None:
                ignore[k] = read_image(self.store.absolute(ignore_path), "L", s) > 0
                has_ignore[k] = True
        labels = np.array([spec.classes.index(r[0]) for r in rows], dtype=np.int64)
        ids = tuple(str(k) for k in range(len(rows)))
        if not has_ignore.any():
            return ArrayDataset(images, masks, labels, has_mask, ids, spec.classes)
        return ArrayDataset(
            images, masks, labels, has_mask, ids, spec.classes, ignore=ignore, has_ignore=has_ignore
        )
