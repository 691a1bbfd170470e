"""One model update: fine-tune a candidate on new feedback plus a class-balanced replay of
earlier feedback, then gate it on the held-out validation set.

Why the replay is balanced: the thesis' online runs, one feedback image per step on unbalanced
data, drifted until the model predicted a single class. Every step here sees the new items plus
the same number of earlier items from each class, so no class's gradient can dominate; the gate
then refuses any candidate that still loses accuracy or average sensitivity.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from ..balance import auto_scaled, feeding, measured_scales
from ..data.dataset import ArrayDataset, FeedbackBatch
from ..decision import refit_bias_on_batches
from ..evaluate import evaluate, predict_logits
from ..losses import get_loss
from ..metrics import classification_metrics
from ..objective import ADDED_TERMS, FeedbackConfig
from ..selection import CLASS_LABELS, class_scores, drops, independent_margins
from ..self_explaining import SelfExplaining
from ..train import StopTraining, recalibrate_batchnorm, run_steps


class Interrupted(Exception):
    """The app is stopping: the update was abandoned, its feedback stays pending."""


@dataclass(frozen=True)
class UpdateConfig:
    """How one update learns and is gated; the defaults live in `Settings` alone."""

    steps: int
    batch_size: int
    replay_per_class: int
    lr: float
    feedback: FeedbackConfig
    tolerance: float

    @classmethod
    def from_settings(cls, settings) -> UpdateConfig:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


def plan_replay(
    labels: np.ndarray, steps: int, per_class: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Indices into earlier feedback for each step: ``per_class`` of every class present
    (drawn with replacement only where a class has fewer items than that)."""
    labels = np.asarray(labels)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    plan = []
    for _ in range(steps):
        draws = [rng.choice(idx, per_class, replace=len(idx) < per_class) for idx in by_class]
        plan.append(np.concatenate(draws) if draws else np.zeros(0, np.int64))
    return plan


def update_batches(
    new: ArrayDataset, replay: ArrayDataset | None, plan: list[np.ndarray], cfg: UpdateConfig
) -> Iterator[FeedbackBatch]:
    """Each step's batch: the next ``batch_size`` new items (cycling) plus that step's replay.

    ``max(cfg.steps, ceil(len(new) / cfg.batch_size))`` steps, so every new item is seen.
    """
    new_t = new.tensors()
    replay_t = replay.tensors() if replay is not None else None
    n = len(new)
    for step in range(max(cfg.steps, math.ceil(n / cfg.batch_size))):
        start = (step * cfg.batch_size) % n
        idx = torch.arange(start, start + min(cfg.batch_size, n)) % n
        parts = [new_t.batch(idx)]
        if replay_t is not None and step < len(plan) and len(plan[step]):
            parts.append(replay_t.batch(torch.from_numpy(plan[step])))
        yield FeedbackBatch.cat(parts)


def fine_tune(
    model: SelfExplaining,
    new: ArrayDataset,
    replay: ArrayDataset | None,
    plan: list[np.ndarray],
    cfg: UpdateConfig,
    should_stop=lambda: False,
    scales: dict[str, float] | None = None,
) -> dict:
    """Adam steps with the combined loss (eq. 4.1) on the new items plus each step's replay,
    through the project's one training loop (:func:`feedbackcam.train.run_steps`).

    The terms' scales are calibrated once per lineage, as a simulation calibrates once per
    fine-tuning run (the updates are that run, in pieces): ``scales`` (from the parent
    version's update) are kept, and only a term without one is measured, on this update's first
    batches (its gradient equal to the class loss's at the start; ``balance.auto_scaled``).

    After the steps, BatchNorm's statistics (frozen during them) are re-estimated on the
    update's first batches (``FeedbackConfig.recalibrate_batchnorm``).

    Returns the step count, the mean loss, the count of skipped (non-finite) steps, the scales
    used and ``calibrated``: those measured or kept, for the next update; and whether BatchNorm
    was re-estimated.
    """
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    kept = {k: v for k, v in (scales or {}).items() if k in measured_scales(cfg.feedback)}
    probe = [b.to(device) for b in itertools.islice(update_batches(new, replay, plan, cfg), 4)]
    needed = _needed(cfg.feedback, probe)
    if set(needed) - set(kept):
        own = {"auto_scale": False} if "loss_scale" in kept else {}  # kept, not re-measured
        feedback = auto_scaled(model, probe, replace(cfg.feedback, **kept, **own))
    else:  # every term this update needs has its scale: no probe passes
        unset = {k: 1.0 for k in _SCALES[1:] if getattr(cfg.feedback, k) is None}
        feedback = replace(cfg.feedback, **{**unset, **kept})
    calibrated = {**kept, **{k: getattr(feedback, k) for k in needed}}
    try:
        stats = run_steps(
            model,
            update_batches(new, replay, plan, cfg),
            optimizer,
            feedback,
            device=device,
            should_stop=should_stop,
        )
    except StopTraining as err:
        raise Interrupted("stopped during an update") from err
    recalibrated = False
    if feedback.recalibrates_batchnorm:
        # the statistics of the moved weights, on the update's first batches (its own images;
        # the calibration's probe, already on the device)
        recalibrated = recalibrate_batchnorm(model, (b.images for b in probe))
    change = None
    if feedback.refits_offsets:
        batches = list(update_batches(new, replay, plan, cfg))
        change = _refit_offsets(model, batches, feedback, device)
    model.eval()
    return {
        "surroundings_scale": feedback.surroundings_scale,
        "ignore_scale": feedback.ignore_scale,
        "calibrated": calibrated,
        "steps": stats["steps"],
        "loss": stats["train_loss"],
        "skipped_steps": stats["skipped_steps"],
        "bias_change": change,
        "batchnorm_recalibrated": recalibrated,
    }


