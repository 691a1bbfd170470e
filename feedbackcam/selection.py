"""Model selection that cannot keep a collapsed classifier, and the warnings a run deserves.

The thesis' unbalanced runs drifted until the model predicted one class, and selection by
validation Jaccard kept such epochs: a collapsed classifier can still put its saliency on the
lesion. The guard here makes an epoch (or an app update) eligible only if its average sensitivity
(and, optionally, a score of every class) stays within a tolerance of a reference's on the same
validation set. Simulations select among eligible epochs; the app's gate applies the same rule.

The per-class score is a choice (``measure``). Sensitivity alone cannot tell a repair from a
collapse when the reference is the model being repaired: its shortcut made one class absorb
another's images (a band-aid on melanomas: clean melanomas go to NV, NV's sensitivity is
inflated), and the repair lowers the absorbing class's sensitivity. Youden's J of the class
against the rest, sensitivity + specificity - 1, does: a class may lose sensitivity by as much as
it stops taking the other classes' images (its specificity rises), while a class that is traded
away loses sensitivity with no specificity to gain, and loses it in full: the same tolerance
means the same unpaid loss as on sensitivity (docs/real-artifacts.md, "A guard that tells
repair from collapse").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

# a run whose predictions fall on one class for more than this share of images is flagged
ONE_CLASS_SHARE = 0.9
# a class is flagged as found by what was marked "must not matter" when at least this share of
# its marked test images, and this many, are recognised as they are and not with the mark
# filled: well above the 3-8 % of predictions that filling any region beside the lesion
# changes on ISIC models without the shortcut (docs/real-artifacts.md)
MARK_RELIANCE = 0.2
MARK_RELIANCE_MIN = 3
# the per-class scores a guard may hold (see the module's docstring)
CLASS_MEASURES = ("youden", "sensitivity")
# how each names a class's score in a Drop and a verdict ("Youden's J MEL")
CLASS_LABELS = {"youden": "Youden's J", "sensitivity": "sensitivity"}


def class_scores(summary: Mapping, measure: str = "youden") -> dict[str, float | None]:
    """Every class's score in a summary (its ``sensitivity`` and, for ``"youden"``, its
    ``specificity`` dicts): the sensitivity, or Youden's J of the class against the rest,
    sensitivity + specificity - 1. None where a part is missing or not finite; an empty dict
    where the summary has no such scores (kept from before they were recorded)."""
    if measure not in CLASS_MEASURES:
        raise ValueError(f"class measure {measure!r}: expected one of {CLASS_MEASURES}")
    sens = summary.get("sensitivity") or {}
    if measure == "sensitivity":
        return {c: _finite_or_none(v) for c, v in sens.items()}
    spec = summary.get("specificity") or {}
    if not spec:
        return {}
    out = {}
    for c, s in sens.items():
        s, p = _finite_or_none(s), _finite_or_none(spec.get(c))
        out[c] = None if s is None or p is None else s + p - 1
    return out


def _finite_or_none(v) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


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
    measure: str = "sensitivity",
    margins: Mapping[str, float] | None = None,
) -> list[Drop]:
    """The scores of ``candidate`` that fall more than ``tolerance`` below ``reference``'s.

    ``keys`` name summary scores (e.g. "accuracy", "avg_sensitivity"); ``per_class`` adds every
    class's score, its sensitivity or its Youden's J against the rest (``measure``,
    :func:`class_scores`; named ``"sensitivity <class>"`` or ``"Youden's J <class>"``).
    Missing or None scores in the reference are not compared. ``margins`` (by those names)
    widen the tolerance by what the validation set cannot tell from noise
    (:func:`noise_margins`): a score is refused only when its fall is beyond the tolerance
    *and* the noise.
    """
    found = []
    pairs = [(k, reference.get(k), candidate.get(k)) for k in keys]
    if per_class:
        ref_scores = class_scores(reference, measure)
        cand_scores = class_scores(candidate, measure)
        label = CLASS_LABELS[measure]
        pairs += [(f"{label} {c}", v, cand_scores.get(c)) for c, v in ref_scores.items()]
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
    sensitivity, in its Youden's J against the rest and in the average sensitivity, from the
    images whose prediction changed.

    For class c with n_c images, of which b_c became correct and w_c wrong, the change is
    (b_c - w_c) / n_c with variance ((b_c + w_c) - (b_c - w_c)^2 / n_c) / n_c^2 (McNemar's);
    the average's variance is the mean of the classes' over C^2. The specificity's change is
    the same on the other images ("correct": not called c); Youden's J's variance is the sum
    of the two. Keys: "avg_sensitivity", "accuracy", ``"sensitivity <class>"`` and
    ``"Youden's J <class>"``.
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
        var = _paired_variance(was[rows], now[rows])
        variances.append(var)
        out[f"sensitivity {name}"] = z * math.sqrt(var)
        if n < len(labels):
            spec = _paired_variance(ref[~rows] != k, cand[~rows] != k)
            out[f"Youden's J {name}"] = z * math.sqrt(var + spec)
    if variances:
        out["avg_sensitivity"] = z * math.sqrt(sum(variances)) / len(variances)
    if len(labels):
        out["accuracy"] = z * math.sqrt(_paired_variance(was, now))
    return out


def _paired_variance(was: np.ndarray, now: np.ndarray) -> float:
    """The variance of the change in a share of correct answers between two models on the same
    images (McNemar's): ((b + w) - (b - w)^2 / n) / n^2, b became correct, w wrong."""
    n = len(was)
    if not n:
        return 0.0
    b, w = int((now & ~was).sum()), int((was & ~now).sum())
    return max((b + w) - (b - w) ** 2 / n, 0.0) / n**2


def independent_margins(
    sensitivity: Mapping[str, float | None],
    counts: Mapping[str, int],
    confidence: float = 0.95,
    specificity: Mapping[str, float | None] | None = None,
) -> dict[str, float]:
    """How far each class's sensitivity may fall by chance between two models scored apart on
    the same ``counts`` images per class, when only the scores are kept (no predictions to pair):
    the one-sided ``confidence`` bound z * sqrt(2 s (1 - s) / n), with s (1 - s) at least 0.05
    so that a class at 0 or 1 still has some room. Keys ``"sensitivity <class>"``; classes
    without a score or images are left out. Given the classes' ``specificity`` too, the
    bound of Youden's J against the rest, ``"Youden's J <class>"``:
    z * sqrt(2 (v_s / n + v_p / m)), m the other classes' images, v the floored variances."""
    z = NormalDist().inv_cdf(confidence)
    total = sum(int(v) for v in counts.values() if v)
    out = {}
    for name, s in sensitivity.items():
        n = counts.get(name, 0)
        if s is None or not math.isfinite(s) or not n:
            continue
        v_s = max(s * (1 - s), 0.05)
        out[f"sensitivity {name}"] = z * math.sqrt(2 * v_s / n)
        p = (specificity or {}).get(name)
        if p is not None and math.isfinite(p) and total > n:
            v_p = max(p * (1 - p), 0.05)
            out[f"Youden's J {name}"] = z * math.sqrt(2 * (v_s / n + v_p / (total - n)))
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
    class never recognised, a class found by what was marked "must not matter" (at least
    ``MARK_RELIANCE`` of its marked images, and ``MARK_RELIANCE_MIN`` of them, recognised as
    they are and not with the mark filled; the summary's ``marks_filled``), predictions falling
    on one class."""
    out = []
    if best_epoch == 0:
        out.append("no epoch improved on the baseline: this model is the baseline's weights")
    for c, s in (summary.get("sensitivity") or {}).items():
        if s is not None and s == 0:
            out.append(f"class {c}: sensitivity 0 (none of its images recognised)")
    for c, r in (summary.get("marks_filled") or {}).items():
        only, n = r["only_with_mark"], r["n_marked"]
        if only >= MARK_RELIANCE_MIN and only >= MARK_RELIANCE * n:
            out.append(
                f"class {c}: {only} of its {n} test images with a 'must not matter' mark are "
                f"recognised as they are and not with the marked region filled "
                f"({r['recognised']} against {r['recognised_filled']}): the class is found by "
                "what was marked"
            )
    shares = summary.get("predicted_share") or {}
    if shares:
        c, share = max(shares.items(), key=lambda kv: kv[1])
        if share > ONE_CLASS_SHARE:
            out.append(f"{share:.0%} of predictions are {c}: the classifier has collapsed")
    return out
