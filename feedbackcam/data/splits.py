"""Splits of the feedback set: train/val/test, class balancing and slices (thesis 5.2-5.8).

All functions work on integer index arrays into one dataset and on that dataset's full label
array (``labels[i]`` is the label of sample ``i``), so they compose: split, then balance or slice
the train indices only; val and test are never balanced (thesis 5.7, 5.8).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["BALANCE_MODES", "Splits", "balance", "make_slices", "split_feedback"]

BALANCE_MODES = ("none", "reduce", "upsample")

# A class needs one sample for each of train, val and test before it can be stratified.
_MIN_STRATIFIABLE = 3


def _as_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_labels(labels) -> np.ndarray:
    y = _as_array(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(y.shape)}")
    if len(y) == 0:
        raise ValueError("labels is empty (N=0)")
    return y


def _check_indices(indices, n: int, name: str = "indices") -> np.ndarray:
    idx = _as_array(indices)
    if idx.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.size == 0:
        return idx.astype(np.int64)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {idx.dtype}")
    bad = (idx < 0) | (idx >= n)
    if bad.any():
        raise ValueError(f"{name} must be in [0, {n}) (len(labels)), got {idx[bad][:5].tolist()}")
    return idx.astype(np.int64)


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.int64)
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class Splits:
    """Sorted, disjoint int64 index arrays (read-only) into the feedback dataset.

    Equality is identity (``eq=False``) because the fields are arrays.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def to_dict(self) -> dict:
        """JSON-safe dict of index lists, e.g. to save next to a run's ``config.json``."""
        return {k: getattr(self, k).tolist() for k in ("train", "val", "test")}


