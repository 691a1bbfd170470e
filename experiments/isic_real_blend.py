"""Weight interpolation between the incoming model and its fine-tune (WiSE-FT, Wortsman et al.
2022) on isic-real (docs/real-artifacts.md, "Blending the fine-tune with the incoming model":
exploratory, not adopted).

For each seed: the default objective's fine-tune with the epoch the per-class guard chooses (as
``--select-epoch``), then every blend (1 - alpha) * incoming + alpha * fine-tuned of all
floating-point state (weights and BatchNorm statistics) scored like a benchmark row: validation
flip and filled-validation sensitivities, test flip to NV (real patch and region filled), MEL
AUC and sensitivities on the clean test images.

    python experiments/isic_real_blend.py --bench BENCH --isic-root ISIC2017_FOLDER \\
        --json docs/shortcuts/isic-real-blend.json
"""

from __future__ import annotations

import argparse
import copy
import platform
from pathlib import Path

import torch

from feedbackcam.fileio import write_json
from feedbackcam.shortcuts import BenchConfig
from feedbackcam.shortcuts.bench import EpochChoice, baseline, evaluate_row, fine_tune
from feedbackcam.shortcuts.datasets import load_data

DEFAULT = "jaccard+surroundings+invariance_balanced"
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
KEYS = ("val_flip", "val_sens_filled", "flip_to_target", "flip_to_target_filled", "auc_clean",
        "sens_clean")  # fmt: skip


def blend(base, tuned, alpha: float):
    """(1 - alpha) * base + alpha * tuned, floating-point state only (counters from tuned)."""
    a, b = base.state_dict(), tuned.state_dict()
    model = copy.deepcopy(base)
    model.load_state_dict(
        {k: a[k] * (1 - alpha) + b[k] * alpha if a[k].is_floating_point() else b[k] for k in a}
    )
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", type=Path, required=True, help="isic-real's data/ and models/")
    p.add_argument("--isic-root", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(datasets=("isic-real",), isic_root=args.isic_root, select_epoch=True)
    rows = []
    for seed in args.seeds:
        data, sched = load_data("isic-real", seed, cfg, args.bench / "data")
        base = baseline(args.bench / "models" / f"isic-real-seed{seed}.pt", data, sched, seed)
        choice = EpochChoice(data.val, cfg.acc_tolerance)
        tuned, _ = fine_tune(base, data, sched, DEFAULT, 0.9, seed, choice=choice)
        for alpha in ALPHAS:
            r = evaluate_row(blend(base, tuned, alpha), data)
            row = {"seed": seed, "epoch": choice.epoch, "alpha": alpha, **{k: r[k] for k in KEYS}}
            print(row, flush=True)
            rows.append(row)
    write_json(
        args.json,
        {"rows": rows, "machine": f"{platform.machine()}, {args.threads} threads, 2-core CPU"},
    )


if __name__ == "__main__":
    main()
