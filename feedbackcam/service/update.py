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
from dataclasses import dataclass, fields

import numpy as np
import torch

from ..balance import auto_scaled
from ..data.dataset import ArrayDataset, FeedbackBatch
from ..evaluate import evaluate
from ..objective import FeedbackConfig
from ..selection import drops
from ..self_explaining import SelfExplaining
from ..train import StopTraining, run_steps


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
) -> dict[str, float]:
    """Adam steps with the combined loss (eq. 4.1) on the new items plus each step's replay,
    through the project's one training loop (:func:`feedbackcam.train.run_steps`).

    Returns the step count, the mean loss and the count of skipped (non-finite) steps.
    """
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # The ignore term's scale, measured on this update's own first batches (its gradient equal
    # to the class loss's at the start; balance.auto_scaled), before any step.
    probe = [b.to(device) for b in itertools.islice(update_batches(new, replay, plan, cfg), 4)]
    feedback = auto_scaled(model, probe, cfg.feedback)
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
    model.eval()
    return {
        "surroundings_scale": feedback.surroundings_scale,
        "ignore_scale": feedback.ignore_scale,
        "steps": stats["steps"],
        "loss": stats["train_loss"],
        "skipped_steps": stats["skipped_steps"],
    }


def scores(model: SelfExplaining, validation: ArrayDataset) -> dict[str, float | int | None]:
    """What the gate compares: accuracy and average sensitivity (and Jaccard, for the record)."""
    summary = evaluate(model, validation, device=next(model.parameters()).device).summary()
    return {
        "accuracy": summary["accuracy"],
        "avg_sensitivity": summary["avg_sensitivity"],
        "jaccard_mean": summary["jaccard_mean"],
        "n_validation": len(validation),
    }


def gate(
    before: dict, after: dict, tolerance: float, original: dict | None = None
) -> tuple[bool, str]:
    """Promote unless accuracy or average sensitivity falls more than ``tolerance`` below the
    parent's, or below the original model's (so many small allowed drops cannot add up).

    The same rule as the simulations' collapse guard (:func:`feedbackcam.selection.drops`).
    """
    keys = ("accuracy", "avg_sensitivity")
    failed = {d.name: d for d in drops(before, after, tolerance, keys)}
    if original is not None:
        for d in drops(original, after, tolerance, keys):
            if d.name not in failed or d.floor > failed[d.name].floor:
                failed[d.name] = d
    parts = []
    for key in keys:
        name = key.replace("avg_sensitivity", "average sensitivity")
        text = f"{name} {float(before[key]):.3f} -> {float(after[key]):.3f}"
        parts.append(text + (f" (below {failed[name].floor:.3f})" if name in failed else ""))
    verdict = "rejected" if failed else "promoted"
    rule = f"a drop of at most {tolerance:g} from the parent and the original model is allowed"
    return not failed, f"{verdict}: {', '.join(parts)}; {rule}"
