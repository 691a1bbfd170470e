"""Evaluate a self-explaining classifier: classification metrics and explanation Jaccard,
per-image predictions and saliency maps, and counterfactual flips between two versions of a
set (e.g. with an artifact painted in and removed)."""

from __future__ import annotations

import contextlib
import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import cam as cams
from .batchnorm_fold import folded_batchnorm
from .data.dataset import ArrayDataset
from .explain import explain, pooled_activations
from .fileio import write_atomic
from .metrics import (
    ClassificationMetrics,
    JaccardSummary,
    bootstrap_intervals,
    classification_metrics,
    isic_jaccard,
    jaccard_per_image,
)
from .self_explaining import SelfExplaining

# A pass over at least this many images runs BatchNorm folded into the convolutions before it
# (batchnorm_fold: finding and checking the pairs costs two one-image forwards; folding saves up
# to a quarter of EfficientNet-Lite0's forward on a CPU).
FOLD_FROM = 32


@dataclass(frozen=True, eq=False)
class Evaluation:
    classification: ClassificationMetrics
    jaccard: JaccardSummary
    isic_jaccard: float
    probs: np.ndarray  # (N, C)
    explained: np.ndarray  # (N, H, W) bool: the hard-thresholded explanation maps
    labels: np.ndarray  # (N,)
    jaccard_per_image: np.ndarray  # (N,) float, NaN where an image has no mask
    saliency: np.ndarray | None = None  # (N, H, W) uint8, 0-255; only with keep_saliency

    @property
    def avg_sensitivity_classes(self) -> tuple[str, ...]:
        """The classes ``avg_sensitivity`` averages over: those present in the set."""
        return tuple(k for k, v in self.classification.sensitivity().items() if np.isfinite(v))

    @property
    def absent_classes(self) -> tuple[str, ...]:
        """Classes of the model with no image in the set (no sensitivity, not averaged)."""
        present = self.avg_sensitivity_classes
        return tuple(k for k in self.classification.per_class if k not in present)

    def summary(self, *, bootstrap_seed: int | None = None) -> dict:
        """The keys of the thesis' tables: accuracy, sensitivities (and specificities, for the
        per-class guard's Youden's J), mean (SD) Jaccard, n; the
        classes the average sensitivity averages over (and those absent); the share of
        predictions per class; and, given a ``bootstrap_seed``, 95 % bootstrap intervals."""
        c = self.classification
        classes = list(c.per_class)
        pred = self.probs.argmax(axis=1) if len(self.probs) else np.zeros(0, np.int64)
        counts = np.bincount(pred, minlength=len(classes))
        out = {
            "accuracy": c.accuracy,
            "avg_sensitivity": c.avg_sensitivity,
            "avg_sensitivity_classes": list(self.avg_sensitivity_classes),
            "absent_classes": list(self.absent_classes),
            "sensitivity": {k: _json(v) for k, v in c.sensitivity().items()},
            "specificity": {k: _json(m.specificity) for k, m in c.per_class.items()},
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
    keep_saliency: bool = False,
) -> Evaluation:
    """Metrics of ``model`` on ``data``: accuracy, per-class metrics, and the Jaccard of the
    explanation map (saliency >= ``threshold`` of its max) against the feedback masks.

    Args:
        target: ``"predicted"`` explains the predicted class (inference, the default) or
            ``"label"`` the true class.
        keep_saliency: Keep every saliency map (uint8, 0-255) in ``Evaluation.saliency``, for
            `write_saliency_maps`.
    """
    if target not in ("predicted", "label"):
        raise ValueError(f"target: expected 'predicted' or 'label', got {target!r}")
    tensors = data.tensors(device)
    probs, explained, saliency = [], [], []
    with contextlib.ExitStack() as folded:
        for start in range(0, len(data), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(data)))
            batch = tensors.batch(idx.to(device))
            if start == 0 and len(data) >= FOLD_FROM:  # eval mode: BatchNorm folded
                folded.enter_context(folded_batchnorm(model, batch.images))
            out = explain(
                model, batch.images, batch.labels if target == "label" else None, method=method
            )
            probs.append(out.probs.cpu())
            explained.append(cams.hard_threshold(out.saliency, threshold).cpu())
            if keep_saliency:
                saliency.append((out.saliency.float() * 255).round().clamp(0, 255).byte().cpu())
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
        saliency=(torch.cat(saliency).numpy() if saliency else np.zeros(maps.shape, np.uint8))
        if keep_saliency
        else None,
    )


