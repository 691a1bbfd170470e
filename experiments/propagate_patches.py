"""Propagation measured on the real coloured patches of ISIC 2017 (docs/propagation.md).

From k hand masks (k = 1, 5, 25 of the 25 patch masks; seeded draws), each scorer of
:mod:`feedbackcam.propagate` scores all 2,000 images:
- image level: precision and recall of the proposed images against the 121 patched ids
  (``artifact_lists.json``), the marked images left out of both;
- localisation: IoU of the proposed mask with the hand mask on the masked images that were not
  marks (k = 25: leave-one-out, 25 fits).
Rulers and skin markers have image-level lists but no pixel masks, so no strokes to start from:
not measured here.

With ``--rounds R``: the app's "Find more like these" instead (outlined scorer, k = 1 and 5):
a reviewer accepts each round's new proposals that are patched images (where a hand mask
exists, only at IoU >= 0.5 with it; the other 96 patched images have no mask to check the
outline against), the next round fits on ``propagate.round_marks`` of the hand marks and the
accepted, leaving out what was reviewed; the chain stops after a round that accepts nothing.

    python experiments/propagate_patches.py --isic-root ../shared/data/isic2017-256 \\
        --cache /tmp/isic256 --json docs/propagation/patches.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from feedbackcam.fileio import write_json
from feedbackcam.propagate import (
    LITE0_EXPAND_AT,
    LITE0_LAYER,
    LITE0_THRESHOLD,
    OUTLINE_FEATURES,
    colour_proposals,
    concept_proposals,
    iou,
    offline_features,
    outlined_masks,
    review_rounds,
)
from feedbackcam.shortcuts.data import isic_arrays
from feedbackcam.shortcuts.isic_real import read_annotations


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--isic-root", required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--draws", type=int, default=3, help="seeded draws of the k marks (k < 25)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scorers", nargs="+", default=["concept", "colour", "outlined"])
    p.add_argument("--features-cache", type=Path, default=None, help="a .pt file, reused")
    p.add_argument(
        "--threshold",
        type=float,
        default=LITE0_THRESHOLD,
        help="propose at this score (default: the offline network's, as the command does)",
    )
    p.add_argument(
        "--expand-at",
        type=float,
        default=LITE0_EXPAND_AT,
        help="the concept scorer's query expansion (default: the offline network's, as the "
        "command does; a value above 1 turns it off)",
    )
    p.add_argument(
        "--outline-features",
        default=OUTLINE_FEATURES,
        choices=["colour", "appearance"],
        help="what the outlined scorer outlines with (propagate.pixel_features)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="measure chains of at most this many rounds of review instead (k = 1 and 5)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = isic_arrays(args.isic_root, args.size, str(args.cache))
    lists, by_id, _, _ = read_annotations(str(Path(args.isic_root) / "artifacts"), args.size)
    index = {k: i for i, k in enumerate(data.ids)}
    patched = np.zeros(len(data), bool)
    patched[[index[k] for k in lists["patch"] if k in index]] = True
    masks = {index[k]: m for k, m in by_id.items()}
    masked = np.array(sorted(masks))
    features = offline_features(data.images, args.features_cache)
    grow = args.size // features.shape[-1]
    expand_at = args.expand_at if args.expand_at <= 1 else None
    print(f"features {tuple(features.shape)} in {time.perf_counter() - started:.0f} s")

    def score(kind: str, marks: dict[int, np.ndarray], seed: int):
        """Scores of every image (outlined: the concept's, which it keeps)."""
        if kind in ("concept", "outlined"):
            return concept_proposals(features, marks, args.size, seed=seed, expand_at=expand_at)
        return colour_proposals(data.images, marks, seed=seed)

    def masks_of(kind, marks: dict[int, np.ndarray], which, seed: int, props=None) -> list:
        """The proposed masks of the images ``which`` (outlined: only these are outlined)."""
        props = props or score(kind, marks, seed)
        if kind != "outlined":
            return [props.masks()[i] for i in which]
        return list(
            outlined_masks(
                props, data.images, marks, which, grow, seed=seed, features=args.outline_features
            )
        )

    def chain(hand: list[int], seed: int) -> dict:
        review = review_rounds(
            features, data.images, {i: masks[i] for i in hand}, accept_patched,
            threshold=args.threshold, expand_at=expand_at, rounds=args.rounds, seed=seed,
            outline=args.outline_features,
        )  # fmt: skip
        per_round = review.per_round(patched, "patched")
        others = int(patched.sum()) - len(hand)
        found = sum(p.get("patched", 0) for p in per_round)
        proposed = sum(p["proposed"] for p in per_round)
        return {
            "rounds": per_round,
            "proposed": proposed,
            "precision": round(found / max(proposed, 1), 4),
            "recall": round(found / others, 4),
            "accepted": len(review.accepted),
            "recall_accepted": round(len(review.accepted) / others, 4),
            "clicks": review.clicks,
        }

    def accept_patched(i: int, m: np.ndarray) -> bool:
        """The reviewer: a patched image, outlined at IoU >= 0.5 where a hand mask exists."""
        return bool(patched[i] and m.any() and (i not in masks or iou(m, masks[i]) >= 0.5))

    results = []
    if args.rounds:
        for k in (1, 5):
            for draw in range(args.draws):
                rng = np.random.default_rng([draw, k])
                hand = [int(i) for i in rng.choice(masked, k, replace=False)]
                row = {"scorer": "outlined", "k": k, "draw": draw}
                row.update(chain(hand, draw))
                print(json.dumps(row), flush=True)
                results.append(row)
        args.scorers = []

    for kind in args.scorers:
        for k in (1, 5, 25):
            draws = 1 if k == len(masked) else args.draws
            for draw in range(draws):
                rng = np.random.default_rng([draw, k])
                marks_idx = rng.choice(masked, k, replace=False)
                props = score(kind, {i: masks[i] for i in marks_idx}, draw)
                rest = np.setdiff1d(np.arange(len(data)), marks_idx)
                chosen = props.proposed(args.threshold)[rest]
                truth = patched[rest]
                tp = int((chosen & truth).sum())
                precision = tp / max(int(chosen.sum()), 1)
                recall = tp / max(int(truth.sum()), 1)
                # ranking quality, threshold-free: recall among the top len(truth) scores
                top = rest[np.argsort(-props.scores[rest])[: int(truth.sum())]]
                r_precision = float(patched[top].mean())
                held = np.setdiff1d(masked, marks_idx)
                if k == len(masked):  # leave one out: each mask predicted from the other 24
                    ious = []
                    for i in masked:
                        others = {j: masks[j] for j in masked if j != i}
                        ious.append(iou(masks_of(kind, others, [i], draw)[0], masks[i]))
                else:
                    got = masks_of(kind, {i: masks[i] for i in marks_idx}, held, draw, props)
                    ious = [iou(m, masks[i]) for m, i in zip(got, held, strict=True)]
                row = {
                    "scorer": kind,
                    "k": k,
                    "draw": draw,
                    "proposed": int(chosen.sum()),
                    "precision": round(precision, 4),
                    "recall": round(recall, 4),
                    "r_precision": round(r_precision, 4),
                    "mean_iou": round(float(np.mean(ious)), 4),
                    "n_iou": len(ious),
                }
                print(json.dumps(row), flush=True)
                results.append(row)
    out = {
        "rows": results,
        "threshold": args.threshold,
        "expand_at": expand_at,
        "layer": LITE0_LAYER,
        "size": args.size,
        "n_images": len(data),
        "n_patched": int(patched.sum()),
        "seconds": round(time.perf_counter() - started, 1),
        "threads": args.threads,
        "outline_features": args.outline_features,
        "rounds": args.rounds,
    }
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
