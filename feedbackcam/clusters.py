"""Explanation clusters: what a model's decisions rest on, grouped, before anyone marks anything.

After SpRAy (Lapuschkin et al., "Unmasking Clever Hans predictors", 2019): within each predicted
class, the explanation maps are pooled to a small grid, normalised to sum 1, and grouped by
spectral clustering on a nearest-neighbour graph; a group of images whose maps sit on the same
off-lesion spot is a strategy ("this class is decided by a corner patch") that one look at its
typical images shows. Clusters are ranked by their images' mean suspicion score
(:mod:`feedbackcam.suspicion`), so the strategies worth a look come first; nothing here reads a
label.

``features="activations"`` clusters the explanation layer's spatially pooled activations instead
of the maps (what the network sees rather than where it looks). :func:`write_sheet` draws the
clusters for a person to look at.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .explain import explain
from .report import cluster_sheet
from .self_explaining import SelfExplaining

FEATURES = ("maps", "activations")
DEFAULT_CLUSTERS = 4  # per predicted class
GRID = 8  # maps are pooled to GRID x GRID before clustering
NEIGHBOURS = 10


def map_features(saliency: Tensor, grid: int = GRID) -> np.ndarray:
    """(N, grid * grid) explanation maps ((N, h, w) tensor or array, any h, w) pooled to a grid,
    each normalised to sum 1 (an all-zero map stays zero)."""
    maps = torch.as_tensor(np.asarray(saliency), dtype=torch.float32).clamp_min(0)
    pooled = F.adaptive_avg_pool2d(maps[:, None], grid).flatten(1)
    return (pooled / pooled.sum(1, keepdim=True).clamp_min(1e-12)).numpy()


def cluster_labels(features: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(N,) cluster of each row: spectral clustering on the symmetrised ``NEIGHBOURS``-nearest-
    neighbour graph (SpRAy's choice); fewer rows than 3 per cluster give fewer clusters, one
    row one cluster."""
    from sklearn.cluster import SpectralClustering

    n = len(features)
    k = min(k, n // 3)
    if k < 2:
        return np.zeros(n, np.int64)
    model = SpectralClustering(
        k,
        affinity="nearest_neighbors",
        n_neighbors=min(NEIGHBOURS, n - 1),
        random_state=seed,
        assign_labels="cluster_qr",
    )
    return model.fit_predict(features).astype(np.int64)


@dataclass(frozen=True)
class Clusters:
    """``labels``: (N,) cluster id of each image; ``ranked``: cluster ids, most suspicious first;
    ``classes``: the predicted class of each cluster; ``suspicion``: each cluster's mean
    suspicion score; ``members``: the images of each cluster, most suspicious first."""

    labels: np.ndarray
    ranked: list[int]
    classes: dict[int, int]
    suspicion: dict[int, float]
    members: dict[int, np.ndarray]

    def purity(self, flags: np.ndarray, cluster: int | None = None) -> float:
        """Share of ``flags`` (bool (N,), e.g. "carries the patch") in a cluster (the top
        one by default): the measure, not the method, reads labels."""
        c = self.ranked[0] if cluster is None else cluster
        return float(np.asarray(flags, bool)[self.members[c]].mean())


def explanation_clusters(
    features: np.ndarray,
    predicted: np.ndarray,
    score: np.ndarray,
    *,
    k: int = DEFAULT_CLUSTERS,
    seed: int = 0,
) -> Clusters:
    """Cluster ``features`` (N, D) within each predicted class (``predicted``: (N,) ints), ``k``
    clusters per class, and rank the clusters by the mean of ``score`` (N,; the suspicion)."""
    features = np.asarray(features, np.float64)
    predicted = np.asarray(predicted)
    score = np.asarray(score, np.float64)
    if not len(features) == len(predicted) == len(score):
        raise ValueError(
            f"features ({len(features)}), predicted ({len(predicted)}) and score "
            f"({len(score)}) must have one row per image"
        )
    labels = np.full(len(features), -1, np.int64)
    classes, next_id = {}, 0
    for c in np.unique(predicted):
        rows = np.flatnonzero(predicted == c)
        local = cluster_labels(features[rows], k, seed)
        for j in np.unique(local):
            labels[rows[local == j]] = next_id
            classes[next_id] = int(c)
            next_id += 1
    members, means = {}, {}
    for c in classes:
        rows = np.flatnonzero(labels == c)
        members[c] = rows[np.argsort(-score[rows], kind="stable")]
        means[c] = float(score[rows].mean())
    ranked = sorted(classes, key=lambda c: (-means[c], c))
    return Clusters(labels, ranked, classes, means, members)


def write_sheet(
    model: SelfExplaining,
    images: np.ndarray,
    keep: np.ndarray | None,
    found: Clusters,
    classes: Sequence[str],
    path: Path,
    *,
    clusters: int = 8,
    per_row: int = 6,
    note: Callable[[int], str] | None = None,
) -> Path:
    """The picture of the ``clusters`` most suspicious clusters (:func:`report.cluster_sheet`):
    a row per cluster, titled "#rank class: n images, suspicion s" (and ``note(cluster)``), of
    its ``per_row`` most suspicious images with their saliency, computed here for those images
    only, and their keep masks. ``images``: uint8 (N, H, W, 3) at the model's input size."""
    shown = [(c, found.members[c][:per_row]) for c in found.ranked[:clusters]]
    flat = np.concatenate([m for _, m in shown])
    x = torch.from_numpy(np.ascontiguousarray(images[flat])).permute(0, 3, 1, 2).float() / 255
    device = next(model.parameters()).device
    maps = explain(model, x.to(device)).saliency.cpu().numpy()
    rows = []
    for rank, (c, members) in enumerate(shown, 1):
        title = (
            f"#{rank} {classes[found.classes[c]]}: {len(found.members[c])} images, "
            f"suspicion {found.suspicion[c]:.2f}"
        )
        rows.append((title + (f"; {note(c)}" if note else ""), list(members)))
    return cluster_sheet(images, maps, keep, rows, path, per_row=per_row)
