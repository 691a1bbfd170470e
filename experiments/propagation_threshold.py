"""The offline scorer's proposal threshold, chosen on a development half of ISIC 2017 and
measured on the other half (docs/propagation.md, "The threshold").

The 2,000 images are split in two halves by a fixed seeded permutation. On the development half
(its patched images and its hand masks only), k hand masks (k = 1, 3, 5; six seeded draws each)
propose images from the concept scorer on the offline EfficientNet-Lite0's ``blocks.5``; the
threshold chosen is the one of the grid whose mean of min(precision, recall) at k = 5 is the
highest. The test half's draws (its own hand masks, its own images) are scored once, with every
threshold of the grid printed and the chosen one named.

    python experiments/propagation_threshold.py --isic-root ../shared/data/isic2017-256 \\
        --cache /tmp/isic256 --features-cache FEATS.pt --json docs/propagation/threshold.json
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from feedbackcam.fileio import write_json
from feedbackcam.propagate import LITE0_LAYER, concept_proposals, offline_features
from feedbackcam.shortcuts.data import isic_arrays
from feedbackcam.shortcuts.isic_real import read_annotations

GRID = (0.5, 0.6, 0.7, 0.8, 0.9)
KS = (1, 3, 5)
DRAWS = 6
SPLIT_SEED = 2026


def rows_of(part, patched, masks, features, size, augment=None) -> list[dict]:
    """Precision and recall on the images of ``part`` (bool), marks drawn from its masks.
    ``augment(hand, marks, features)``, if given, returns the (features, marks) to fit on
    instead (extra marked rows appended after the images; scores are read for the images)."""
    own = [i for i in sorted(masks) if part[i]]
    rows = []
    for k in KS:
        for draw in range(DRAWS):
            hand = np.random.default_rng([draw, k, 7]).choice(own, k, replace=False)
            marks = {int(i): masks[i] for i in hand}
            fit_on = features
            if augment is not None:
                fit_on, marks = augment(hand, marks, features)
            scores = concept_proposals(fit_on, marks, size, seed=draw)
            rest = np.setdiff1d(np.flatnonzero(part), hand)
            truth = patched[rest]
            for t in GRID:
                chosen = scores.scores[rest] >= t
                tp = int((chosen & truth).sum())
                rows.append(
                    {
                        "k": k,
                        "draw": draw,
                        "threshold": t,
                        "proposed": int(chosen.sum()),
                        "precision": round(tp / max(int(chosen.sum()), 1), 4),
                        "recall": round(tp / int(truth.sum()), 4),
                    }
                )
    return rows


def summary(rows: list[dict]) -> dict:
    """{k: {threshold: mean/SD/min of precision and recall}}."""
    out = {}
    for k in KS:
        for t in GRID:
            sel = [r for r in rows if r["k"] == k and r["threshold"] == t]
            p = np.array([r["precision"] for r in sel])
            r_ = np.array([r["recall"] for r in sel])
            out.setdefault(str(k), {})[str(t)] = {
                "precision": [round(float(p.mean()), 3), round(float(p.std(ddof=1)), 3)],
                "recall": [round(float(r_.mean()), 3), round(float(r_.std(ddof=1)), 3)],
                "min_precision": round(float(p.min()), 3),
                "min_recall": round(float(r_.min()), 3),
                "both_at_least_0.9": int(((p >= 0.9) & (r_ >= 0.9)).sum()),
                "draws": len(sel),
            }
    return out


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
    lists, by_id, _, _ = read_annotations(str(Path(args.isic_root) / "artifacts"), args.size)
    index = {k: i for i, k in enumerate(data.ids)}
    n = len(data)
    patched = np.zeros(n, bool)
    patched[[index[k] for k in lists["patch"] if k in index]] = True
    masks = {index[k]: m for k, m in by_id.items()}
    features = offline_features(data.images, args.features_cache)
    dev = np.random.default_rng(SPLIT_SEED).permutation(n) < n // 2
    out = {}
    for name, part in (("development", dev), ("test", ~dev)):
        rows = rows_of(part, patched, masks, features, args.size)
        out[name] = {
            "images": int(part.sum()),
            "patched": int((patched & part).sum()),
            "hand_masks": int(sum(part[i] for i in masks)),
            "rows": rows,
            "summary": summary(rows),
        }
        if name == "development":
            five = out[name]["summary"]["5"]
            chosen = max(
                GRID, key=lambda t: min(five[str(t)]["precision"][0], five[str(t)]["recall"][0])
            )
            out["chosen_threshold"] = chosen
            print(f"chosen on the development half: {chosen}", flush=True)
        for t in GRID:
            s = out[name]["summary"]["5"][str(t)]
            print(name, "k=5", t, s, flush=True)
    out.update(
        {
            "layer": LITE0_LAYER,
            "size": args.size,
            "split_seed": SPLIT_SEED,
            "seconds": round(time.perf_counter() - started, 1),
            "machine": f"{platform.machine()}, {args.threads} torch thread(s), 2-core CPU",
        }
    )
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
