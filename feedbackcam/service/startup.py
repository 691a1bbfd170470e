"""Checks that a model may be served, before anything about it is written to the database.

A checkpoint becomes a version only after it loads, fits the version it replaces (the same class
names in the same order, since stored feedback names classes by position in training batches),
and explains one image with finite scores. Every time a version is made current its file's
SHA-256 is compared with the one recorded when it was registered, so a damaged or swapped file
is refused instead of served.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..checkpoint import ModelSpec, load_checkpoint
from ..explain import explain
from ..self_explaining import SelfExplaining
from .db import Version
from .store import Store, file_sha256

MAX_INPUT_SIZE = 4096


class StartupError(ValueError):
    """The app cannot start as asked; the message is one line naming the file and the problem."""


@dataclass(eq=False)
class CheckedModel:
    path: Path
    sha256: str
    model: SelfExplaining
    spec: ModelSpec


def check_model(
    path: Path, *, reference: ModelSpec | None = None, device: str = "cpu"
) -> CheckedModel:
    """Load ``path`` and prove it can serve in place of a model with spec ``reference``.

    Raises ``ValueError`` naming the file: unreadable, not a checkpoint, other classes (or the
    same ones in another order), another input size, or an explanation that is not finite.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint not found")
    sha = file_sha256(path)
    try:
        model, spec, _ = load_checkpoint(path)
    except ValueError as err:  # torch's own messages run to many lines; one says enough
        reason = str(err).splitlines()[0]
        if "not a readable checkpoint" in reason:
            reason = f"{path}: not a readable checkpoint (damaged, truncated or not from PyTorch)"
        raise ValueError(reason) from err
    if len(spec.classes) < 2 or len(set(spec.classes)) != len(spec.classes):
        raise ValueError(f"{path}: expected two or more distinct class names, got {spec.classes}")
    if not 8 <= spec.input_size <= MAX_INPUT_SIZE:
        raise ValueError(f"{path}: input size {spec.input_size} is outside 8..{MAX_INPUT_SIZE}")
    if reference is not None:
        if spec.classes != reference.classes:
            same = sorted(spec.classes) == sorted(reference.classes)
            problem = "the same classes in another order" if same else "other classes"
            raise ValueError(
                f"{path}: {problem} {list(spec.classes)} than the current version "
                f"{list(reference.classes)}; stored feedback would be learnt as the wrong class"
            )
        if spec.input_size != reference.input_size:
            raise ValueError(
                f"{path}: input size {spec.input_size}, the current version's is "
                f"{reference.input_size}; stored images and masks are at that size"
            )
    model.to(device).eval()
    probe = torch.full((1, 3, spec.input_size, spec.input_size), 0.5, device=device)
    try:
        out = explain(model, probe)
    except Exception as err:  # any failure of a foreign model's forward pass
        raise ValueError(f"{path}: the model fails on a test image ({err})") from err
    probs = out.probs.detach().cpu()
    if probs.shape != (1, len(spec.classes)) or not torch.isfinite(probs).all():
        raise ValueError(f"{path}: the model gives no finite score for each class on a test image")
    if not math.isclose(float(probs.sum()), 1.0, abs_tol=1e-3):
        raise ValueError(f"{path}: the model's class probabilities do not sum to 1")
    return CheckedModel(path, sha, model, spec)


def verify_file(store: Store, version: Version) -> Path:
    """The checkpoint of ``version`` if it exists and has the SHA-256 recorded for it."""
    if version.path is None:
        raise ValueError(f"version {version.id} has no checkpoint ({version.status})")
    path = store.absolute(version.path)
    if not path.is_file():
        raise ValueError(f"version {version.id}: its checkpoint {path} is missing")
    if version.sha256 and file_sha256(path) != version.sha256:
        raise ValueError(
            f"version {version.id}: its checkpoint {path} does not match the SHA-256 recorded "
            "for it (damaged or replaced)"
        )
    return path


def last_good_version(session: Session, store: Store, *, exclude: int | None = None) -> int | None:
    """The version to fall back to when version ``exclude`` (the current one) cannot be used:
    its nearest promoted ancestor whose checkpoint exists and matches its hash.

    Only the current version's own lineage (``parent_id``, back to the base model) is searched,
    so a version an admin deliberately rolled away from is never brought back. Without
    ``exclude``, the newest good promoted version.
    """
    if exclude is not None:
        version, seen = session.get(Version, exclude), {exclude}
        while version is not None and version.parent_id is not None:
            if version.parent_id in seen:  # a damaged table: never loop
                return None
            seen.add(version.parent_id)
            version = session.get(Version, version.parent_id)
            if version is not None and version.status == "promoted" and _good(store, version):
                return version.id
        return None
    promoted = session.scalars(
        select(Version).where(Version.status == "promoted").order_by(Version.id.desc())
    )
    return next((v.id for v in promoted if _good(store, v)), None)


def _good(store: Store, version: Version) -> bool:
    try:
        verify_file(store, version)
    except ValueError:
        return False
    return True


def offer(good: int | None, data_dir: Path) -> str:
    """The sentence that says how to get back to a version that works."""
    if good is None:
        return "no earlier version has a good checkpoint"
    return (
        f"the last good version is {good}: make it current with "
        f"'feedbackcam doctor --data-dir {data_dir} --repair' or POST /api/versions/{good}/activate"
    )