def _refit_offsets(model, batches, feedback: FeedbackConfig, device) -> list[float] | None:
    """Where the update's batches carry ignore regions, re-fit the last layer's bias on them
    with those regions filled (:func:`feedbackcam.decision.refit_bias_on_batches`, with
    ``feedback.class_weights``); return the change, or None."""
    if not feeding(batches, "ignore"):
        return None
    weights = feedback.class_weights
    change = refit_bias_on_batches(model, [b.to(device) for b in batches], class_weights=weights)
    return change.tolist()


_SCALES = ("loss_scale", *(scale for _, scale, _ in ADDED_TERMS))


def _needed(feedback: FeedbackConfig, batches: list[FeedbackBatch]) -> list[str]:
    """The scales ``balance.auto_scaled`` would measure on ``batches``: those it measures for
    ``feedback`` whose masks the batches carry, the added terms only on batches of two images
    or more (they move a region between two images; a scale measured on one image alone is
    not kept for later updates)."""
    kinds = {"loss_scale": get_loss(feedback.explanation_loss).needs}
    kinds |= {scale: kind for _, scale, kind in ADDED_TERMS}
    paired = any(len(b.labels) > 1 for b in batches)
    return [
        k
        for k in measured_scales(feedback)
        if feeding(batches, kinds[k]) and (paired or k == "loss_scale")
    ]


def replay_scales(
    model: SelfExplaining,
    replay: ArrayDataset,
    cfg: UpdateConfig,
    rng: np.random.Generator,
    batches: int = 4,
) -> dict[str, float]:
    """The loss scales that the replay set alone can feed (the keep-mask terms: the replay's
    images carry lesion masks, never ignore marks), measured as :func:`fine_tune` measures them
    (``balance.auto_scaled`` on ``batches`` batches of ``cfg.replay_per_class`` images of every
    class, the replay part of an update's batches) on a copy of ``model``. The app measures
    them for a served version that has none before any feedback arrives, so that the first
    update measures only what a user's marks alone feed."""
    if not cfg.replay_per_class or not len(replay):
        return {}
    device = next(model.parameters()).device
    plan = plan_replay(replay.labels, batches, cfg.replay_per_class, rng)
    data = replay.tensors()
    probe = [data.batch(torch.from_numpy(rows)).to(device) for rows in plan]
    needed = _needed(cfg.feedback, probe)
    if not needed:
        return {}
    scaled = auto_scaled(model, probe, cfg.feedback)
    return {k: float(getattr(scaled, k)) for k in needed}


# The Jaccard a version records is measured on at most this many masked gate images: it is
# for the record (the gate does not decide on it), and each image costs a Grad-CAM backward.
JACCARD_IMAGES = 64


def pass_batch(device: torch.device) -> int:
    """Images per batch of the gate's no-grad passes: 16 on a CPU, where Lite0 at 224 px ran
    the ~290-image pass in 3.8-4.4 s at 16 against 5.2-5.3 s at 32 and 5.4-5.6 s at 64 (two
    threads, BatchNorm folded; docs/benchmarks.md); 32 elsewhere, as before."""
    return 16 if torch.device(device).type == "cpu" else 32


def gate_set(validation: ArrayDataset, n: int | None, seed: int = 0) -> ArrayDataset:
    """The images the gate scores on: all of ``validation`` (``n`` None or at least its size)
    or a class-stratified random ``n`` of them, each class keeping its share (at least one
    image of every class present), fixed by ``seed`` so every version is scored on the same
    images (:func:`gate_rows`)."""
    rows = gate_rows(validation, n, seed)
    return validation if len(rows) == len(validation) else validation.subset(rows)


