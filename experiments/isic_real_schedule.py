"""isic-real's default objective under the per-class guard (``--select-epoch``) with another
fine-tuning schedule than the benchmark's (docs/real-artifacts.md, "The guard chooses the
epoch": six epochs instead of three, and the marked images repeated in the pool; tried, not
adopted).

The baselines, their data and their baseline / reference rows are taken from an earlier run's
folder (``--from``), so the fine-tunes start from the very models the three-epoch rows did.

    python experiments/isic_real_schedule.py OUT --from BENCH --epochs 6 --lr 3e-4 \\
        --isic-root ISIC2017_FOLDER
    python experiments/isic_real_schedule.py OUT --from BENCH --epochs 3 --repeat-marked 3 ...
    python experiments/isic_real_schedule.py OUT --from BENCH --epochs 3 --pool 0 ...  # every
        # training image in the pool, as `simulate` fine-tunes on all of feedback-train
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from feedbackcam.shortcuts import BenchConfig, bench, run_benchmark
from feedbackcam.shortcuts.config import ISIC, Schedule

DEFAULT = "jaccard+surroundings+invariance_balanced"


def average_weights(decay: float) -> None:
    """Every fine-tune's optimiser also updates an exponential moving average of the weights
    after each step (``decay`` per step, from the incoming model); the guard scores, and the
    fine-tune keeps, the average instead of the raw weights. BatchNorm is frozen in the
    fine-tunes, so the buffers need no averaging."""
    make, offer = bench.make_optimizer, bench.EpochChoice.offer
    averages: dict[int, torch.nn.Module] = {}

    def with_average(model, name, lr, *rest, **kw):
        opt = make(model, name, lr, *rest, **kw)
        ema = averages[id(model)] = copy.deepcopy(model)

        def step(*_):
            with torch.no_grad():
                for a, w in zip(ema.parameters(), model.parameters(), strict=True):
                    a.lerp_(w, 1 - decay)

        opt.register_step_post_hook(step)
        return opt

    def offer_average(self, model, epoch):
        return offer(self, averages.get(id(model), model), epoch)

    bench.make_optimizer, bench.EpochChoice.offer = with_average, offer_average


def borrow_baselines(source: Path, out: Path) -> None:
    """Start the benchmark folder ``out`` from ``source``'s data and baselines: its ``data/`` and
    ``models/`` linked, its baseline and reference rows copied, so the fine-tunes start from
    the very models ``source``'s rows did."""
    out.mkdir(parents=True)
    for d in ("data", "models"):
        if (source / d).exists():  # data/ only where the benchmark stores its images (ISIC)
            (out / d).symlink_to((source / d).resolve())
    keep = [
        line
        for line in (source / "runs.jsonl").read_text().splitlines()
        if json.loads(line)["method"] in ("baseline", "no-confounder")
    ]
    (out / "runs.jsonl").write_text("\n".join(keep) + "\n")


def guarded_config(datasets, seeds, methods, isic_root, **changes) -> BenchConfig:
    """The benchmark as these experiments run it: the default objective's lambda 0.9, the epoch
    chosen by the guard (``select_epoch``), no controls or efficiency rows; ``changes`` on top."""
    fields = dict(lams=(0.9,), controls=(), fractions=(), isic_root=isic_root, select_epoch=True)
    return BenchConfig(
        datasets=tuple(datasets), seeds=tuple(seeds), methods=tuple(methods), **fields | changes
    )


def arms_parser(doc: str, first_arm: str) -> argparse.ArgumentParser:
    """The flags of the scripts that run the benchmark in arms from the same baselines
    (experiments/symmetries.py, counterfactual_share.py): the output folder, data sets, seeds
    and methods of :func:`guarded_config`, ``--from`` (an earlier run's folder as
    ``first_arm``), the ISIC folder and the torch threads."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=[DEFAULT])
    p.add_argument("--from", dest="source", type=Path, default=None, help=first_arm)
    p.add_argument("--isic-root", default=None)
    p.add_argument("--threads", type=int, default=2)
    return p


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--from", dest="source", type=Path, required=True, help="a benchmark folder")
    p.add_argument("--isic-root", required=True)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--methods", nargs="+", default=[DEFAULT])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--repeat-marked",
        type=int,
        default=0,
        help="each image with an ignore mark appears this many more times in the pool",
    )
    p.add_argument(
        "--fractions",
        type=float,
        nargs="*",
        default=[],
        help="also fine-tune the first METHOD with ignore marks on these shares of the marked "
        "images (0.2: 5 of the 25), every seed",
    )
    p.add_argument(
        "--pool",
        type=int,
        default=BenchConfig.isic_real_pool,
        help="training images in the feedback pool, the marked ones among them; 0: all of them "
        "(default: the benchmark's %(default)s)",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=None,
        help="score (and keep) an exponential moving average of the fine-tuned weights, this "
        "decay per step, started at the incoming model",
    )
    p.add_argument(
        "--symmetries",
        action="store_true",
        help="moved artifacts and swapped surroundings turned or mirrored at random "
        "(FeedbackConfig.counterfactual_symmetries)",
    )
    p.add_argument(
        "--no-recalibrate-bn",
        dest="recalibrate_bn",
        action="store_false",
        help="leave BatchNorm's statistics the incoming model's (the runs before 2026-12-05)",
    )
    args = p.parse_args()
    if args.ema:
        average_weights(args.ema)
    if args.repeat_marked:
        pool_of = bench.feedback_pool

        def repeated(data, mask_kind, fraction, g, seed):
            pool, given = pool_of(data, mask_kind, fraction, g, seed)
            rows = [np.arange(len(pool))] + [np.flatnonzero(given)] * args.repeat_marked
            idx = np.concatenate(rows)
            return pool.subset(idx), given[idx]

        bench.feedback_pool = repeated
    if not args.out.exists():
        borrow_baselines(args.source, args.out)
    torch.set_num_threads(args.threads)
    config = guarded_config(
        ("isic-real",),
        args.seeds,
        args.methods,
        args.isic_root,
        fractions=tuple(args.fractions),
        efficiency_methods=tuple(args.methods[:1]),
        efficiency_seeds=tuple(args.seeds),
        isic_real=Schedule(**ISIC, epochs=args.epochs, lr=args.lr, batch=32, weighted=True),
        isic_real_pool=args.pool or 1_000_000,
        recalibrate_batchnorm=args.recalibrate_bn,
        counterfactual_symmetries=args.symmetries,
    )
    run_benchmark(config, args.out)


if __name__ == "__main__":
    main()
