"""How much a model relies on each acquisition artifact of a data set.

For every artifact a flags CSV annotates (a ruler, ink, dark corners, a patch...): the model's
accuracy on the images that carry it and on those that do not (a model that reads the artifact
is right more often where it goes with the class, and wrong where it does not); and, where the
data set marks the artifact's pixels (its ignore masks), the counterfactual: the share of
predictions that change when the marked region is filled with the image's skin colour, and to
which class they change. ``feedbackcam evaluate --artifacts FLAGS.csv`` writes it.
"""

from __future__ import annotations

import numpy as np
import torch

from .counterfactual import fill_region_uint8
from .data.dataset import ArrayDataset
from .evaluate import flip_rate, predict_classes
from .self_explaining import SelfExplaining


def artifact_reliance(
    model: SelfExplaining,
    data: ArrayDataset,
    flag_ids: tuple[str, ...],
    flags: dict[str, np.ndarray],
    predicted: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> dict:
    """Per-artifact reliance of ``model`` on ``data`` (see the module docstring).

    Args:
        flag_ids, flags: the annotations (:func:`feedbackcam.data.artifacts.read_artifact_flags`);
            images of ``data`` without a row are left out of the comparisons and counted.
        predicted: the model's predicted class per image of ``data`` (e.g. from ``evaluate``).

    Returns:
        A JSON-ready dict: ``annotated`` / ``not_annotated`` counts; ``artifacts``: per artifact
        ``n_with``, ``n_without``, ``accuracy_with``, ``accuracy_without`` and ``gap`` (with
        minus without; None where a group is empty); and, if ``data`` has ignore masks,
        ``marked``: ``n``, ``flip_rate`` and ``flips_to`` (class -> count) when they are filled.
    """
    where = {k: i for i, k in enumerate(flag_ids)}
    rows = np.array([where.get(k, -1) for k in data.ids], dtype=np.int64)
    annotated = rows >= 0
    correct = np.asarray(predicted) == data.labels
    out: dict = {
        "annotated": int(annotated.sum()),
        "not_annotated": int((~annotated).sum()),
        "artifacts": {},
    }

    def mean(mask: np.ndarray) -> float | None:
        return float(correct[mask].mean()) if mask.any() else None

    for name, values in flags.items():
        has = np.zeros(len(data), bool)
        has[annotated] = np.asarray(values, bool)[rows[annotated]]
        with_it, without = mean(has), mean(annotated & ~has)
        out["artifacts"][name] = {
            "n_with": int(has.sum()),
            "n_without": int((annotated & ~has).sum()),
            "accuracy_with": with_it,
            "accuracy_without": without,
            "gap": None if with_it is None or without is None else with_it - without,
        }
    if data.ignore is not None:
        marked = np.flatnonzero(data.ignore.reshape(len(data), -1).any(1))
        if len(marked):
            after = _filled_predictions(model, data, marked, batch_size, device)
            before = np.asarray(predicted)[marked]
            changed = after != before
            out["marked"] = {
                "n": len(marked),
                "flip_rate": flip_rate(before, after),
                "flips_to": {
                    data.classes[c]: int((after[changed] == c).sum())
                    for c in np.unique(after[changed])
                },
            }
    return out


def _filled_predictions(model, data: ArrayDataset, rows: np.ndarray, batch_size, device):
    """The model's predicted classes on images ``rows`` of ``data`` with their ignore regions
    filled by each image's skin colour (the median outside the region)."""
    filled = fill_region_uint8(data.images[rows], data.ignore[rows])
    return predict_classes(model, filled, batch_size=batch_size, device=device)


def marks_filled(
    model: SelfExplaining,
    data: ArrayDataset,
    predicted: np.ndarray,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, int]] | None:
    """:func:`marked_class_reliance` of ``model`` on the images of ``data`` that carry an
    ignore mark (``has_ignore`` where the set has it), ``predicted`` as they are; None where
    no image is marked."""
    if data.ignore is None:
        return None
    marked = data.ignore.reshape(len(data), -1).any(1)
    if data.has_ignore is not None:
        marked &= np.asarray(data.has_ignore, bool)
    if not marked.any():
        return None
    after = np.array(predicted, copy=True)
    after[marked] = _filled_predictions(model, data, np.flatnonzero(marked), batch_size, device)
    return marked_class_reliance(data.labels, marked, predicted, after, tuple(data.classes))


def marked_class_reliance(
    labels: np.ndarray,
    marked: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    classes: tuple[str, ...],
) -> dict[str, dict[str, int]]:
    """Per class, over its images that carry a "must not matter" mark (boolean ``marked``):
    ``n_marked``, ``recognised`` (predicted as their class as they are, ``before``) and
    ``recognised_filled`` (with the marked region filled, ``after``), and ``only_with_mark``:
    those recognised as they are and not once the mark is filled — the images a class is found
    on by what was marked. Classes without a marked image are left out."""
    labels, marked = np.asarray(labels), np.asarray(marked, bool)
    before, after = np.asarray(before), np.asarray(after)
    out = {}
    for c, name in enumerate(classes):
        rows = marked & (labels == c)
        if not rows.any():
            continue
        hit, hit_filled = before[rows] == c, after[rows] == c
        out[name] = {
            "n_marked": int(rows.sum()),
            "recognised": int(hit.sum()),
            "recognised_filled": int(hit_filled.sum()),
            "only_with_mark": int((hit & ~hit_filled).sum()),
        }
    return out


def reliance_table(report: dict) -> str:
    """The report as a plain-text table, one artifact per line."""

    def pct(v) -> str:
        return "  -  " if v is None else f"{v:5.3f}"

    lines = [
        f"per-artifact reliance ({report['annotated']} annotated images, "
        f"{report['not_annotated']} without a row in the flags)",
        f"{'artifact':<14}{'n with':>8}{'acc with':>10}{'acc without':>13}{'gap':>8}",
    ]
    for name, r in report["artifacts"].items():
        gap = "  -  " if r["gap"] is None else f"{r['gap']:+.3f}"
        lines.append(
            f"{name:<14}{r['n_with']:>8}{pct(r['accuracy_with']):>10}"
            f"{pct(r['accuracy_without']):>13}{gap:>8}"
        )
    if "marked" in report:
        m = report["marked"]
        to = ", ".join(f"{c} {n}" for c, n in m["flips_to"].items()) or "none"
        lines.append(
            f"marked regions filled: {m['n']} images, flip rate {m['flip_rate']:.3f} (to: {to})"
        )
    return "\n".join(lines)