def predict_logits(
    model: SelfExplaining,
    images: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Float logits (N, C) on the CPU, in eval mode and without gradients; restores the
    model's train/eval mode. ``images``: uint8 (N, H, W, 3) (an array, possibly memory-mapped,
    converted a batch at a time) or float (N, 3, H, W) in [0, 1]."""
    return predict_features(model, images, batch_size=batch_size, device=device)[0]


@torch.no_grad()
def predict_features(
    model: SelfExplaining,
    images: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    pooled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`predict_logits`, and from the same forward passes (with ``pooled``) the explanation
    layer's activations averaged over space (N, K), float, on the CPU; else None."""
    was_training = model.training
    model.eval()
    out, pools = [], []
    try:
        with contextlib.ExitStack() as folded:
            for start in range(0, len(images), batch_size):
                part = images[start : start + batch_size]
                if isinstance(part, torch.Tensor):
                    x = part.to(device)
                else:
                    x = torch.from_numpy(np.array(part)).to(device).permute(0, 3, 1, 2)
                    x = x.float() / 255
                if start == 0 and len(images) >= FOLD_FROM:
                    folded.enter_context(folded_batchnorm(model, x))
                result = model(x)
                out.append(result.logits.float().cpu())
                if pooled:
                    pools.append(pooled_activations(result.activations).cpu())
    finally:
        model.train(was_training)
    logits = torch.cat(out) if out else torch.zeros(0, 0)
    if not pooled:
        return logits, None
    return logits, torch.cat(pools) if pools else torch.zeros(0, 0)


def predict_probs(model: SelfExplaining, images: np.ndarray | torch.Tensor, **kw) -> torch.Tensor:
    """Class probabilities (N, C): the softmax of :func:`predict_logits` (same arguments)."""
    return torch.softmax(predict_logits(model, images, **kw), 1)


