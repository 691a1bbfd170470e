"""Five hand marks and "Find more like these" on the real patches, end to end (isic-real).

The benchmark's ``isic-real`` fine-tunes the model trained on ISIC 2017 as downloaded on a pool
of its own training images with the clinician's patch masks as ignore strokes (all 25, or the 5
of ``--fractions 0.2``). Here the 5 are the same five, and the app's workflow adds the rest: the
offline network's proposals on the pool (256 px, its threshold and query expansion), reviewed
in rounds (``propagate.round_marks``; a reviewer accepts a proposed image that carries a real
patch, where a hand mask exists only at IoU >= 0.5 with it, and stops after a round that accepts
nothing). The fine-tuning is the benchmark's (the default objective, lambda 0.9, the epoch
chosen by the per-class guard as ``--select-epoch`` does, the same seeds), from the benchmark's
baselines in ``BENCH/models``; the rows to compare with are that folder's ``runs.jsonl``.

    python experiments/isic_real_propagated.py --bench BENCH --seeds 0 1 2 \\
        --isic-root ISIC2017_FOLDER --features FEATS.pt --features-root ISIC256_PREPARED \\
        --json docs/propagation/isic_real_propagated.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from feedbackcam.data.prepared import load_prepared
from feedbackcam.fileio import write_json
from feedbackcam.propagate import (
    LITE0_EXPAND_AT,
    LITE0_THRESHOLD,
    iou,
    offline_features,
    review_rounds,
)
from feedbackcam.service.datasets import resize_nearest
from feedbackcam.shortcuts.bench import (
    EpochChoice,
    baseline,
    evaluate_row,
    feedback_pool,
    fine_tune,
)
from feedbackcam.shortcuts.config import BenchConfig
from feedbackcam.shortcuts.isic_real import isic_real_data, read_annotations

METHOD = "jaccard+surroundings+invariance_balanced"
LAM = 0.9
HAND_FRACTION = 0.2  # 5 of the 25 masks: the benchmark's --fractions 0.2
SIDE = 256  # the offline network's side


def review(big, features, hand, true_big, patched, rounds, seed) -> dict:
    """Rounds of proposals on the pool from the hand marks (pool indices), as the app's "Find
    more like these" (:func:`propagate.review_rounds`): the reviewer accepts a patched image,
    outlined at IoU >= 0.5 where a hand mask exists. Returns the accepted masks at 256 px and
    the review's counts."""

    def accept(i: int, m: np.ndarray) -> bool:
        return bool(
            patched[i] and m.any() and (not true_big[i].any() or iou(m, true_big[i]) >= 0.5)
        )

    done = review_rounds(
        features, big, {i: true_big[i] for i in hand}, accept, threshold=LITE0_THRESHOLD,
        expand_at=LITE0_EXPAND_AT, rounds=rounds, seed=seed,
    )  # fmt: skip
    rounds = done.per_round(patched, "patched")
    return {"rounds": rounds, "accepted": done.accepted, "clicks": done.clicks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", type=Path, required=True, help="the isic-real benchmark folder")
    p.add_argument("--isic-root", required=True)
    p.add_argument("--features", type=Path, required=True, help="offline features, a .pt cache")
    p.add_argument("--features-root", required=True, help="the 256 px prepared ISIC folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--last-epoch",
        action="store_true",
        help="keep the last epoch instead of the one the per-class guard chooses (what the "
        "guard refused)",
    )
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bench_cfg = json.loads((args.bench / "config.json").read_text())
    cfg = BenchConfig(
        datasets=("isic-real",),
        isic_root=args.isic_root,
        artifacts_root=bench_cfg.get("artifacts_root"),
        select_epoch=True,
        acc_tolerance=bench_cfg["acc_tolerance"],
    )
    big_data = load_prepared(Path(args.features_root), mmap=True)
    where = {k: i for i, k in enumerate(big_data.ids)}
    features_all = offline_features(None, args.features)
    artifacts = cfg.artifacts_root or str(Path(args.isic_root) / "artifacts")
    lists, masks_big, _, _ = read_annotations(artifacts, SIDE)
    patched_ids = set(lists["patch"])
    rows = []
    for seed in args.seeds:
        d = isic_real_data(seed, cfg, args.bench / "data")
        sched = cfg.isic_real
        base = baseline(args.bench / "models" / f"isic-real-seed{seed}.pt", d, sched, seed)
        pool = d.pool
        # the benchmark's five: feedback_pool's draw at --fractions 0.2, the same seed
        _, given = feedback_pool(d, "ignore", HAND_FRACTION, torch.Generator().manual_seed(seed),
                                 seed)  # fmt: skip
        hand = [int(i) for i in np.flatnonzero(given)]
        rows_of = [where[k] for k in pool.ids]
        big = np.asarray(big_data.images[rows_of])
        features = features_all[rows_of]
        empty = np.zeros((SIDE, SIDE), np.uint8)
        true_big = np.stack([masks_big.get(k, empty) for k in pool.ids])
        patched = np.array([k in patched_ids for k in pool.ids])
        started = time.perf_counter()
        got = review(big, features, hand, true_big, patched, args.rounds, seed)
        review_seconds = round(time.perf_counter() - started)
        ignore = np.zeros_like(pool.ignore)
        ignore[hand] = pool.ignore[hand]
        for i, m in got["accepted"].items():
            ignore[i] = resize_nearest(m, pool.size)
        marked = ignore.reshape(len(pool), -1).any(1)
        data = replace(pool, ignore=ignore, has_ignore=marked)
        choice = None if args.last_epoch else EpochChoice(d.val, cfg.acc_tolerance)
        started = time.perf_counter()
        model, _ = fine_tune(base, data, sched, METHOD, LAM, seed, choice=choice)
        scores = evaluate_row(model, d)
        row = {
            "seed": seed,
            "pool": len(pool),
            "pool_patched": int(patched.sum()),
            "pool_masked": int(pool.ignore.reshape(len(pool), -1).any(1).sum()),
            "hand": [pool.ids[i] for i in hand],
            "rounds": got["rounds"],
            "accepted": len(got["accepted"]),
            "marked": int(marked.sum()),
            "clicks": got["clicks"],
            "review_seconds": review_seconds,
            "epoch": choice.epoch if choice else "last",
            "epochs": choice.history if choice else None,
            "seconds": round(time.perf_counter() - started),
            **scores,
        }
        rows.append(row)
        keys = ("accepted", "marked", "clicks", "epoch", "flip_to_target", "auc_clean")
        print(json.dumps({k: row[k] for k in ("seed", *keys) if k in row}), flush=True)
        write_json(
            args.json,
            {
                "rows": rows,
                "method": METHOD,
                "lam": LAM,
                "epoch": "last" if args.last_epoch else "chosen by the per-class guard",
                "bench": str(args.bench),
                "threshold": LITE0_THRESHOLD,
                "expand_at": LITE0_EXPAND_AT,
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} torch thread(s)",
            },
        )


if __name__ == "__main__":
    main()
