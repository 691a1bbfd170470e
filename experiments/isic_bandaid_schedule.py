"""ISIC with pasted band-aids (``isic-bandaid``) with a longer fine-tuning than the benchmark's
three epochs: does the default objective learn melanoma without the band-aid when it has the
time a trap split gets (eight epochs, docs/real-artifacts.md)? The epoch is chosen by the
per-class guard on validation (``--select-epoch``), as ``simulate`` chooses it, so a longer
schedule can only add candidates.

    python experiments/isic_bandaid_schedule.py OUT --isic-root ISIC2017_FOLDER --epochs 8

A folder from an earlier run (``--from BENCH``) lends its data and baselines (and their
baseline / reference rows), so the fine-tunes start from the very models its rows did.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from isic_real_schedule import DEFAULT, borrow_baselines, guarded_config  # noqa: E402

from feedbackcam.shortcuts import run_benchmark
from feedbackcam.shortcuts.config import ISIC, Schedule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--isic-root", required=True)
    p.add_argument("--from", dest="source", type=Path, default=None, help="a benchmark folder")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--methods", nargs="+", default=[DEFAULT, "class"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--class-weighted", action="store_true")
    args = p.parse_args()
    if args.source and not args.out.exists():
        borrow_baselines(args.source, args.out)
    torch.set_num_threads(args.threads)
    config = guarded_config(
        ("isic-bandaid",),
        args.seeds,
        args.methods,
        args.isic_root,
        isic=Schedule(**ISIC, epochs=args.epochs, lr=args.lr, batch=32),
        class_weighted=args.class_weighted,
    )
    run_benchmark(config, args.out)


if __name__ == "__main__":
    main()