def gate_rows(validation: ArrayDataset, n: int | None, seed: int = 0) -> np.ndarray:
    """The indices of :func:`gate_set`'s images in ``validation``, ascending."""
    total = len(validation)
    if n is None or n >= total:
        return np.arange(total)
    if n < 1:
        raise ValueError(f"gate_images: expected a positive count or None, got {n!r}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(validation.labels)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.maximum(1, np.floor(counts * n / total)).astype(int)
    # hand the remainder to the classes with the largest fractional share
    order = np.argsort(-(counts * n / total - quota), kind="stable")
    for k in order[: max(0, n - int(quota.sum()))]:
        quota[k] += 1
    picked = [
        rng.choice(np.flatnonzero(labels == c), min(q, cnt), replace=False)
        for c, q, cnt in zip(classes, quota, counts, strict=True)
    ]
    return np.sort(np.concatenate(picked))


def scores(
    model: SelfExplaining, validation: ArrayDataset, logits: torch.Tensor | None = None
) -> dict[str, float | int | None]:
    """What the gate compares, accuracy and average sensitivity, from batched no-grad
    forward passes (or ``logits``, the model's on ``validation`` from a pass already made); and
    the mean Jaccard of the explanation against the masks (for the record) on at most
    ``JACCARD_IMAGES`` masked images, the only ones that need a Grad-CAM."""
    device = next(model.parameters()).device
    if logits is None:
        logits = predict_logits(
            model, validation.images, batch_size=pass_batch(device), device=device
        )
    probs = torch.softmax(logits.float(), 1)
    metrics = classification_metrics(validation.labels, probs.numpy(), validation.classes)
    masked = np.flatnonzero(
        validation.has_mask & (validation.masks.reshape(len(validation), -1).max(axis=1) > 0)
    )
    if len(masked) > JACCARD_IMAGES:
        masked = masked[np.linspace(0, len(masked) - 1, JACCARD_IMAGES).round().astype(int)]
    jaccard = None
    if len(masked):
        summary = evaluate(model, validation.subset(masked), batch_size=16, device=device)
        jaccard = summary.jaccard.mean
    per_class = {c: m.to_dict() for c, m in metrics.per_class.items()}
    return {
        "accuracy": metrics.accuracy,
        "avg_sensitivity": metrics.avg_sensitivity,
        # per class, for the gate's per-class rule (None where the class has no image)
        "sensitivity": {c: m["sensitivity"] for c, m in per_class.items()},
        "specificity": {c: m["specificity"] for c, m in per_class.items()},
        "counts": {c: m["support"] for c, m in per_class.items()},
        "jaccard_mean": None if jaccard is None or not np.isfinite(jaccard) else float(jaccard),
        "n_validation": len(validation),
        "n_jaccard": int(len(masked)),
    }


def gate(
    before: dict,
    after: dict,
    tolerance: float,
    original: dict | None = None,
    per_class: bool = False,
    measure: str = "youden",
) -> tuple[bool, str]:
    """Promote unless accuracy or average sensitivity falls more than ``tolerance`` below the
    parent's, or below the original model's (so many small allowed drops cannot add up); with
    ``per_class``, nor any class's score more than ``tolerance`` plus what the validation set
    cannot tell from chance (:func:`feedbackcam.selection.independent_margins`): an update may
    not trade a class away while the averages hold. The class's score is its one-vs-rest
    Youden's J against the rest, sensitivity + specificity - 1 (``measure``,
    :func:`feedbackcam.selection.class_scores`): a model with a shortcut has a class profile the
    shortcut made (the confounded class's images, without the artifact, go to another class),
    and the update that repairs it lowers that class's sensitivity while raising its
    specificity; sensitivity alone (``measure="sensitivity"``) refuses the repair
    (docs/real-artifacts.md, "A guard that tells repair from collapse"). Scores kept from
    before a score was recorded lack it: only what both have is compared.

    The same rule as the simulations' collapse guard (:func:`feedbackcam.selection.drops`).
    """
    keys = ("accuracy", "avg_sensitivity")

    def found(reference: dict) -> list:
        use = per_class and bool(class_scores(reference, measure))
        margins = (
            independent_margins(
                reference["sensitivity"],
                reference.get("counts") or {},
                specificity=reference.get("specificity"),
            )
            if use
            else None
        )
        return drops(
            reference, after, tolerance, keys, per_class=use, measure=measure, margins=margins
        )

    failed = {d.name: d for d in found(before)}
    if original is not None:
        for d in found(original):
            if d.name not in failed or d.floor > failed[d.name].floor:
                failed[d.name] = d
    parts = []
    for key in keys:
        name = key.replace("avg_sensitivity", "average sensitivity")
        text = f"{name} {float(before[key]):.3f} -> {float(after[key]):.3f}"
        parts.append(text + (f" (below {failed[name].floor:.3f})" if name in failed else ""))
    averages = ("accuracy", "average sensitivity")
    parts += [str(d) for name, d in failed.items() if name not in averages]
    verdict = "rejected" if failed else "promoted"
    rule = f"a drop of at most {tolerance:g} from the parent and the original model is allowed"
    if per_class and class_scores(before, measure):
        what = CLASS_LABELS[measure]
        rule += f" (each class's {what}: {tolerance:g} plus what chance moves it by)"
    where, n = "", after.get("n_validation")
    if n is not None:
        total = after.get("n_validation_total", n)
        part = f"a class-stratified {n} of {total}" if total != n else f"{n}"
        where = f" on {part} validation images"
    return not failed, f"{verdict}{where}: {', '.join(parts)}; {rule}"
