"""Model selection that cannot keep a collapsed classifier, and the warnings a run deserves.

The thesis' unbalanced runs drifted until the model predicted one class, and selection by
validation Jaccard kept such epochs: a collapsed classifier can still put its saliency on the
lesion. The guard here makes an epoch (or an app update) eligible only if its average sensitivity
(and, optionally, every class's sensitivity) stays within a tolerance of a reference's on the same
validation set. Simulations select among eligible epochs; the app's gate applies the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
) -> list[Drop]:
    """The scores of ``candidate`` that fall more than ``tolerance`` below ``reference``'s.

    ``keys`` name summary scores (e.g. "accuracy", "avg_sensitivity"); ``per_class`` adds every
    class's sensitivity (from the summaries' ``sensitivity`` dicts). Missing or None scores in
    the reference are not compared.
    """
    found = []
    pairs = [(k, reference.get(k), candidate.get(k)) for k in keys]
    if per_class:
        ref_sens = reference.get("sensitivity") or {}
        cand_sens = candidate.get("sensitivity") or {}
        pairs += [(f"sensitivity {c}", v, cand_sens.get(c)) for c, v in ref_sens.items()]
    for name, ref, value in pairs:
        if ref is None:
            continue
        floor = float(ref) - tolerance
        value = float("nan") if value is None else float(value)
        if not value >= floor - 1e-9:
            found.append(
                Drop(name.replace("avg_sensitivity", "average sensitivity"), ref, value, floor)
            )
    return found


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
