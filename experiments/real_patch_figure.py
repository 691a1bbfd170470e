"""The real-patch result as a picture (README, docs/results.md): held-out melanomas and
keratoses with a real coloured patch pasted beside the lesion, the baseline's answer and Grad-CAM,
and the same after feedback (a model fine-tuned on its own training images, the default objective
with the clinician's 25 patch masks and the lesion masks).

    python experiments/real_patch_figure.py --isic-root ../shared/data/isic2017-256 \\
        --bench docs/shortcuts/isic-real --out docs/real_patch.png [--method METHOD --lam 0.9]

Uses the benchmark's data set of one seed (``--seed``, default 0) and its cached baseline
(``BENCH/models``), so the baseline is the one the tables report; the fine-tuning is the
benchmark's ``fine_tune``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch

from feedbackcam.explain import explain
from feedbackcam.report import overlay_grid
from feedbackcam.shortcuts.bench import baseline, fine_tune
from feedbackcam.shortcuts.config import BenchConfig
from feedbackcam.shortcuts.data import float_images
from feedbackcam.shortcuts.datasets import load_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--isic-root", required=True)
    p.add_argument("--bench", type=Path, required=True, help="the isic-real benchmark folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--method", default="jaccard+surroundings+invariance_balanced")
    p.add_argument("--lam", type=float, default=0.9)
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(datasets=("isic-real",), isic_root=args.isic_root)
    seed = args.seed
    data, sched = load_data("isic-real", seed, cfg, args.bench / "data")
    base = baseline(args.bench / "models" / f"isic-real-seed{seed}.pt", data, sched, seed)
    cached = args.bench / "models" / f"isic-real-seed{seed}-{args.method}-{args.lam}.pt"
    if cached.exists():
        tuned = copy.deepcopy(base)
        tuned.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
    else:
        tuned, _ = fine_tune(base, data, sched, args.method, args.lam, seed, class_weighted=False)
        torch.save(tuned.state_dict(), cached)
    test = data.test
    nv = data.classes.index("NV")
    pasted = test.data.ignore.reshape(len(test.data), -1).any(1)
    rows = np.flatnonzero(pasted & (test.data.labels != nv))

    def predict(model, images):
        with torch.no_grad():
            return model.eval()(float_images(images)).logits.argmax(1).numpy()

    clean_before = predict(base, test.clean[rows])
    before, after = predict(base, test.data.images[rows]), predict(tuned, test.data.images[rows])
    # melanomas and keratoses the baseline gets right without the patch and calls NV with it:
    # the shortcut at work
    flipped = (clean_before == test.data.labels[rows]) & (before == nv)
    chosen = rows[flipped][: args.n]
    images = test.data.images[chosen]
    x = float_images(images)
    saliencies, predictions = {}, {}
    for name, model in (("baseline", base), ("after feedback", tuned)):
        ex = explain(model, x)
        saliencies[name] = ex.saliency.numpy()
        predictions[name] = [
            f"says {data.classes[k]} ({p[k]:.2f})"
            for k, p in zip(ex.targets.tolist(), ex.probs.numpy(), strict=True)
        ]
    titles = [
        f"{data.classes[test.data.labels[i]]} + pasted patch\n(baseline without it: "
        f"{data.classes[test.data.labels[i]]})"
        for i in chosen
    ]
    masks = np.maximum(test.data.masks[chosen], 0)
    overlay_grid(images, masks, saliencies, titles, args.out, predictions=predictions)
    kept = int((after[flipped] != nv).sum())
    print(
        f"seed {seed}: {int(flipped.sum())} of {len(rows)} patched MEL/BKL test images that the "
        f"baseline gets right without the patch are called NV with it; after feedback {kept} of "
        f"those are not NV; figure: {args.out}"
    )


if __name__ == "__main__":
    main()
