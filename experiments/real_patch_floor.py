"""How much of the flip to NV is the patch, and how much any change beside the lesion?
(docs/real-artifacts.md, "What is left of the flip").

For isic-real's baselines and the default objective's fine-tunes (25 marks + lesion masks, the
epoch chosen by the per-class guard, as ``--select-epoch``), the test images' flip to NV and
push (log-odds) with the region where the real patch was pasted holding:
- the real patch (the benchmark's number);
- the same cutout with its colours rotated (R, G, B -> B, R, G, and again): the patch's shape
  and texture in other colours;
- the cutout in grey (its luminance);
- the image's own median skin colour: the region changed, no object in it (the whole image's
  median, and, as the benchmark's ``flip_to_target_filled`` does, the median outside the
  region: ``counterfactual.fill_region``).

    python experiments/real_patch_floor.py --bench BENCH --isic-root ISIC2017_FOLDER \\
        --json docs/shortcuts/isic-real-floor.json

BENCH: a benchmark folder whose ``data/`` and ``models/`` hold isic-real's data cache and
baselines (``feedbackcam shortcuts BENCH --datasets isic-real ...``).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch

from feedbackcam.counterfactual import fill_region
from feedbackcam.fileio import write_json
from feedbackcam.shortcuts import BenchConfig
from feedbackcam.shortcuts.bench import EpochChoice, baseline, fine_tune
from feedbackcam.shortcuts.data import float_images
from feedbackcam.shortcuts.datasets import load_data
from feedbackcam.shortcuts.metrics import flip_to, predict_probs, target_shift

DEFAULT = "jaccard+surroundings+invariance_balanced"


def variants(test) -> dict[str, np.ndarray]:
    """The test images with the pasted region holding each variant (uint8 (N, H, W, 3))."""
    x, clean = test.data.images, test.clean
    region = test.data.ignore.astype(bool)[..., None]
    median = np.median(clean.reshape(len(clean), -1, 3), axis=1)[:, None, None, :]
    grey = x.mean(-1, keepdims=True).repeat(3, -1)
    return {
        "real patch": x,
        "colours rotated": np.where(region, x[..., [2, 0, 1]], clean),
        "colours rotated twice": np.where(region, x[..., [1, 2, 0]], clean),
        "grey": np.where(region, grey, clean).astype(np.uint8),
        "skin median": np.where(region, median, clean).astype(np.uint8),
        "median outside the region": filled(clean, test.data.ignore),
    }


def filled(clean: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``counterfactual.fill_region`` on uint8 images (the benchmark's filled-region flip)."""
    x = fill_region(float_images(clean), torch.from_numpy(region).float())
    return (x.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def arguments(description: str) -> argparse.Namespace:
    """The command line shared with isic_real_blend.py (threads set)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--bench", type=Path, required=True, help="isic-real's data/ and models/")
    p.add_argument("--isic-root", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    return args


def guarded_fine_tunes(args: argparse.Namespace):
    """Per seed: (seed, data, baseline, the default's fine-tune, the epoch the per-class guard
    kept), as ``feedbackcam shortcuts --select-epoch`` makes them from BENCH's baselines."""
    cfg = BenchConfig(datasets=("isic-real",), isic_root=args.isic_root, select_epoch=True)
    for seed in args.seeds:
        data, sched = load_data("isic-real", seed, cfg, args.bench / "data")
        base = baseline(args.bench / "models" / f"isic-real-seed{seed}.pt", data, sched, seed)
        choice = EpochChoice(data.val, cfg.acc_tolerance)
        tuned, _ = fine_tune(base, data, sched, DEFAULT, 0.9, seed, choice=choice)
        yield seed, data, base, tuned, choice.epoch


def save(args: argparse.Namespace, rows: list[dict]) -> None:
    write_json(
        args.json,
        {"rows": rows, "machine": f"{platform.machine()}, {args.threads} threads, 2-core CPU"},
    )


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    rows = []
    for seed, data, base, tuned, epoch in guarded_fine_tunes(args):
        test = data.test
        has = torch.from_numpy(np.asarray(test.misleads, bool))
        for name, model in (("baseline", base), ("default", tuned)):
            clean = predict_probs(model, float_images(test.clean), batch_size=64)
            for variant, images in variants(test).items():
                probs = predict_probs(model, float_images(images), batch_size=64)
                row = {
                    "seed": seed,
                    "model": name,
                    "epoch": epoch if name == "default" else None,
                    "variant": variant,
                    "flip_to_nv": flip_to(
                        probs.argmax(1), clean.argmax(1), test.labels, has, test.target
                    ),
                    "push": target_shift(probs, clean, test.labels, has, test.target),
                }
                print(row, flush=True)
                rows.append(row)
    save(args, rows)


if __name__ == "__main__":
    main()
