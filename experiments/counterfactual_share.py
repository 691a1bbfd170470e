"""The default objective with fewer counterfactual rows per step (``BenchConfig.
counterfactual_share``, ``feedbackcam shortcuts --counterfactual-share``) on the shortcut
benchmark's data sets, from the same baselines (docs/benchmarks.md, "Ignore feedback against a
plain step": the share is what an ignore step costs beyond a plain one).

The arm with every marked row forwarded (``OUT/all``: the benchmark as documented) is run here or
taken from an earlier run's folder (``--from``); each share's arm (``OUT/share-S``) borrows its
data, baselines and baseline / reference rows, so every arm fine-tunes the very same models.
Epochs chosen by the guard (``--select-epoch``), controls and efficiency rows left out.

    python experiments/counterfactual_share.py OUT --datasets decoy synth-patch synth-ruler \\
        --shares 0.5 0.3
    python experiments/counterfactual_share.py OUT --datasets isic-real --from BENCH \\
        --isic-root ISIC2017_FOLDER --shares 0.5 0.3
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from isic_real_schedule import arms_parser, borrow_baselines, guarded_config  # noqa: E402

from feedbackcam.shortcuts import run_benchmark  # noqa: E402


def main() -> None:
    p = arms_parser(__doc__, "the arm 'all'")
    p.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.3])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = guarded_config(args.datasets, args.seeds, args.methods, args.isic_root)
    every = args.source or args.out / "all"
    if args.source is None:
        run_benchmark(config, every)
    for share in args.shares:
        folder = args.out / f"share-{share:g}"
        if not folder.exists():
            borrow_baselines(every, folder)
        run_benchmark(dataclasses.replace(config, counterfactual_share=share), folder)


if __name__ == "__main__":
    main()
