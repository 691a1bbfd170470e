"""Evaluation metrics: per-class classification scores and explanation Jaccard.

Classification follows the thesis' Table 4.1 (one-vs-rest accuracy, specificity, sensitivity, F1,
AUC per class) and chapter 5 (accuracy, per-class and average sensitivity). Explanations are
scored with the Jaccard index (eq. 3.4) of the thresholded saliency map against the feedback mask,
both per image (the thesis' "mean (SD) Jaccard") and as the ISIC 2018 Task 2 dataset score.

All public functions accept numpy arrays or torch tensors (any device, with or without grad).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "bootstrap_intervals",
    "ClassMetrics",
    "ClassificationMetrics",
    "JaccardSummary",
    "classification_metrics",
    "isic_jaccard",
    "jaccard_per_image",
    "per_class_table",
]


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as err:  # ragged nested lists end up here
        raise TypeError(f"{name} must be array-like, got {type(x).__name__}") from err
    if arr.dtype == object:
        raise TypeError(f"{name} must be numeric array-like, got {type(x).__name__}")
    return arr


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else math.nan


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the boolean ``positive`` (both classes
    present): the Mann-Whitney statistic, ties counted half, as ``roc_auc_score`` computes it."""
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2)[inverse]  # 1-based ranks, ties averaged
    p = int(positive.sum())
    return float((ranks[positive].sum() - p * (p + 1) / 2) / (p * (len(score) - p)))


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassMetrics:
    """One-vs-rest scores of one class (a row of the thesis' Table 4.1).

    Attributes:
        accuracy: (TP + TN) / N.
        specificity: TN / (TN + FP); nan if every sample belongs to the class.
        sensitivity: TP / (TP + FN) (recall); nan if the class is absent from ``y_true``.
        f1: 2·TP / (2·TP + FP + FN); nan if the class is neither present nor predicted.
        auc: one-vs-rest ROC AUC of the class probability; nan if the class is absent from
            ``y_true`` or is the only class present there.
        support: number of samples of the class in ``y_true``.
    """

    accuracy: float
    specificity: float
    sensitivity: float
    f1: float
    auc: float
    support: int

    def to_dict(self) -> dict:
        """JSON-safe dict (nan becomes ``None``)."""
        return {
            "accuracy": _json_float(self.accuracy),
            "specificity": _json_float(self.specificity),
            "sensitivity": _json_float(self.sensitivity),
            "f1": _json_float(self.f1),
            "auc": _json_float(self.auc),
            "support": int(self.support),
        }


@dataclass(frozen=True)
class ClassificationMetrics:
    """Multi-class scores of a classifier on one evaluation set.

    Attributes:
        accuracy: fraction of samples whose argmax class equals the label.
        avg_sensitivity: mean sensitivity over the classes present in ``y_true`` (balanced
            accuracy; the thesis' "average sensitivity", Tables 5.1-5.4).
        per_class: class name -> :class:`ClassMetrics`, in the order of ``class_names``.
        n: number of samples.
    """

    accuracy: float
    avg_sensitivity: float
    per_class: dict[str, ClassMetrics]
    n: int

    def sensitivity(self) -> dict[str, float]:
        """Per-class sensitivity, class name -> value (nan for absent classes)."""
        return {name: m.sensitivity for name, m in self.per_class.items()}

    def to_dict(self) -> dict:
        """JSON-safe dict (nan becomes ``None``)."""
        return {
            "accuracy": _json_float(self.accuracy),
            "avg_sensitivity": _json_float(self.avg_sensitivity),
            "n": int(self.n),
            "per_class": {name: m.to_dict() for name, m in self.per_class.items()},
        }


def _check_labels(y_true, n_classes: int) -> np.ndarray:
    y = _to_numpy(y_true, "y_true")
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D (N,), got shape {tuple(y.shape)}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise TypeError("y_true must hold integer class indices, got non-integer floats")
    elif y.dtype.kind not in "iu":
        raise TypeError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        raise ValueError(
            f"y_true labels must be in [0, {n_classes}), got {y[bad][:5].tolist()} "
            f"at positions {np.flatnonzero(bad)[:5].tolist()}"
        )
    return y


