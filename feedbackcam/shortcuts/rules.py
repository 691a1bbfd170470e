"""The benchmark's rules, on validation numbers only: the lambda each method trains with
(:func:`choose_lambda`), and the loss that becomes the default where a user meets it
(:func:`choose_default`). Test numbers never choose anything.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..selection import CLASS_LABELS, class_scores, independent_margins

# The objectives the default rule chooses among (and class feedback, the floor): the ignore
# losses alone, and with "decide from the lesion" (and the thesis' Jaccard) on the keep masks.
DEFAULT_CANDIDATES = (
    "invariance_transplant",
    "invariance_balanced",
    "invariance_mass_balanced",
    "surroundings+invariance_balanced",
    "jaccard+surroundings+invariance_balanced",
    "class",
)


def _finite(value) -> bool:
    """A number that is not None, NaN or infinite (rows mark a missing score with None or NaN)."""
    return isinstance(value, numbers.Real) and math.isfinite(value)


def guard_key(rows: list[dict]) -> str:
    """The score the collapse guard compares: the filled-validation average sensitivity, or
    confounded validation accuracy when any row predates it."""
    return "val_avg_sens_filled" if all("val_avg_sens_filled" in r for r in rows) else "val_acc"


def choose_lambda(rows: list[dict], baseline: dict, tolerance: float) -> float:
    """The validation rule: lowest validation flip rate among the settings whose average
    sensitivity on the filled validation images is within ``tolerance`` of the baseline's (all
    settings if none is); ties go to the higher one.

    The filter is the collapse guard of :mod:`feedbackcam.selection` on deconfounded data: a
    setting that stops using the shortcut must not lose a class to do it. Rows written before
    ``val_avg_sens_filled`` existed (the Decoy-MNIST run of 2026-11-27) fall back to confounded
    validation accuracy, the rule they were chosen by; on that run both filters pass every setting.
    """
    key = guard_key([*rows, baseline])
    ok = [r for r in rows if r[key] >= baseline[key] - tolerance] or rows
    return min(ok, key=lambda r: (flip_key(r), -r[key]))["lam"]


def flip_key(row: dict) -> float:
    """A row's validation flip rate as the rules compare it: rounded to 4 decimals, and 0 where
    there is none (no marked confounder on validation, the trap splits)."""
    return round(row["val_flip"], 4) if _finite(row["val_flip"]) else 0.0


def below_floors(sensitivities: list, floors: list[float]) -> list[int]:
    """The classes (indices) whose sensitivity is below its floor (:func:`class_floors`); a
    class without a score (None) is never below."""
    pairs = zip(sensitivities, floors, strict=True)
    return [k for k, (v, f) in enumerate(pairs) if v is not None and not v >= f - 1e-9]


def class_floors(
    reference: dict, tolerance: float, confidence: float = 0.95, measure: str = "sensitivity"
) -> list[float]:
    """Per class, the lowest filled-validation score a model may have: the ``reference``'s
    (:func:`class_values`), less ``tolerance``, less what two models' scores on this validation
    set can differ by chance (one-sided ``confidence``, from the class's image count and, for
    Youden's J, the other classes')."""
    values = class_values(reference, measure)
    counts = reference.get("val_counts") or [None] * len(values)
    names = [str(k) for k in range(len(values))]
    spec = reference.get("val_spec_filled") or [None] * len(values)
    sens = reference["val_sens_filled"]
    margins = independent_margins(
        {k: s if _finite(s) else None for k, s in zip(names, sens, strict=True)},
        {k: n for k, n in zip(names, counts, strict=True) if n},
        confidence,
        specificity={k: p if _finite(p) else None for k, p in zip(names, spec, strict=True)},
    )
    key = CLASS_LABELS[measure]
    return [
        v - tolerance - margins.get(f"{key} {k}", 0.0) if _finite(v) else -math.inf
        for k, v in zip(names, values, strict=True)
    ]


def class_values(row: dict, measure: str = "sensitivity") -> list:
    """A row's per-class filled-validation scores: the sensitivities, or every class's Youden's
    J against the rest, sensitivity + specificity - 1 (:func:`feedbackcam.selection.class_scores`;
    None where a part is missing)."""
    sens = row["val_sens_filled"]
    if measure == "sensitivity":
        return list(sens)
    spec = row.get("val_spec_filled")
    if spec is None:
        raise ValueError("Youden's J needs val_spec_filled in the row")
    scores = class_scores(
        {"sensitivity": dict(enumerate(sens)), "specificity": dict(enumerate(spec))}, measure
    )
    return [scores[k] for k in range(len(sens))]


def choose_default(
    rows: list[dict], candidates: tuple[str, ...], tolerance: float = 0.05, seed: int = 0
) -> tuple[str | None, dict[str, dict[str, dict]]]:
    """The rule that picks the default objective, on validation numbers only.

    Per data set, each candidate's main run on the tuning ``seed`` passes if (1) its average
    sensitivity on the filled validation images is within ``tolerance`` of that seed's
    baseline (the collapse guard; confounded validation accuracy for rows written before the
    filled score existed, as in :func:`choose_lambda`) and (2) where the rows have them, every
    class's filled-validation sensitivity is above :func:`class_floors` of the no-confounder
    reference: a default may not trade a class away, the one the shortcut stood for included.
    A default must have run, and passed, on every data set: a user cannot know in advance which
    kind of data theirs is. Among those, the lowest mean validation flip rate wins (data sets
    without a marked confounder on validation, the trap splits, have no flip rate and are left
    out: their masks are keep masks only, and their measure is the reversed-test AUC).
    Returns (the winner or None, {data set: {candidate: {"flip", "score", "floor", "classes",
    "passes"}}}).
    """
    table: dict[str, dict[str, dict]] = {}
    for ds in sorted({r["dataset"] for r in rows}):
        main = [
            r
            for r in rows
            if r["dataset"] == ds
            and r["seed"] == seed
            and r["phase"] == "main"
            and r.get("mask", "ignore") == "ignore"
            and r.get("fraction", 1.0) == 1.0
        ]
        base = next((r for r in main if r["method"] == "baseline"), None)
        if base is None or not _finite(base.get("val_flip")):
            continue  # no baseline, or no marked confounder to flip on (the trap splits)
        ref = next((r for r in main if r["method"] == "no-confounder"), None)
        floors = class_floors(ref, tolerance) if ref and "val_sens_filled" in ref else None
        for method in candidates:
            run = next((r for r in main if r["method"] == method), None)
            if run is None:
                continue
            key = guard_key([run, base])
            floor = base[key] - tolerance
            lost = []
            if floors is not None and "val_sens_filled" in run:
                names = run.get("classes") or [str(k) for k in range(len(floors))]
                lost = [names[k] for k in below_floors(run["val_sens_filled"], floors)]
            table.setdefault(ds, {})[method] = {
                "flip": run["val_flip"],
                "score": run[key],
                "floor": floor,
                "classes": lost,
                "passes": run[key] >= floor - 1e-9 and not lost,
            }
    ok = [m for m in candidates if table and all(m in t and t[m]["passes"] for t in table.values())]
    if not ok:
        return None, table

    def mean_flip(m: str) -> float:
        flips = [t[m]["flip"] for t in table.values()]
        flips = [f for f in flips if _finite(f)]
        return float(np.mean(flips)) if flips else math.inf

    return min(ok, key=mean_flip), table
