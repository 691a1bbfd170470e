"""The trap splits with the lesion's surroundings given as ignore feedback (docs/real-artifacts.md).

Issue 18's pointer: on a ruler trap split, the region outside each training image's lesion mask
(dilated 9 px at 256 px) given as *ignore* feedback reached a reversed-test melanoma AUC of .73
(one seed), where every keep-mask objective of the benchmark stayed at the baseline's ~.3. This
runs that construction inside the benchmark: the ``isic-trap-*`` data and baseline of one seed,
the feedback pool's ignore masks = 1 − dilate(lesion), fine-tuned with the trap schedule and a
given method, and the benchmark's row (AUC on the reversed test). Everything is derived from
the lesion masks alone; nothing is marked by hand.

    python experiments/trap_outside_lesion.py --isic-root ../shared/data/isic2017-256 \\
        --cache /tmp/trap --artifact ruler --methods invariance_balanced --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from feedbackcam.counterfactual import dilate
from feedbackcam.fileio import write_json
from feedbackcam.shortcuts.bench import baseline, evaluate_row, fine_tune
from feedbackcam.shortcuts.config import BenchConfig
from feedbackcam.shortcuts.datasets import load_data

MARGIN = 0.035  # of the side: 9 px at 256 px, the dilation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--isic-root", required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--artifact", default="ruler")
    p.add_argument("--methods", nargs="+", default=["invariance_balanced"])
    p.add_argument("--lam", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    name = f"isic-trap-{args.artifact}"
    cfg = BenchConfig(datasets=(name,), isic_root=args.isic_root)
    args.cache.mkdir(parents=True, exist_ok=True)
    data, sched = load_data(name, args.seed, cfg, args.cache / "data")
    base = baseline(args.cache / f"{name}-seed{args.seed}.pt", data, sched, args.seed)
    rows = [{"dataset": name, "seed": args.seed, "method": "baseline", **evaluate_row(base, data)}]
    pool = data.pool
    keep = torch.from_numpy(np.ascontiguousarray(pool.masks)).float()
    grown = dilate(keep, int(round(MARGIN * pool.size))).numpy()
    outside = (1 - grown).astype(np.uint8) * pool.has_mask[:, None, None].astype(np.uint8)
    given = outside.reshape(len(pool), -1).any(1)
    pool = replace(pool, ignore=outside, has_ignore=given)
    for method in args.methods:
        started = time.perf_counter()
        model, scale = fine_tune(base, pool, sched, method, args.lam, args.seed)
        row = {
            "dataset": name,
            "seed": args.seed,
            "method": method,
            "lam": args.lam,
            "mask": "outside-lesion",
            "loss_scale": scale,
            "seconds": round(time.perf_counter() - started),
            **evaluate_row(model, data),
        }
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("method", "seconds")}), flush=True)
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
