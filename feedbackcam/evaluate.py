"""Evaluate a self-explaining classifier: classification metrics and explanation Jaccard."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import cam as cams
from .data.dataset import ArrayDataset
from .explain import explain
from .metrics import (
    ClassificationMetrics,
    JaccardSummary,
    bootstrap_intervals,
    classification_metrics,
    isic_jaccard,
    jaccard_per_image,
)
from .models import SelfExplaining


@dataclass(frozen=True, eq=False)
class Evaluation:
    classification: ClassificationMetrics
    jaccard: JaccardSummary
    isic_jaccard: float
    probs: np.ndarray  # (N, C)
    explained: np.ndarray  # (N, H, W) bool: the hard-thresholded explanation maps
    labels: np.ndarray  # (N,)
    jaccard_per_image: np.ndarray  # (N,) float, NaN where an image has no mask

    def summary(self, *, bootstrap_seed: int | None = None) -> dict:
        """The keys of the thesis' tables: accuracy, sensitivities, mean (SD) Jaccard, n; the
        classes the average sensitivity averages over; the share of predictions per class; and,
        given a ``bootstrap_seed``, 95 % bootstrap intervals (``ci``)."""
        c = self.classification
        classes = list(c.per_class)
        pred = self.probs.argmax(axis=1) if len(self.probs) else np.zeros(0, np.int64)
        counts = np.bincount(pred, minlength=len(classes))
        out = {
            "accuracy": c.accuracy,
            "avg_sensitivity": c.avg_sensitivity,
            "avg_sensitivity_classes": [k for k, m in c.per_class.items() if m.support > 0],
            "sensitivity": {k: _json(v) for k, v in c.sensitivity().items()},
            "predicted_share": {k: float(n / max(len(pred), 1)) for k, n in zip(classes, counts)},
            "jaccard_mean": _json(self.jaccard.mean),
            "jaccard_sd": _json(self.jaccard.sd),
            "isic_jaccard": _json(self.isic_jaccard),
            "n_test": c.n,
            "n_without_mask": self.jaccard.n_excluded,
        }
        if bootstrap_seed is not None:
            out["ci"] = bootstrap_intervals(
                self.labels,
                pred,
                self.jaccard_per_image,
                n_classes=len(classes),
                seed=bootstrap_seed,
            )
        return out


def _json(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def evaluate(
    model: SelfExplaining,
    data: ArrayDataset,
    *,
    batch_size: int = 64,
    threshold: float = 0.5,
    method: cams.CamMethod = "gradcam",
    target: str = "predicted",
    device: torch.device | str = "cpu",
) -> Evaluation:
    """Metrics of ``model`` on ``data``: accuracy, per-class metrics, and the Jaccard of the
    explanation map (saliency >= ``threshold`` of its max) against the feedback masks.

    Args:
        target: ``"predicted"`` explains the predicted class (inference, the default) or
            ``"label"`` the true class.
    """
    if target not in ("predicted", "label"):
        raise ValueError(f"target: expected 'predicted' or 'label', got {target!r}")
    tensors = data.tensors(device)
    probs, explained = [], []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        batch = tensors.batch(idx.to(device))
        out = explain(
            model, batch.images, batch.labels if target == "label" else None, method=method
        )
        probs.append(out.probs.cpu())
        explained.append(cams.hard_threshold(out.saliency, threshold).cpu())
    probs_np = torch.cat(probs).numpy() if probs else np.zeros((0, len(data.classes)))
    maps = (
        torch.cat(explained).numpy() if explained else np.zeros((0,) + data.masks.shape[1:], bool)
    )
    scored = data.has_mask & (data.masks.reshape(len(data), -1).max(axis=1) > 0)
    jaccard = jaccard_per_image(maps, data.masks, data.has_mask)
    per_image = np.full(len(data), np.nan)
    per_image[scored] = jaccard.values
    return Evaluation(
        classification=classification_metrics(data.labels, probs_np, data.classes),
        jaccard=jaccard,
        isic_jaccard=isic_jaccard(maps[scored], data.masks[scored])
        if scored.any()
        else float("nan"),
        probs=probs_np,
        explained=maps,
        labels=np.asarray(data.labels),
        jaccard_per_image=per_image,
    )


def counterfactual_flip_rate(
    model: SelfExplaining,
    images: np.ndarray,
    counterfactuals: np.ndarray,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> float:
    """Share of predictions that change between ``images`` and ``counterfactuals``.

    Both are uint8 (N, H, W, 3) and differ only in a region that should not matter (e.g. an
    artifact painted in or removed), so the rate measures how much that region alone drives the
    model: 0 for a model that ignores it. An explanation can overlap the lesion while the
    prediction still follows the artifact; this test does not depend on the explanation.
    """
    if images.shape != counterfactuals.shape:
        raise ValueError(
            f"images {images.shape} and counterfactuals {counterfactuals.shape} differ in shape"
        )
    if not len(images):
        return float("nan")
    was_training = model.training
    model.eval()
    changed = 0
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                preds = []
                for arr in (images, counterfactuals):
                    x = torch.from_numpy(np.array(arr[start : start + batch_size]))
                    x = x.to(device).permute(0, 3, 1, 2).float() / 255
                    preds.append(model(x).logits.argmax(dim=1))
                changed += int((preds[0] != preds[1]).sum())
    finally:
        model.train(was_training)
    return changed / len(images)
