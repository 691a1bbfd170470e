"""The trap splits with the artifact's *flag* as the feedback (docs/real-artifacts.md): P-ClArC
(Reveal2Revise) on the trained trap baseline, the artifact's direction at the explanation layer
taken from the training images flagged as carrying it (ISIC's per-image annotations, what a
clinician gives with one click per image), projected out at inference. No pixel mask, no
keep mask, no training after the baseline's. And the simplest use of the same flags, for
comparison: fine-tuning the baseline (the trap schedule, class-weighted, as the benchmark's
class feedback) on its training images resampled so that, within each class, images with and
without the artifact are drawn equally often (a group-balanced sampler, seeded, with
replacement; the epoch keeps its size).

The linear probes of experiments/trap_lesion_signal.py found that the trap is inside the lesion
too (so keep masks cannot undo it) and that projecting the flag's direction out of fixed
features lifts a trap-trained probe to the correlation-free level on the ruler and dark-corner
traps; this checks it on the benchmark's trained networks.

    python experiments/trap_flag_clarc.py --isic-root ../shared/data/isic2017-256 \\
        --cache /tmp/isic128 --models /tmp/trap-models --traps ruler dark_corner --seeds 0 1 2 \\
        --json docs/shortcuts/isic-trap/flag_clarc.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from feedbackcam import clarc
from feedbackcam.fileio import write_json
from feedbackcam.shortcuts.bench import baseline, evaluate_row, fine_tune
from feedbackcam.shortcuts.config import CLASS_ONLY, BenchConfig
from feedbackcam.shortcuts.isic_real import (
    artifacts_root,
    flags_of,
    isic_trap_data,
    read_annotations,
    trap_flag,
)

KEYS = ("auc_clean", "avg_sens", "sens", "acc", "val_avg_sens_filled")


def flag_balanced(labels: np.ndarray, has: np.ndarray, seed: int) -> np.ndarray:
    """Indices (with repeats) that draw, within each class, as many images with the artifact
    as without it; each class keeps its count."""
    rng = np.random.default_rng([seed, 23])
    out = []
    for c in np.unique(labels):
        cells = [np.flatnonzero((labels == c) & (has == a)) for a in (False, True)]
        cells = [cell for cell in cells if len(cell)]
        n = int((labels == c).sum())
        for k, cell in enumerate(cells):
            out.append(rng.choice(cell, n // len(cells) + (k < n % len(cells)), replace=True))
    return np.sort(np.concatenate(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--isic-root", required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--models", type=Path, required=True, help="where the baselines are kept")
    p.add_argument("--traps", nargs="+", default=["ruler", "dark_corner"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(isic_root=args.isic_root)
    args.models.mkdir(parents=True, exist_ok=True)
    _, _, flag_ids, flags = read_annotations(str(artifacts_root(cfg)), cfg.isic_size)
    rows = []
    for artifact in args.traps:
        for seed in args.seeds:
            started = time.perf_counter()
            data = isic_trap_data(seed, artifact, cfg, args.cache)
            base = baseline(args.models / f"trap_{artifact}_{seed}.pt", data, cfg.trap, seed)
            trained = time.perf_counter() - started
            every = flags_of(data.pool.ids, flag_ids, flags)
            every.pop("annotated")
            has = trap_flag(artifact, every)
            model = copy.deepcopy(base)
            d = clarc.artifact_direction(model, data.pool.images, has)
            clarc.attach(model, d, d.clean)
            tuned, _ = fine_tune(
                base,
                data.pool.subset(flag_balanced(data.pool.labels, has, seed)),
                cfg.trap,
                CLASS_ONLY,
                0.0,
                seed,
                class_weighted=True,
            )
            models = (("baseline", base), ("p_clarc from flags", model), ("flag-balanced", tuned))
            for method, m in models:
                scores = evaluate_row(m, data)
                row = {
                    "trap": artifact,
                    "seed": seed,
                    "method": method,
                    "flagged": int(has.sum()),
                    "pool": len(has),
                    **{k: scores[k] for k in KEYS},
                    "baseline_seconds": round(trained, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            out = {
                "rows": rows,
                "isic_size": cfg.isic_size,
                "schedule": str(cfg.trap),
                "machine": f"{platform.machine()}, {args.threads} torch thread(s), 2-core CPU",
            }
            write_json(args.json, out)


if __name__ == "__main__":
    main()
