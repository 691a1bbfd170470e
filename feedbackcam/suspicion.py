"""Suspicious first: which images to show a clinician before anyone has marked an artifact.

An image is suspicious when its prediction may rest on something other than the lesion. Three
signs, each a number in [0, 1] per image (higher: more suspicious):

- ``outside``: the share of the explanation map (the predicted class's saliency at or above
  50 % of its maximum, as the thesis draws it) that lies outside the lesion's keep mask;
- ``swap``: the share of ``donors`` counterfactuals — the image's lesion, where it is, on other
  images' surroundings (:func:`~feedbackcam.counterfactual.swap_surroundings`, the
  "decide from the lesion" loss's counterfactual) — whose predicted class differs from the
  image's own: a prediction that changes when only the skin around the lesion changes is
  decided by the skin around it;
- ``uncertainty``: 1 − (p_max − 1/C) / (1 − 1/C), 0 for a certain prediction, 1 for a uniform one.

The **suspicion score** is the plain mean of the signs an image has (``outside`` and ``swap``
need a keep mask; without one an image has only ``uncertainty``). A mean of three numbers on one
scale, not a fitted model: nothing is learnt from labels, so it can order a worklist that nobody
has reviewed yet. :func:`suspicion` is the batched computation; the pure functions below are its
maths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .cam import hard_threshold, scale_by_max
from .counterfactual import swap_surroundings
from .explain import explain
from .self_explaining import SelfExplaining

SIGNS = ("outside", "swap", "uncertainty")
DEFAULT_DONORS = 4
MAP_GRID = 16
# The lesion keeps this share of the image side around it when its surroundings are swapped,
# as in the surroundings loss (losses.SURROUNDINGS_MARGIN).
MARGIN = 0.035


def outside_share(saliency: Tensor, keep: Tensor, threshold: float = 0.5) -> Tensor:
    """(N,) share of each explanation map — the saliency at or above ``threshold`` of its
    maximum, the thesis' map — that lies outside its keep mask; NaN for a row without a keep
    mask or with an empty map (nothing to judge)."""
    if saliency.shape != keep.shape:
        raise ValueError(f"saliency {tuple(saliency.shape)} and keep {tuple(keep.shape)} differ")
    shown = hard_threshold(scale_by_max(saliency.clamp_min(0)), threshold).flatten(1).double()
    k = (keep > 0).flatten(1).double()
    area = shown.sum(1)
    share = (shown * (1 - k)).sum(1) / area.clamp_min(1)
    nan = torch.full_like(share, float("nan"))
    return torch.where((k.sum(1) > 0) & (area > 0), share, nan).float()


def uncertainty(probs: Tensor) -> Tensor:
    """(N,) 1 − (p_max − 1/C) / (1 − 1/C): 0 when one class has all the probability, 1 when
    the prediction is uniform."""
    c = probs.shape[1]
    if c < 2:
        raise ValueError("uncertainty needs at least two classes")
    return (1 - (probs.amax(1) - 1 / c) / (1 - 1 / c)).clamp(0, 1)


def donor_table(n: int, donors: int, seed: int = 0) -> np.ndarray:
    """(n, d) indices: for each image, ``d = min(donors, n - 1)`` distinct other images whose
    surroundings it receives (seeded shifts of one permutation, never itself)."""
    d = min(donors, n - 1)
    if d < 1:
        return np.zeros((n, 0), np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    where = np.empty(n, np.int64)
    where[perm] = np.arange(n)
    shifts = rng.choice(np.arange(1, n), size=d, replace=False)
    return np.stack([perm[(where + s) % n] for s in shifts], axis=1)


def combine(signs: dict[str, np.ndarray]) -> np.ndarray:
    """The suspicion score: per image the mean of the signs it has (NaN signs left out)."""
    stacked = np.stack([np.asarray(signs[k], np.float64) for k in SIGNS if k in signs])
    have = ~np.isnan(stacked)
    total = np.where(have, stacked, 0).sum(0)
    return total / np.maximum(have.sum(0), 1)


@dataclass(frozen=True)
class Suspicion:
    """Per image: ``score`` (the mean of the signs), each sign (NaN where it needs a keep mask
    the image lacks), the predicted class and its probability."""

    score: np.ndarray
    outside: np.ndarray
    swap: np.ndarray
    uncertainty: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    maps: np.ndarray  # (N, MAP_GRID, MAP_GRID) the saliency maps, average-pooled (clustering)

    def order(self) -> np.ndarray:
        """Indices, most suspicious first (ties: the given order)."""
        return np.argsort(-self.score, kind="stable")


def _float(images, idx) -> Tensor:
    batch = images[idx]
    if isinstance(batch, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 255
    return batch.float()


def suspicion(
    model: SelfExplaining,
    images,
    keep: np.ndarray | None = None,
    *,
    donors: int = DEFAULT_DONORS,
    batch_size: int = 64,
    seed: int = 0,
) -> Suspicion:
    """The suspicion signs and score of ``images`` (uint8 (N, H, W, 3) or float (N, 3, H, W) in
    [0, 1], at the model's input size) under ``model``.

    ``keep``: (N, H, W) lesion masks (an all-zero row: none for that image); without them only
    ``uncertainty`` is computed. The swap counterfactuals take their surroundings from other
    images *with* a keep mask (their lesion filled), ``donors`` per image.
    """
    n = len(images)
    device = next(model.parameters()).device
    outside = np.full(n, np.nan)
    swap = np.full(n, np.nan)
    unsure = np.zeros(n)
    predicted = np.zeros(n, np.int64)
    confidence = np.zeros(n)
    maps = np.zeros((n, MAP_GRID, MAP_GRID), np.float32)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        x = _float(images, idx).to(device)
        ex = explain(model, x)
        probs = ex.probs.cpu()
        predicted[idx] = probs.argmax(1).numpy()
        confidence[idx] = probs.amax(1).numpy()
        unsure[idx] = uncertainty(probs).numpy()
        pooled = torch.nn.functional.adaptive_avg_pool2d(ex.saliency.cpu()[:, None], MAP_GRID)
        maps[idx] = pooled[:, 0].numpy()
        if keep is not None:
            k = torch.from_numpy(np.ascontiguousarray(keep[idx])).float()
            outside[idx] = outside_share(ex.saliency.cpu(), k).numpy()
    if keep is not None:
        swap = _swap_flips(model, images, keep, predicted, donors, batch_size, seed)
    signs = {"outside": outside, "swap": swap, "uncertainty": unsure}
    return Suspicion(combine(signs), outside, swap, unsure, predicted, confidence, maps)


def _swap_flips(model, images, keep, predicted, donors, batch_size, seed) -> np.ndarray:
    """Per image with a keep mask, the share of its surroundings swaps that change the predicted
    class (NaN without a mask or without another masked image to borrow from)."""
    n = len(images)
    out = np.full(n, np.nan)
    masked = np.flatnonzero(np.asarray(keep).reshape(n, -1).any(1))
    table = donor_table(len(masked), donors, seed)
    if table.shape[1] == 0:
        return out
    device = next(model.parameters()).device
    rows = [(i, j) for i in range(len(masked)) for j in table[i]]  # (receiver, donor), local
    changed = np.zeros(len(masked))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                recv = masked[[r for r, _ in chunk]]
                donor = masked[[d for _, d in chunk]]
                both = np.concatenate([recv, donor])
                x = _float(images, both)
                k = torch.from_numpy(np.ascontiguousarray(keep[both])).float()
                m = len(chunk)
                pairs = torch.cat([torch.arange(m, 2 * m), torch.arange(m)])
                swapped, _ = swap_surroundings(x, k, pairs, MARGIN)
                pred = model(swapped[:m].to(device)).logits.argmax(1).cpu().numpy()
                np.add.at(changed, [r for r, _ in chunk], pred != predicted[recv])
    finally:
        model.train(was_training)
    out[masked] = changed / table.shape[1]
    return out