def _apportion(total: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Split ``total`` into integer parts proportional to ``weights`` with ``parts <= caps``.

    Largest-remainder rounding, so the parts sum exactly to ``min(total, caps.sum())``; what a
    capped class cannot take is handed to the others in proportion to their weights.
    """
    parts = np.zeros(len(weights), dtype=np.int64)
    total = int(min(total, caps.sum()))
    while (remaining := total - int(parts.sum())) > 0:
        open_ = parts < caps
        w = np.where(open_, weights, 0.0).astype(np.float64)
        if w.sum() == 0:
            w = open_.astype(np.float64)
        quota = remaining * w / w.sum()
        add = np.floor(quota).astype(np.int64)
        order = np.argsort(-(quota - add), kind="stable")
        add[order[: remaining - int(add.sum())]] += 1
        parts = np.minimum(parts + add, caps)
    return parts


def split_feedback(
    labels,
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    train_only=None,
) -> Splits:
    """Stratified, seeded train/val/test split of the feedback set (thesis 5.2, 5.3).

    Val and test get ``round(f_val·N)`` and ``round(f_test·N)`` samples, N being the *whole*
    dataset, so the ``train_only`` samples (the 627 images also in the base model's ISIC 2019
    training data) do not shrink them; they are drawn from the other samples only. Each split's
    class mix follows the whole dataset's (largest-remainder rounding per class). Where a class
    has too few eligible samples, val/test take what there is and the shortfall goes to the
    other classes; they shrink only when the eligible samples run out. Classes with fewer than 3
    eligible samples go to train only.

    Args:
        labels: (N,) class labels (ints or strings).
        seed: seed of the shuffle; the same seed gives the same split.
        fractions: (train, val, test) fractions, positive, summing to 1. Train gets the rest.
        train_only: samples that may only go to train, as an (N,) boolean mask or an iterable of
            indices.

    Returns:
        :class:`Splits` whose arrays are sorted, disjoint and together cover ``range(N)``.

    Raises:
        ValueError: on bad fractions, empty or non-1-D labels, or ``train_only`` out of range or
            of the wrong length.

    Example:
        >>> s = split_feedback([0] * 80 + [1] * 20, seed=0)
        >>> len(s.train), len(s.val), len(s.test), int((s.val >= 80).sum())
        (80, 10, 10, 2)
    """
    y = _check_labels(labels)
    n = len(y)
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or not np.all(np.isfinite(fr)) or np.any(fr <= 0):
        raise ValueError(
            f"fractions must be 3 positive numbers (train, val, test), got {fractions}"
        )
    if not np.isclose(fr.sum(), 1.0, atol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {fractions} (sum {fr.sum():.6g})")

    locked = np.zeros(n, dtype=bool)
    if train_only is not None:
        if isinstance(train_only, (np.ndarray, torch.Tensor, Sequence)):
            to = _as_array(train_only)
        else:
            to = np.fromiter(train_only, dtype=np.int64)
        if to.dtype == np.bool_:
            if to.shape != (n,):
                raise ValueError(
                    f"train_only as a boolean mask must have shape ({n},), got {tuple(to.shape)}"
                )
            locked = to.copy()
        else:
            locked[_check_indices(to, n, "train_only")] = True

    classes, y_codes = np.unique(y, return_inverse=True)
    whole = np.bincount(y_codes, minlength=len(classes))
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero((y_codes == c) & ~locked)) for c in range(len(classes))]
    caps = np.array([len(p) if len(p) >= _MIN_STRATIFIABLE else 0 for p in pools])

    n_val, n_test = int(round(fr[1] * n)), int(round(fr[2] * n))
    held = _apportion(n_val + n_test, whole, caps)
    # If the eligible samples ran out, val and test shrink in proportion.
    n_val = int(held.sum()) * n_val // max(n_val + n_test, 1)
    # Val is apportioned within the held-out counts so both val and test keep the class mix.
    val_k = _apportion(n_val, held, held)

    train, val, test = [np.flatnonzero(locked)], [], []
    for pool, h, v in zip(pools, held, val_k, strict=True):
        val.append(pool[:v])
        test.append(pool[v:h])
        train.append(pool[h:])
    return Splits(
        train=_frozen(np.sort(np.concatenate(train))),
        val=_frozen(np.sort(np.concatenate(val))),
        test=_frozen(np.sort(np.concatenate(test))),
    )


def balance(
    indices, labels, mode: str, *, seed: int = 0, drop_classes: Iterable = ()
) -> np.ndarray:
    """Class-balance a set of (training) indices (thesis 5.7, 5.8).

    First the samples of ``drop_classes`` are removed (any mode), then:

    - ``"none"``: the rest, in input order.
    - ``"reduce"``: per class, a random subset as large as the smallest remaining class
      (thesis 5.7: NV cut to the MEL count, BKL dropped). No duplicates.
    - ``"upsample"``: every original plus random copies (with replacement) up to the largest
      class's count (thesis 5.8: MEL and BKL copied up to the 1,951 NV).

    Only ``indices`` are read; pass the train indices so val and test stay unbalanced.

    Args:
        indices: (M,) indices into ``labels``.
        labels: the whole dataset's (N,) labels; ``labels[indices]`` are the ones balanced.
        mode: one of ``BALANCE_MODES``.
        seed: seed of the subsampling, copying and final shuffle.
        drop_classes: labels to remove; each must occur in ``labels``.

    Returns:
        An int64 index array, shuffled (seeded) for "reduce" and "upsample"; it may hold
        duplicates for "upsample".

    Raises:
        ValueError: on an unknown mode, an unknown class in ``drop_classes`` or indices out of
            range.
    """
    if mode not in BALANCE_MODES:
        raise ValueError(f"mode must be one of {BALANCE_MODES}, got {mode!r}")
    y = _check_labels(labels)
    idx = _check_indices(indices, len(y))
    drop = list(drop_classes)
    known = set(np.unique(y).tolist())
    unknown = [c for c in drop if c not in known]
    if unknown:
        raise ValueError(f"drop_classes {unknown} do not occur in labels {sorted(known)}")

    idx = idx[~np.isin(y[idx], drop)] if drop else idx.copy()
    if mode == "none" or idx.size == 0:
        return idx

    rng = np.random.default_rng(seed)
    groups = [idx[y[idx] == c] for c in np.unique(y[idx])]
    if mode == "reduce":
        size = min(len(g) for g in groups)
        parts = [rng.choice(g, size=size, replace=False) for g in groups]
    else:
        size = max(len(g) for g in groups)
        parts = [
            np.concatenate([g, rng.choice(g, size=size - len(g), replace=True)]) for g in groups
        ]
    return rng.permutation(np.concatenate(parts))


def make_slices(indices, labels, k: int = 20, *, seed: int = 0) -> list[np.ndarray]:
    """Partition ``indices`` into ``k`` disjoint, stratified slices (thesis 5.4: 20 of 4 % each).

    Each class is shuffled and dealt round-robin, one class after the other, so every slice gets
    ``floor`` or ``ceil`` of ``n_c / k`` samples of each class and slice sizes differ by at most
    one. Positions are partitioned, so duplicate indices (from upsampling) each land once.

    Args:
        indices: (M,) indices into ``labels``, typically the train split.
        labels: the whole dataset's (N,) labels.
        k: number of slices, 1 <= k <= M.
        seed: seed of the shuffle.

    Returns:
        ``k`` sorted int64 arrays whose concatenation is a permutation of ``indices``.

    Raises:
        ValueError: if ``k`` is not in [1, M] or indices are out of range.
    """
    y = _check_labels(labels)
    idx = _check_indices(indices, len(y))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= len(idx):
        raise ValueError(f"k must be in [1, len(indices)={len(idx)}], got {k}")

    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(idx[y[idx] == c]) for c in np.unique(y[idx])])
    slot = np.arange(len(order)) % k
    return [np.sort(order[slot == s]) for s in range(k)]
