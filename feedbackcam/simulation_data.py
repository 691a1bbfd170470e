"""What a simulation runs on, and how it is assembled from what a user has: SynthDerm (drawn
here, seeded), or a prepared folder split into a base set and a feedback pool, or a prepared
folder and a trained base model whose images stay in feedback-train (never in val or test).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import ModelSpec, load_checkpoint
from .data.dataset import ArrayDataset
from .data.splits import split_feedback
from .data.synth import (
    CLASSES,
    SynthConfig,
    SynthDataset,
    as_array_dataset,
    make_synthderm_versions,
)
from .self_explaining import SelfExplaining


@dataclass(frozen=True)
class SynthSetup:
    """The SynthDerm sets of a simulation (seeds kept apart so no image repeats)."""

    size: int = 64
    n_base: int = 900
    n_feedback: int = 900
    confounder: str | None = "patch"
    confounder_class: str = "MEL"
    confounder_rate: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class SimulationData:
    """What a simulation runs on.

    Attributes:
        feedback: the feedback pool, split 80/10/10 by the simulation.
        base: the base model's training set (None when a trained baseline is given).
        train_only: bool (N,) over ``feedback``: images the base model has seen (its training
            or validation data); they stay in feedback-train and never reach val or test.
        test_override: optional replacement for the test split's images, same ids in the same
            order as ``feedback`` (SynthDerm draws the test split with a class-independent
            confounder: the same lesions, the artifact at random).
        test_groups: named boolean masks over ``feedback`` for subgroup accuracies on test
            (e.g. images with and without the artifact).
    """

    feedback: ArrayDataset
    base: ArrayDataset | None = None
    train_only: np.ndarray | None = None
    test_override: ArrayDataset | None = None
    test_groups: dict[str, np.ndarray] = field(default_factory=dict)

    def with_classes(self, classes: Iterable[str], source: object) -> SimulationData:
        """Every set's labels re-indexed by ``classes`` (a base model's), matched by name."""
        classes = tuple(classes)

        def align(ds):
            return None if ds is None else ds.with_classes(classes, source)

        return replace(
            self,
            feedback=align(self.feedback),
            base=align(self.base),
            test_override=align(self.test_override),
        )


def prepared_simulation_data(
    data: ArrayDataset,
    *,
    base_fraction: float | None,
    seen_ids: Iterable[str] = (),
    seed: int = 0,
) -> SimulationData:
    """A simulation's data from one prepared set.

    Args:
        data: the prepared set.
        base_fraction: the stratified share of ``data`` that trains the baseline (the rest is
            the feedback pool); None when a trained base model is given instead.
        seen_ids: ids the base model has seen (its checkpoint's record, or another prepared
            set given with ``--overlap``): they stay in feedback-train only.
        seed: seeds the base/feedback split.
    """
    seen = set(seen_ids)
    train_only = np.array([i in seen for i in data.ids], bool) if seen else None
    if base_fraction is None:
        return SimulationData(feedback=data, train_only=train_only)
    f = base_fraction
    if not 0 < f < 1:
        raise ValueError(f"base_fraction: expected a value in (0, 1), got {f}")
    parts = split_feedback(data.labels, seed=seed, fractions=(1 - f, f / 2, f / 2))
    base_idx = np.concatenate([parts.val, parts.test])
    return SimulationData(
        feedback=data.subset(parts.train),
        base=data.subset(base_idx),
        train_only=None if train_only is None else train_only[parts.train],
    )


def seen_ids_of(payload: dict[str, Any]) -> tuple[str, ...]:
    """The ids a checkpoint's model was trained or selected on (``trained_on`` in its config)."""
    trained_on = (payload.get("config") or {}).get("trained_on") or {}
    return tuple(trained_on.get("train", ())) + tuple(trained_on.get("val", ()))


def synth_simulation_data(setup: SynthSetup) -> tuple[SimulationData, SynthDataset]:
    """Base set, feedback pool, and the pool redrawn with a class-independent confounder for
    the test split (same lesions; only the artifact is re-drawn at random). The returned test
    pool also holds its images without their artifact (``clean_images``), for the
    counterfactual test of how often the artifact decides."""

    def config(n: int, seed: int, prefix: str) -> SynthConfig:
        return SynthConfig(
            n=n,
            size=setup.size,
            seed=seed,
            confounder=setup.confounder,
            confounder_class=setup.confounder_class,
            confounder_rate=setup.confounder_rate,
            id_prefix=prefix,
        )

    (base,) = make_synthderm_versions(
        config(setup.n_base, setup.seed, "SYNBASE"), (setup.confounder_rate,)
    )
    # the pool and its test version share every lesion: each image is drawn once
    pool, test_pool = make_synthderm_versions(
        config(setup.n_feedback, setup.seed + 1, "SYN"), (setup.confounder_rate, 0.5), clean=True
    )
    target = CLASSES.index(setup.confounder_class)
    conflicting = test_pool.has_artifact != (test_pool.labels == target)
    data = SimulationData(
        feedback=as_array_dataset(pool),
        base=as_array_dataset(base),
        test_override=as_array_dataset(test_pool),
        test_groups={
            "no artifact": ~test_pool.has_artifact,
            "artifact misleads": conflicting,
        },
    )
    return data, test_pool


@dataclass(frozen=True, eq=False)
class Assembled:
    """A simulation's data as ``feedbackcam simulate`` assembles it: the data, the trained
    baseline and its spec (both None without ``base_model``), the classes and the image size."""

    data: SimulationData
    baseline: SelfExplaining | None
    spec: ModelSpec | None
    classes: tuple[str, ...]
    size: int
    n_seen: int = 0


def assemble(
    source: str | Path,
    *,
    base_model: str | Path | None = None,
    overlap: str | Path | None = None,
    synth: SynthSetup | None = None,
    base_fraction: float = 0.5,
    seed: int = 0,
) -> Assembled:
    """The data of a simulation from ``source``: ``"synth"`` (SynthDerm as ``synth`` says) or a
    prepared folder. With ``base_model`` (a checkpoint) the baseline is that model, the ids it
    was trained or selected on stay in feedback-train, and every set's labels follow its
    classes; without one, a stratified ``base_fraction`` of the prepared set trains the
    baseline. ``overlap``: another prepared folder whose ids also stay in feedback-train.
    """
    baseline = spec = payload = None
    if base_model is not None:
        baseline, spec, payload = load_checkpoint(base_model)
    n_seen = 0
    if str(source) == "synth":
        data, _ = synth_simulation_data(synth or SynthSetup(seed=seed))
        classes, size = CLASSES, (synth or SynthSetup()).size
    else:
        from .data.prepared import load_prepared

        prepared = load_prepared(source, mmap=False)
        seen = seen_ids_of(payload) if payload is not None else ()
        if overlap is not None:
            seen = seen + load_prepared(overlap).ids
        n_seen = len(set(seen) & set(prepared.ids))
        data = prepared_simulation_data(
            prepared,
            base_fraction=None if baseline is not None else base_fraction,
            seen_ids=seen,
            seed=seed,
        )
        classes, size = prepared.classes, prepared.size
    if baseline is not None:
        data = data.with_classes(spec.classes, base_model)
    return Assembled(data, baseline, spec, tuple(classes), size, n_seen)