def classification_metrics(y_true, y_prob, class_names: Sequence[str]) -> ClassificationMetrics:
    """Accuracy, average sensitivity and one-vs-rest scores per class (Table 4.1).

    The predicted class is ``argmax(y_prob, axis=1)``. Classes absent from ``y_true`` have nan
    sensitivity and AUC and do not enter ``avg_sensitivity``.

    Args:
        y_true: integer class indices, shape (N,).
        y_prob: class probabilities, shape (N, C). Pass probabilities, not logits: the
            one-vs-rest AUC ranks the samples by column k, and softmax changes that ranking.
        class_names: C names, one per column of ``y_prob``.

    Returns:
        A :class:`ClassificationMetrics`.

    Raises:
        ValueError: on empty input, mismatched shapes, labels outside [0, C) or non-finite
            probabilities.
        TypeError: if the labels are not integers or ``class_names`` is not a sequence of str.

    Example:
        >>> prob = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]
        >>> m = classification_metrics([0, 1, 1], prob, ["NV", "MEL"])
        >>> round(m.accuracy, 3), m.sensitivity()["MEL"]
        (0.667, 0.5)
    """
    if isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names):
        raise TypeError(f"class_names must be a sequence of str, got {class_names!r}")
    names = list(class_names)
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique, got {names}")
    prob = _to_numpy(y_prob, "y_prob").astype(np.float64)
    if prob.ndim != 2:
        raise ValueError(f"y_prob must be 2-D (N, C), got shape {tuple(prob.shape)}")
    n, c = prob.shape
    if c != len(names):
        raise ValueError(
            f"y_prob has C={c} columns but class_names has {len(names)} names: {names}"
        )
    if n == 0:
        raise ValueError("y_prob is empty (N=0): nothing to score")
    if not np.all(np.isfinite(prob)):
        raise ValueError("y_prob contains nan or inf")
    y = _check_labels(y_true, c)
    if len(y) != n:
        raise ValueError(f"y_true has N={len(y)} labels but y_prob has N={n} rows")

    y_pred = prob.argmax(axis=1)
    # the confusion matrix, F1 and AUC in numpy (tests check them against scikit-learn's):
    # importing scikit-learn costs ~2 s, a tenth of the quick demo
    cm = np.bincount(y * c + y_pred, minlength=c * c).reshape(c, c)

    per_class: dict[str, ClassMetrics] = {}
    for k, name in enumerate(names):
        tp = int(cm[k, k])
        fn = int(cm[k, :].sum()) - tp
        fp = int(cm[:, k].sum()) - tp
        tn = n - tp - fn - fp
        support = tp + fn
        is_k = y == k
        # roc_auc_score raises when only one class is present; nan says "undefined" instead.
        auc = _auc(is_k, prob[:, k]) if 0 < support < n else math.nan
        per_class[name] = ClassMetrics(
            accuracy=(tp + tn) / n,
            specificity=_ratio(tn, tn + fp),
            sensitivity=_ratio(tp, support),
            # zero_division=nan: "never present and never predicted" is not an F1 of 0
            f1=_ratio(2 * tp, 2 * tp + fp + fn),
            auc=auc,
            support=support,
        )

    present = [m.sensitivity for m in per_class.values() if m.support > 0]
    return ClassificationMetrics(
        accuracy=float(np.trace(cm) / n),
        avg_sensitivity=float(np.mean(present)),
        per_class=per_class,
        n=n,
    )


