"""Model selection that cannot keep a collapsed classifier, and the warnings a run deserves.

The thesis' unbalanced runs drifted until the model predicted one class, and selection by
validation Jaccard kept such epochs: a collapsed classifier can still put its saliency on the
lesion. The guard here makes an epoch (or an app update) eligible only if its average sensitivity
(and, optionally, every class's sensitivity) stays within a tolerance of a reference's on the same
validation set. Simulations select among eligible epochs; the app's gate applies the same rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

# a run whose predictions fall on one class for more than this share of images is flagged
ONE_CLASS_SHARE = 0.9


@dataclass(frozen=True)
class Drop:
    """A score that fell below what the rule allows."""

    name: str
    reference: float
    value: float
    floor: float

    def __str__(self) -> str:
        return f"{self.name} {self.reference:.3f} -> {self.value:.3f} (below {self.floor:.3f})"


def drops(
    reference: Mapping,
    candidate: Mapping,
    tolerance: float,
    keys: Sequence[str] = ("avg_sensitivity",),
    *,
    per_class: bool = False,
    margins: Mapping[str, float] | None = None,
) -> list[Drop]:
    """The scores of ``candidate`` that fall more than ``tolerance`` below ``reference``'s.

    ``keys`` name summary scores (e.g. "accuracy", "avg_sensitivity"); ``per_class`` adds every
    class's sensitivity (from the summaries' ``sensitivity`` dicts). Missing or None scores in
    the reference are not compared. ``margins`` (by key, or ``"sensitivity <class>"``) widen the
    tolerance by what the validation set cannot tell from noise (:func:`noise_margins`): a
    score is refused only when its fall is beyond the tolerance *and* the noise.
    """
    found = []
    pairs = [(k, reference.get(k), candidate.get(k)) for k in keys]
    if per_class:
        ref_sens = reference.get("sensitivity") or {}
        cand_sens = candidate.get("sensitivity") or {}
        pairs += [(f"sensitivity {c}", v, cand_sens.get(c)) for c, v in ref_sens.items()]
    margins = margins or {}
    for name, ref, value in pairs:
        if ref is None:
            continue
        floor = float(ref) - tolerance - margins.get(name, 0.0)
        value = float("nan") if value is None else float(value)
        if not value >= floor - 1e-9:
            found.append(
                Drop(name.replace("avg_sensitivity", "average sensitivity"), ref, value, floor)
            )
    return found


def noise_margins(
    labels: np.ndarray,
    reference_pred: np.ndarray,
    candidate_pred: np.ndarray,
    classes: Sequence[str],
    confidence: float = 0.95,
) -> dict[str, float]:
    """How far each score may fall on this validation set by chance: the one-sided
    ``confidence`` bound of the *paired* change (the same images, two models) in every class's
    sensitivity and in their average, from the images whose prediction changed.

    For class c with n_c images, of which b_c became correct and w_c wrong, the change is
    (b_c - w_c) / n_c with variance ((b_c + w_c) - (b_c - w_c)^2 / n_c) / n_c^2 (McNemar's);
    the average's variance is the mean of the classes' over C^2. Keys: "avg_sensitivity",
    "accuracy" and ``"sensitivity <class>"``.
    """
    labels, ref, cand = (np.asarray(a) for a in (labels, reference_pred, candidate_pred))
    z = NormalDist().inv_cdf(confidence)
    was, now = ref == labels, cand == labels
    out, variances = {}, []
    for k, name in enumerate(classes):
        rows = labels == k
        n = int(rows.sum())
        if not n:
            continue
        b, w = int((now & ~was & rows).sum()), int((was & ~now & rows).sum())
        var = max((b + w) - (b - w) ** 2 / n, 0.0) / n**2
        variances.append(var)
        out[f"sensitivity {name}"] = z * math.sqrt(var)
    if variances:
        out["avg_sensitivity"] = z * math.sqrt(sum(variances)) / len(variances)
    n = len(labels)
    if n:
        b, w = int((now & ~was).sum()), int((was & ~now).sum())
        out["accuracy"] = z * math.sqrt(max((b + w) - (b - w) ** 2 / n, 0.0)) / n
    return out


def independent_margins(
    sensitivity: Mapping[str, float | None],
    counts: Mapping[str, int],
    confidence: float = 0.95,
) -> dict[str, float]:
    """How far each class's sensitivity may fall by chance between two models scored apart on
    the same ``counts`` images per class, when only the scores are kept (no predictions to pair):
    the one-sided ``confidence`` bound z * sqrt(2 s (1 - s) / n), with s (1 - s) at least 0.05
    so that a class at 0 or 1 still has some room. Keys ``"sensitivity <class>"``; classes
    without a score or images are left out."""
    z = NormalDist().inv_cdf(confidence)
    out = {}
    for name, s in sensitivity.items():
        n = counts.get(name, 0)
        if s is None or not math.isfinite(s) or not n:
            continue
        out[f"sensitivity {name}"] = z * math.sqrt(2 * max(s * (1 - s), 0.05) / n)
    return out


def images_needed(tolerance: float, changed: float = 0.2, confidence: float = 0.95) -> int:
    """Images per class a validation set needs so that chance alone moves a class's
    sensitivity by less than ``tolerance`` (one-sided ``confidence``), when a share ``changed``
    of its predictions differ between the two models: n >= changed (z / tolerance)^2."""
    z = NormalDist().inv_cdf(confidence)
    return math.ceil(changed * (z / tolerance) ** 2)


def validation_warnings(
    labels: np.ndarray,
    classes: Sequence[str],
    tolerance: float | None,
    changed: float = 0.2,
    confidence: float = 0.95,
) -> list[str]:
    """Plain-language warnings for a validation set too small to judge the collapse guard:
    every class with fewer images than :func:`images_needed` says, for ``tolerance``."""
    if tolerance is None or tolerance <= 0:
        return []
    need = images_needed(tolerance, changed, confidence)
    counts = np.bincount(np.asarray(labels), minlength=len(classes))
    small = [f"{c} {int(n)}" for c, n in zip(classes, counts, strict=True) if n < need]
    if not small:
        return []
    return [
        f"validation is small for the collapse guard ({', '.join(small)} images): to tell a "
        f"{tolerance:g} drop in a class's sensitivity from chance ({confidence:.0%} one-sided) "
        f"when {changed:.0%} of its predictions change, a class needs {need} images; the guard "
        "widens its tolerance by this set's noise, so it may keep a worse model or reject a "
        "better one. Give more validation images (feedback-train may overlap the base model's "
        "data; validation and test must not)"
    ]


def run_warnings(summary: Mapping, best_epoch: int | None = None) -> list[str]:
    """Plain-language warnings for a run's test summary: best epoch 0 (the baseline kept), a
    class never recognised, predictions falling on one class."""
    out = []
    if best_epoch == 0:
        out.append("no epoch improved on the baseline: this model is the baseline's weights")
    for c, s in (summary.get("sensitivity") or {}).items():
        if s is not None and s == 0:
            out.append(f"class {c}: sensitivity 0 (none of its images recognised)")
    shares = summary.get("predicted_share") or {}
    if shares:
        c, share = max(shares.items(), key=lambda kv: kv[1])
        if share > ONE_CLASS_SHARE:
            out.append(f"{share:.0%} of predictions are {c}: the classifier has collapsed")
    return out
