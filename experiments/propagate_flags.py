"""Rulers and skin markers have image-level lists but no pixel masks (docs/propagation.md,
"From image flags"). How well do k images *flagged* as carrying the artifact (no stroke) find
the others? Measured for the patch (where strokes exist, as a comparison), the ruler and the
skin marker, on the development and the test half of ISIC 2017 (the split of
experiments/propagation_threshold.py), with two image-level scorers on the offline
EfficientNet-Lite0's ``blocks.5``:

- ``pooled``: a logistic regression (classes balanced) on each image's max- and mean-pooled
  L2-normalised activation vectors, k flagged images against 200 unflagged ones (seeded).
- ``mil``: multiple-instance learning, as the concept scorer but without a mask: every cell of
  a flagged image starts as a positive, then three times the classifier is refitted on the
  quarter of each flagged image's cells it scores highest (the artifact is somewhere in the
  image, not everywhere); the image's score is its highest cell's.

Threshold-free: R-precision (the share of flagged images among as many top-ranked images as
there are), and the precision / recall at 0.5 for reference. Marks are drawn from the half's own
flagged images; the other images of the half are scored.

    python experiments/propagate_flags.py --isic-root ../shared/data/isic2017-256 \\
        --cache /tmp/isic256 --features-cache FEATS.pt --json docs/propagation/flags.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from propagation_threshold import SPLIT_SEED  # the same development and test halves
from sklearn.linear_model import LogisticRegression

from feedbackcam.fileio import write_json
from feedbackcam.propagate import LITE0_LAYER, NEGATIVE_IMAGES, offline_features
from feedbackcam.shortcuts.data import isic_arrays
from feedbackcam.shortcuts.isic_real import read_annotations

ARTIFACTS = ("patch", "ruler", "skin_marker")
KS = (1, 5, 25)
DRAWS = 4
MIL_TOP = 0.25
MIL_ROUNDS = 3


def _negatives(n: int, flagged: np.ndarray, seed: int) -> np.ndarray:
    others = np.setdiff1d(np.arange(n), flagged)
    return np.random.default_rng(seed).choice(others, NEGATIVE_IMAGES, replace=False)


def _fit(x: np.ndarray, y: np.ndarray) -> LogisticRegression:
    return LogisticRegression(class_weight="balanced", max_iter=2000).fit(x, y)


def pooled_scores(cells: np.ndarray, flagged: np.ndarray, seed: int) -> np.ndarray:
    """(N,) scores from ``cells`` (N, h*w, K) L2-normalised: max- and mean-pooled vectors."""
    pooled = np.concatenate([cells.max(1), cells.mean(1)], 1)
    neg = _negatives(len(cells), flagged, seed)
    y = np.r_[np.ones(len(flagged)), np.zeros(len(neg))]
    return _fit(pooled[np.r_[flagged, neg]], y).predict_proba(pooled)[:, 1]


def mil_scores(cells: np.ndarray, flagged: np.ndarray, seed: int) -> np.ndarray:
    """(N,) scores: the highest cell's probability after multiple-instance refits."""
    n, m, k = cells.shape
    neg = cells[_negatives(n, flagged, seed)].reshape(-1, k)
    bags = cells[flagged]
    chosen = bags.reshape(-1, k)
    top = max(1, int(MIL_TOP * m))
    for _ in range(MIL_ROUNDS):
        clf = _fit(np.concatenate([chosen, neg]), np.r_[np.ones(len(chosen)), np.zeros(len(neg))])
        p = clf.predict_proba(bags.reshape(-1, k))[:, 1].reshape(len(flagged), m)
        best = np.argsort(-p, 1)[:, :top]
        chosen = np.concatenate([bags[i, best[i]] for i in range(len(flagged))])
    return clf.predict_proba(cells.reshape(-1, k))[:, 1].reshape(n, m).max(1)


SCORERS = {"pooled": pooled_scores, "mil": mil_scores}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--isic-root", required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--features-cache", type=Path, default=None, help="a .pt file, reused")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = isic_arrays(args.isic_root, args.size, str(args.cache))
    lists, _, _, _ = read_annotations(str(Path(args.isic_root) / "artifacts"), args.size)
    index = {k: i for i, k in enumerate(data.ids)}
    n = len(data)
    features = offline_features(data.images, args.features_cache)
    k_ = features.shape[1]
    cells = F.normalize(features, dim=1).permute(0, 2, 3, 1).reshape(n, -1, k_).numpy()
    dev = np.random.default_rng(SPLIT_SEED).permutation(n) < n // 2
    rows = []
    for half, part in (("development", dev), ("test", ~dev)):
        for artifact in ARTIFACTS:
            truth = np.zeros(n, bool)
            truth[[index[i] for i in lists[artifact] if i in index]] = True
            own = np.flatnonzero(truth & part)
            for k in KS:
                for draw in range(DRAWS):
                    flagged = np.random.default_rng([draw, k, 11]).choice(own, k, replace=False)
                    rest = np.setdiff1d(np.flatnonzero(part), flagged)
                    positives = int(truth[rest].sum())
                    for name, scorer in SCORERS.items():
                        s = scorer(cells, flagged, draw)
                        top = rest[np.argsort(-s[rest], kind="stable")[:positives]]
                        chosen = s[rest] >= 0.5
                        tp = int((chosen & truth[rest]).sum())
                        row = {
                            "half": half,
                            "artifact": artifact,
                            "k": k,
                            "draw": draw,
                            "scorer": name,
                            "with_artifact": positives,
                            "scored": len(rest),
                            "r_precision": round(float(truth[top].mean()), 4),
                            "precision_at_0.5": round(tp / max(int(chosen.sum()), 1), 4),
                            "recall_at_0.5": round(tp / positives, 4),
                        }
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    out = {
        "rows": rows,
        "layer": LITE0_LAYER,
        "size": args.size,
        "split_seed": SPLIT_SEED,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {args.threads} torch thread(s), 2-core CPU",
    }
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