def per_class_table(metrics: ClassificationMetrics) -> str:
    """Markdown table of the per-class scores, 2 decimals, laid out like the thesis' Table 4.1.

    Undefined values (nan) are written as ``n/a``.

    Args:
        metrics: the result of :func:`classification_metrics`.

    Returns:
        The table as one string, lines separated by ``\\n``, no trailing newline.
    """
    if not isinstance(metrics, ClassificationMetrics):
        raise TypeError(f"metrics must be ClassificationMetrics, got {type(metrics).__name__}")

    def fmt(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.2f}"

    lines = [
        "| Class | Accuracy | Specificity | Sensitivity | F1 | AUC |",
        "|:--|--:|--:|--:|--:|--:|",
    ]
    for name, m in metrics.per_class.items():
        cells = [m.accuracy, m.specificity, m.sensitivity, m.f1, m.auc]
        lines.append(f"| {name} | " + " | ".join(fmt(v) for v in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Explanation Jaccard
# ---------------------------------------------------------------------------------------------


def _image_pairs(pred, mask) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs of boolean (H, W) maps; accepts stacked (N, H, W) arrays or sequences of (H, W)."""

    def as_list(x, name: str) -> list[np.ndarray]:
        if isinstance(x, (list, tuple)):
            return [_to_numpy(a, f"{name}[{i}]") for i, a in enumerate(x)]
        arr = _to_numpy(x, name)
        if arr.ndim != 3:
            raise ValueError(
                f"{name} must be (N, H, W) or a sequence of (H, W) maps, "
                f"got shape {tuple(arr.shape)}"
            )
        return list(arr)

    preds, masks = as_list(pred, "pred"), as_list(mask, "mask")
    if len(preds) != len(masks):
        raise ValueError(f"pred has {len(preds)} images but mask has {len(masks)}")
    pairs = []
    for i, (p, m) in enumerate(zip(preds, masks, strict=True)):
        if p.ndim != 2 or m.ndim != 2:
            raise ValueError(
                f"image {i}: pred and mask must be 2-D (H, W), "
                f"got pred {tuple(p.shape)} and mask {tuple(m.shape)}"
            )
        if p.shape != m.shape:
            raise ValueError(
                f"image {i}: pred shape {tuple(p.shape)} != mask shape {tuple(m.shape)}"
            )
        # A raw CAM is > 0 almost everywhere; treating it as binary would score nonsense.
        if p.dtype != np.bool_ and not np.all((p == 0) | (p == 1)):
            raise ValueError(
                f"image {i}: pred must be a binary map (bool or 0/1); threshold the CAM first, "
                "e.g. cam >= 0.5"
            )
        pairs.append((p.astype(bool), m > 0))
    return pairs


@dataclass(frozen=True, eq=False)
class JaccardSummary:
    """Per-image Jaccard of explanation maps against feedback masks.

    Equality is identity (``eq=False``) because ``values`` is an array.

    Attributes:
        mean: mean Jaccard over the scored images; nan if none was scored.
        sd: population standard deviation (numpy ``std`` with ``ddof=0``); nan if none scored.
        n: number of images scored.
        n_excluded: images left out because they had no mask or an empty one.
        values: read-only per-image Jaccard of the scored images, in input order.
    """

    mean: float
    sd: float
    n: int
    n_excluded: int
    values: np.ndarray

    def to_dict(self) -> dict:
        """JSON-safe dict (nan becomes ``None``)."""
        return {
            "mean": _json_float(self.mean),
            "sd": _json_float(self.sd),
            "n": int(self.n),
            "n_excluded": int(self.n_excluded),
            "values": [float(v) for v in self.values],
        }


def jaccard_per_image(pred, mask, has_mask=None) -> JaccardSummary:
    """Jaccard index of each binary explanation map against its mask, with mean and SD.

    J = |pred ∩ mask| / |pred ∪ mask| (eq. 3.4). An empty ``pred`` against a non-empty mask
    scores 0. Images whose ``has_mask`` is False, or whose mask is empty, are not scored (J is
    undefined or meaningless there) and are counted in ``n_excluded``.

    Args:
        pred: binary explanation maps, (N, H, W) bool or 0/1 (e.g. the CAM thresholded at 50 %
            of its max), or a sequence of (H, W) maps of varying size.
        mask: feedback masks of the same shapes; any value > 0 counts as foreground (0/1 and
            0/255 both work).
        has_mask: optional (N,) booleans; False marks images without a feedback mask.

    Returns:
        A :class:`JaccardSummary`; ``sd`` is the population SD (``ddof=0``).

    Raises:
        ValueError: on mismatched shapes or counts, or a non-binary ``pred``.

    Example:
        >>> import numpy as np
        >>> p = np.zeros((1, 4, 4), bool); p[0, :, :2] = True
        >>> jaccard_per_image(p, np.ones((1, 4, 4))).mean
        0.5
    """
    pairs = _image_pairs(pred, mask)
    if has_mask is None:
        keep = np.ones(len(pairs), dtype=bool)
    else:
        keep = _to_numpy(has_mask, "has_mask").astype(bool).reshape(-1)
        if len(keep) != len(pairs):
            raise ValueError(f"has_mask has {len(keep)} entries but there are {len(pairs)} images")

    values = []
    for (p, m), k in zip(pairs, keep, strict=True):
        if not k or not m.any():
            continue
        values.append(np.logical_and(p, m).sum() / np.logical_or(p, m).sum())
    vals = np.asarray(values, dtype=np.float64)
    vals.flags.writeable = False
    scored = len(vals) > 0
    return JaccardSummary(
        mean=float(vals.mean()) if scored else math.nan,
        sd=float(vals.std(ddof=0)) if scored else math.nan,
        n=len(vals),
        n_excluded=len(pairs) - len(vals),
        values=vals,
    )


def isic_jaccard(pred, mask) -> float:
    """Dataset-level Jaccard as scored by the official ISIC 2018 Task 2 scorer.

    For each image, the TP/FP/FN/TN pixel counts are divided by the image's pixel count, so
    every image weighs the same whatever its size; the normalised counts are summed over the
    images, and the score is ΣTP / (ΣTP + ΣFP + ΣFN) (isic-challenge-scoring, ``task2.py``).
    Unlike :func:`jaccard_per_image` this is not a mean of per-image ratios, and images with an
    empty mask are scored (their predicted pixels count as false positives). Pass only the
    images with masks to match the per-image selection.

    Args:
        pred: binary maps, (N, H, W) or a sequence of (H, W) maps of varying size.
        mask: masks of the same shapes; any value > 0 counts as foreground.

    Returns:
        The score; nan if ΣTP + ΣFP + ΣFN is 0 (the official scorer returns 1.0 there, which
        would hide "nothing predicted, nothing to find").

    Raises:
        ValueError: on mismatched shapes or counts, or a non-binary ``pred``.
    """
    pairs = _image_pairs(pred, mask)
    tp = fp = fn = 0.0
    for p, m in pairs:
        size = p.size
        if size == 0:
            continue
        tp += np.logical_and(p, m).sum() / size
        fp += np.logical_and(p, ~m).sum() / size
        fn += np.logical_and(~p, m).sum() / size
    return _ratio(tp, tp + fp + fn)


# ---------------------------------------------------------------------------------------------
# Uncertainty
# ---------------------------------------------------------------------------------------------


def bootstrap_intervals(
    y_true,
    y_pred,
    jaccard=None,
    *,
    n_classes: int,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float] | None]:
    """Percentile bootstrap intervals of accuracy, average sensitivity and mean Jaccard.

    The test images are resampled with replacement ``n_boot`` times; each statistic is computed
    on every resample exactly as on the whole set (average sensitivity over the classes present
    in that resample; mean Jaccard over the images that have a score, ``jaccard`` NaN where an
    image has no mask). Returns ``(low, high)`` per statistic, None where it cannot be computed.
    """
    y = _check_labels(y_true, n_classes)
    p = np.asarray(y_pred, dtype=np.int64)
    if p.shape != y.shape:
        raise ValueError(f"y_pred: expected shape {y.shape}, got {p.shape}")
    out: dict[str, tuple[float, float] | None] = {
        "accuracy": None,
        "avg_sensitivity": None,
        "jaccard_mean": None,
    }
    if not len(y):
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n_boot, len(y)))
    yb, correct = y[idx], (p == y)[idx]
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100

    def interval(values: np.ndarray) -> tuple[float, float] | None:
        values = values[np.isfinite(values)]
        if not len(values):
            return None
        return float(np.percentile(values, lo)), float(np.percentile(values, hi))

    out["accuracy"] = interval(correct.mean(axis=1))
    sens = []
    for c in range(n_classes):
        in_c = yb == c
        n_c = in_c.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            sens.append(np.where(n_c > 0, (correct & in_c).sum(axis=1) / n_c, np.nan))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out["avg_sensitivity"] = interval(np.nanmean(np.stack(sens), axis=0))
        if jaccard is not None:
            j = np.asarray(jaccard, dtype=float)[idx]
            out["jaccard_mean"] = interval(np.nanmean(j, axis=1))
    return out
