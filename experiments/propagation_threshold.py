"""The offline scorer's proposal threshold and query expansion, chosen on a development half of
ISIC 2017 and measured on the other half (docs/propagation.md, "The threshold").

The 2,000 images are split in two halves by a fixed seeded permutation. On the development half
(its patched images and its hand masks only), k hand masks (k = 1, 3, 5; six seeded draws each)
propose images from the concept scorer on the offline EfficientNet-Lite0's ``blocks.5``; the
threshold and expansion chosen are the pair of the grid whose mean of min(precision, recall) at
k = 5 is the highest. The test half's draws (its own hand masks, its own images) are scored
once, with every setting of the grid printed and the chosen one named.

With ``--expansion`` the grid also holds query expansion (off, or at 0.8 or 0.9 with 4 or 10
images per mark) and each half is scored as a data set of its own: the scorer sees that half's
features only (its negatives and its expansion come from that half). Without it, the run of
the first version of docs/propagation.md: the whole 2,000 images' features, no expansion.

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


# Query expansion settings of --expansion: (expand_at, images per mark); None: off.
EXPANSIONS = ((None, 0), (0.8, 4), (0.8, 10), (0.9, 4), (0.9, 10))


def rows_of(
    part, patched, masks, features, size, augment=None, expand=None, half_only=False
) -> list[dict]:
    """Precision and recall on the images of ``part`` (bool), marks drawn from its masks.
    ``augment(hand, marks, features)``, if given, returns the (features, marks) to fit on
    instead (extra marked rows appended after the images; scores are read for the images).
    ``expand``: (expand_at, per mark) of :func:`concept_proposals`. ``half_only``: the scorer
    sees the features of ``part``'s images only."""
    own = [i for i in sorted(masks) if part[i]]
    # global image index -> the row the scorer sees
    keep = np.flatnonzero(part) if half_only else np.arange(len(part))
    local = np.full(len(part), -1)
    local[keep] = np.arange(len(keep))
    expand_at, per_mark = expand or (None, 0)
    rows = []
    for k in KS:
        for draw in range(DRAWS):
            hand = np.random.default_rng([draw, k, 7]).choice(own, k, replace=False)
            marks = {int(i): masks[i] for i in hand}
            fit_on = features
            if augment is not None:
                fit_on, marks = augment(hand, marks, features)
            if half_only:
                fit_on = fit_on[torch.from_numpy(keep)]
                marks = {int(local[i]): m for i, m in marks.items()}
            scores = concept_proposals(
                fit_on, marks, size, seed=draw, expand_at=expand_at,
                expand_per_mark=max(per_mark, 1),
            )  # fmt: skip
            rest = np.setdiff1d(np.flatnonzero(part), hand)
            truth = patched[rest]
            for t in GRID:
                chosen = scores.scores[local[rest]] >= t
                tp = int((chosen & truth).sum())
                rows.append(
                    {
                        "expand": list(expand) if expand else None,
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
    p.add_argument(
        "--expansion", action="store_true", help="choose query expansion with the threshold"
    )
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
    expansions = EXPANSIONS if args.expansion else ((None, 0),)
    out = {}
    for name, part in (("development", dev), ("test", ~dev)):
        out[name] = {
            "images": int(part.sum()),
            "patched": int((patched & part).sum()),
            "hand_masks": int(sum(part[i] for i in masks)),
        }
        for expand in expansions:
            label = "off" if expand[0] is None else f"at {expand[0]}, {expand[1]} per mark"
            rows = rows_of(
                part, patched, masks, features, args.size,
                expand=expand if expand[0] is not None else None, half_only=args.expansion,
            )  # fmt: skip
            key = "expansion " + label if args.expansion else None
            entry = {"rows": rows, "summary": summary(rows)}
            if key:
                out[name].setdefault("expansions", {})[key] = {"expand": list(expand), **entry}
            else:
                out[name].update(entry)
            for t in GRID:
                print(name, label, "k=5", t, entry["summary"]["5"][str(t)], flush=True)
        if name == "development":
            fives = (
                {k: e["summary"]["5"] for k, e in out[name]["expansions"].items()}
                if args.expansion
                else {None: out[name]["summary"]["5"]}
            )
            # the best mean of min(precision, recall) from 5 marks; the first of a tie
            chosen = max(
                ((k, t) for k in fives for t in GRID),
                key=lambda c: min(fives[c[0]][str(c[1])]["precision"][0],
                                  fives[c[0]][str(c[1])]["recall"][0]),
            )  # fmt: skip
            out["chosen_threshold"] = chosen[1]
            if args.expansion:
                out["chosen_expansion"] = chosen[0]
            print(f"chosen on the development half: {chosen}", flush=True)
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