def predict_classes(
    model: SelfExplaining,
    images: np.ndarray,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Predicted class index per image of uint8 (N, H, W, 3) ``images`` (the argmax of
    :func:`predict_logits`)."""
    logits = predict_logits(model, images, batch_size=batch_size, device=device)
    return logits.argmax(dim=1).numpy() if len(logits) else np.zeros(0, np.int64)


def flip_rate(pred_a, pred_b) -> float:
    """Share of samples whose predicted class differs between two versions of a set (e.g. with
    an artifact and without it); NaN for an empty set."""
    a, b = np.asarray(pred_a).reshape(-1), np.asarray(pred_b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"pred_a and pred_b: expected equal lengths, got {a.shape} and {b.shape}")
    return float((a != b).mean()) if len(a) else float("nan")


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
    kw = {"batch_size": batch_size, "device": device}
    before = predict_classes(model, images, **kw)
    after = predict_classes(model, counterfactuals, **kw)
    return flip_rate(before, after)


def counterfactual_report(
    model: SelfExplaining,
    data: ArrayDataset,
    counterfactual: ArrayDataset,
    *,
    names: tuple[str, str] = ("data", "counterfactual"),
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict:
    """Compare ``model``'s predictions on two versions of the same images (same ids, matched
    by id; e.g. an artifact added or removed).

    Returns a JSON-ready dict: ``flip_rate`` (as `counterfactual_flip_rate`), ``n``,
    ``n_flips``, ``flips`` (predicted class on ``data`` -> predicted class on
    ``counterfactual`` -> count, changed predictions only; the counts sum to ``n_flips``),
    ``flipped_ids``, ``accuracy`` on each set, and ``label_mismatches`` (ids whose label
    differs between the two).

    Raises:
        ValueError: the two sets hold different ids (named by ``names``), differ in image
            size, or in classes.
    """
    a_name, b_name = names
    if tuple(data.classes) != tuple(counterfactual.classes):
        raise ValueError(
            f"{a_name} has classes {data.classes}, {b_name} has {counterfactual.classes}"
        )
    if set(data.ids) != set(counterfactual.ids) or len(data.ids) != len(counterfactual.ids):
        only_a = sorted(set(data.ids) - set(counterfactual.ids))
        only_b = sorted(set(counterfactual.ids) - set(data.ids))
        raise ValueError(
            f"{a_name} and {b_name} must hold the same ids: {len(only_a)} only in {a_name} "
            f"{only_a[:5]}, {len(only_b)} only in {b_name} {only_b[:5]}"
            + ("" if only_a or only_b else " (an id is repeated)")
        )
    if data.images.shape[1:] != counterfactual.images.shape[1:]:
        raise ValueError(
            f"{a_name} images are {data.images.shape[1:]}, {b_name} images "
            f"{counterfactual.images.shape[1:]}; prepare both at the same size"
        )
    position = {ident: i for i, ident in enumerate(counterfactual.ids)}
    other = counterfactual.subset([position[ident] for ident in data.ids])
    kw = {"batch_size": batch_size, "device": device}
    before = predict_classes(model, data.images, **kw)
    after = predict_classes(model, other.images, **kw)
    flips: dict[str, dict[str, int]] = {}
    for i in np.flatnonzero(before != after):
        a, b = data.classes[before[i]], data.classes[after[i]]
        flips.setdefault(a, {})
        flips[a][b] = flips[a].get(b, 0) + 1
    n = len(data)
    return {
        "data": a_name,
        "counterfactual": b_name,
        "n": n,
        "flip_rate": flip_rate(before, after),
        "n_flips": int((before != after).sum()),
        "flips": flips,
        "flipped_ids": [data.ids[i] for i in np.flatnonzero(before != after)],
        "accuracy": {
            a_name: float((before == data.labels).mean()) if n else float("nan"),
            b_name: float((after == other.labels).mean()) if n else float("nan"),
        },
        "label_mismatches": int((data.labels != other.labels).sum()),
    }


# ----------------------------------------------------------------------------- per-image files


def predictions_rows(
    ev: Evaluation, data: ArrayDataset, ignore: np.ndarray | None = None
) -> list[dict]:
    """One row per image: id, label, predicted, ``p_<class>`` per class, ``jaccard`` of the
    explanation against the keep mask (``""`` where the image has no or an empty mask, as
    `metrics.jaccard_per_image` leaves it out) and ``correct`` (1/0).

    With ``ignore`` ((N, H, W) 0/1 "must not matter" masks, `load_prepared_ignore`), a column
    ``ignore_share``: the share of the explanation's pixels on that region (``""`` where the
    mask is empty or nothing is explained).
    """
    if len(ev.probs) != len(data):
        raise ValueError(f"the evaluation has {len(ev.probs)} images, data has {len(data)}")
    if ignore is not None and ignore.shape != ev.explained.shape:
        raise ValueError(f"ignore masks are {ignore.shape}, explanations {ev.explained.shape}")
    scored = data.has_mask & (data.masks.reshape(len(data), -1).max(axis=1) > 0)
    jaccard = dict(zip(np.flatnonzero(scored), ev.jaccard.values))
    predicted = ev.probs.argmax(axis=1)
    rows = []
    for i, ident in enumerate(data.ids):
        row = {
            "id": ident,
            "label": data.classes[data.labels[i]],
            "predicted": data.classes[predicted[i]],
        }
        row |= {f"p_{c}": f"{p:.6f}" for c, p in zip(data.classes, ev.probs[i])}
        row["jaccard"] = f"{jaccard[i]:.6f}" if i in jaccard else ""
        row["correct"] = int(predicted[i] == data.labels[i])
        if ignore is not None:
            explained, drop = ev.explained[i], ignore[i] > 0
            share = (explained & drop).sum() / explained.sum() if explained.any() else None
            row["ignore_share"] = f"{share:.6f}" if share is not None and drop.any() else ""
        rows.append(row)
    return rows


def write_predictions(
    path: str | Path, ev: Evaluation, data: ArrayDataset, ignore: np.ndarray | None = None
) -> Path:
    """Write `predictions_rows` as a CSV (atomically)."""
    rows = predictions_rows(ev, data, ignore)
    fields = ["id", "label", "predicted", *(f"p_{c}" for c in data.classes), "jaccard", "correct"]
    fields += ["ignore_share"] if ignore is not None else []

    def write(f):
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

    return write_atomic(path, write, binary=False)


def safe_file_name(ident: str) -> str:
    """An id as a file name: characters other than letters, digits, ``.``, ``_`` and ``-``
    become ``_`` (ids come from file names or CSVs and may hold anything)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", ident).lstrip(".")
    return name or "_"


def write_saliency_maps(folder: str | Path, ev: Evaluation, ids: Sequence[str]) -> list[Path]:
    """Write each saliency map as an 8-bit grayscale PNG ``folder/<id>.png`` (0 = none,
    255 = the map's maximum), at the evaluated size.

    Raises:
        ValueError: ``ev`` was made without ``keep_saliency=True``, or ids and maps disagree.
    """
    if ev.saliency is None:
        raise ValueError("the evaluation kept no saliency maps; call evaluate(keep_saliency=True)")
    if len(ids) != len(ev.saliency):
        raise ValueError(f"{len(ids)} ids for {len(ev.saliency)} saliency maps")
    names = [safe_file_name(i) for i in ids]
    if len(set(names)) != len(names):
        raise ValueError("two ids map to the same file name; rename them")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, saliency in zip(names, ev.saliency):
        path = folder / f"{name}.png"
        write_atomic(path, lambda f, s=saliency: Image.fromarray(s).save(f, "PNG"))
        paths.append(path)
    return paths
