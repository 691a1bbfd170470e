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

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from isic_real_schedule import DEFAULT, borrow_baselines, guarded_config  # noqa: E402

from feedbackcam.shortcuts import run_benchmark  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=[DEFAULT])
    p.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--from", dest="source", type=Path, default=None, help="the arm 'all'")
    p.add_argument("--isic-root", default=None)
    p.add_argument("--threads", type=int, default=2)
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
