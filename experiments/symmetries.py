"""The default objective with and without turned counterfactuals
(``BenchConfig.counterfactual_symmetries``, ``feedbackcam shortcuts
--counterfactual-symmetries``) on the shortcut benchmark's data sets, from the same baselines
(docs/real-artifacts.md, "Where the patch lies").

The arm without (``OUT/off``) is the benchmark as the command line runs it, or an earlier run's
folder (``--from``); the arm with (``OUT/on``) borrows its data, baselines and baseline /
reference rows, so both fine-tune the very same models. Epochs chosen by the guard
(``--select-epoch``), controls and efficiency rows left out.

    python experiments/symmetries.py OUT --datasets decoy synth-patch synth-ruler --seeds 0 1 2
    python experiments/symmetries.py OUT --datasets isic-real --from BENCH --isic-root ISIC2017
    python experiments/symmetries.py OUT --datasets isic-real --borrow BENCH --isic-root ...
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
    p = arms_parser(__doc__, "the arm without")
    p.add_argument(
        "--borrow",
        type=Path,
        default=None,
        help="both arms fine-tune from this earlier run's data, baselines and reference",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = guarded_config(args.datasets, args.seeds, args.methods, args.isic_root)

    def arm(symmetries: bool, folder: Path) -> None:
        run_benchmark(dataclasses.replace(config, counterfactual_symmetries=symmetries), folder)

    off = args.source or args.out / "off"
    if args.borrow is not None and not off.exists():
        borrow_baselines(args.borrow, off)
    if args.source is None:
        arm(False, off)
    on = args.out / "on"
    if not on.exists():
        borrow_baselines(off, on)
    arm(True, on)


if __name__ == "__main__":
    main()
