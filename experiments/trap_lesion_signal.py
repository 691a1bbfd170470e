"""Why "decide from the lesion" does not undo the ruler trap (docs/real-artifacts.md, trap
splits): does the *lesion region itself* tell which images carry a ruler (or ink, dark corners)?

If a linear probe on the lesion alone — everything outside the dilated lesion mask painted one
grey — predicts the artifact flag well above chance, the artifact's images differ inside the
lesion too (the clinic, camera, lighting and magnification that come with rulers), and no
feedback that only changes the surroundings can remove that signal: on a trap split it goes
with the class as the ruler does. Views of each of the 1,800 annotated ISIC 2017 images, offline
ImageNet EfficientNet-Lite0 ``blocks.5`` activations (mean- and max-pooled), a 5-fold
cross-validated logistic regression per flag, ROC AUC:

- ``whole``: the image as it is;
- ``lesion``: outside the lesion mask dilated by 9 px (3.5 % of the side, the benchmark's
  surroundings margin) painted grey;
- ``surroundings``: the dilated lesion painted grey;
- ``lesion, colour-constant``: the lesion view after Shades-of-Grey colour constancy (p = 6,
  Finlayson & Trezzi 2004; the usual ISIC preprocessing), which removes a global colour cast;
- ``mask geometry``: the lesion mask's area, centroid and bounding box only (magnification and
  framing, without pixels).

The melanoma-vs-benign label is probed the same way for reference, and each flag also within
the benign and within the melanoma images (so that a view cannot find the flag through the
diagnosis it correlates with).

Then the trap splits themselves (``isic-trap-*``, the benchmark's own seeded splits): a probe of
melanoma vs benign trained on the trap's training images and one trained on its correlation-free
split, each on every view, scored on the reversed test. The ``lesion`` view's trap probe is what
a model that decides from the lesion alone — the ideal "decide from the lesion" asks for — can
reach on these features. And what the *flag* can do instead of a keep mask: the trap probe on
features with the flag's direction projected out (P-ClArC's direction: the difference of the
mean standardised features of the flagged and unflagged training images), and with 20
directions that predict the flag removed one after another (iterative nullspace projection,
Ravfogel et al. 2020), both fitted on the trap's training images only.

    python experiments/trap_lesion_signal.py --isic-root ../shared/data/isic2017-256 \\
        --cache /tmp/isic256 --features-cache VIEWS.npz \\
        --json docs/shortcuts/isic-trap/lesion_signal.json
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
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from feedbackcam.fileio import write_json
from feedbackcam.propagate import LITE0_LAYER, offline_features
from feedbackcam.shortcuts.data import isic_arrays
from feedbackcam.shortcuts.isic_real import (
    TRAP_ARTIFACTS,
    flags_of,
    read_annotations,
    trap_flag,
    trap_indices,
)

FLAGS = ("ruler", "ink", "dark_corner", "gel_border", "gel_bubble")
INLP_STEPS = 20
MARGIN = 9  # px at 256: the benchmark's dilation of the lesion mask
GREY = 128


def dilate(masks: np.ndarray, px: int) -> np.ndarray:
    m = torch.from_numpy(masks.astype(np.float32))[:, None]
    return F.max_pool2d(m, 2 * px + 1, stride=1, padding=px)[:, 0].numpy() > 0


def shades_of_grey(images: np.ndarray, p: float = 6.0) -> np.ndarray:
    """Shades-of-Grey colour constancy per image: each channel scaled so that the image's
    p-norm illuminant estimate is neutral."""
    x = images.astype(np.float64) / 255.0
    light = np.power(np.mean(np.power(x, p), axis=(1, 2)), 1 / p)  # (N, 3)
    light = light / np.linalg.norm(light, axis=1, keepdims=True) * np.sqrt(3)
    return np.clip(x / light[:, None, None, :] * 255.0, 0, 255).astype(np.uint8)


def geometry(masks: np.ndarray) -> np.ndarray:
    n, h, w = masks.shape
    yy, xx = np.mgrid[:h, :w]
    out = []
    for m in masks.astype(bool):
        ys, xs = yy[m], xx[m]
        out.append([m.mean(), ys.mean() / h, xs.mean() / w, ys.min() / h, ys.max() / h,
                    xs.min() / w, xs.max() / w])  # fmt: skip
    return np.array(out)


def _classifier():
    return make_pipeline(
        StandardScaler(), LogisticRegression(class_weight="balanced", C=0.1, max_iter=3000)
    )


def probe(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """5-fold cross-validated ROC AUC of a logistic regression (standardised, balanced)."""
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    p = cross_val_predict(_classifier(), x, y, cv=folds, method="predict_proba")[:, 1]
    return round(float(roc_auc_score(y, p)), 3)


def trap_probe(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """ROC AUC on ``test`` of a logistic regression fitted on ``train``."""
    p = _classifier().fit(x[train], y[train]).predict_proba(x[test])[:, 1]
    return round(float(roc_auc_score(y[test], p)), 3)


def _without(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    v = v / np.linalg.norm(v)
    return x - np.outer(x @ v, v)


def flag_removed(x: np.ndarray, flag: np.ndarray, train: np.ndarray) -> dict[str, np.ndarray]:
    """``x`` standardised on ``train``, then with the flag's mean-difference direction projected
    out ("p_clarc") or 20 flag-predicting directions removed in turn ("inlp")."""
    x = StandardScaler().fit(x[train]).transform(x)
    f = flag[train]
    mean_difference = _without(x, x[train][f].mean(0) - x[train][~f].mean(0))
    nullspace = x
    for _ in range(INLP_STEPS):
        fit = LogisticRegression(class_weight="balanced", C=0.1, max_iter=3000)
        nullspace = _without(nullspace, fit.fit(nullspace[train], f).coef_[0])
    return {"p_clarc": mean_difference, "inlp": nullspace}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--isic-root", required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--features-cache", type=Path, default=None, help="an .npz file, reused")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = isic_arrays(args.isic_root, 256, str(args.cache))
    _, _, flag_ids, flags = read_annotations(str(Path(args.isic_root) / "artifacts"), 256)
    every = flags_of(data.ids, flag_ids, flags)
    keep = np.flatnonzero(every.pop("annotated"))
    images = np.asarray(data.images)[keep]
    lesion = dilate(np.asarray(data.masks)[keep] > 0, MARGIN)
    mel = np.asarray(data.labels)[keep] == data.classes.index("MEL")

    def pooled(view: np.ndarray) -> np.ndarray:
        a = offline_features(view)  # the propagation's features, of this view
        return torch.cat([a.mean((2, 3)), a.amax((2, 3))], 1).numpy()

    if args.features_cache is not None and args.features_cache.exists():
        views = dict(np.load(args.features_cache))
    else:
        grey = np.full_like(images, GREY)
        views = {
            "whole": pooled(images),
            "lesion": pooled(np.where(lesion[..., None], images, grey)),
            "surroundings": pooled(np.where(lesion[..., None], grey, images)),
            "lesion, colour-constant": pooled(
                np.where(lesion[..., None], shades_of_grey(images), grey)
            ),
            "mask geometry": geometry(np.asarray(data.masks)[keep] > 0),
        }
        if args.features_cache is not None:
            np.savez(args.features_cache, **views)
    targets = {name: every[name][keep] for name in FLAGS}
    targets["melanoma (label)"] = mel
    rows = []
    for target, y in targets.items():
        groups = {"all": np.ones(len(y), bool)}
        if target != "melanoma (label)":
            groups.update({"benign": ~mel, "melanoma": mel})
        for group, where in groups.items():
            yy = y[where].astype(int)
            row = {"target": target, "within": group, "positives": int(yy.sum()), "images": len(yy)}
            for view, x in views.items():
                row[view] = probe(x[where], yy)
            rows.append(row)
            print(json.dumps(row), flush=True)
    traps = []
    for artifact in TRAP_ARTIFACTS:
        has = trap_flag(artifact, {n: f[keep] for n, f in every.items()})
        for seed in args.seeds:
            split = trap_indices(mel.astype(np.int64), has, seed)
            row = {"trap": artifact, "seed": seed, "train": len(split["train"]),
                   "test": len(split["test"])}  # fmt: skip
            for view, x in views.items():
                row[f"{view}: trap"] = trap_probe(x, mel, split["train"], split["test"])
                row[f"{view}: free"] = trap_probe(x, mel, split["free"], split["test"])
            for view in ("whole", "lesion"):
                removed = flag_removed(views[view], has, split["train"])
                for how, x in removed.items():
                    row[f"{view}: trap, {how}"] = trap_probe(x, mel, split["train"], split["test"])
            traps.append(row)
            print(json.dumps(row), flush=True)
    out = {
        "rows": rows,
        "traps": traps,
        "layer": LITE0_LAYER,
        "margin_px": MARGIN,
        "size": 256,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {args.threads} torch thread(s), 2-core CPU",
    }
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
