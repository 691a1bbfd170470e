"""Issue 18's held-out check, repeated on ISIC 2017 through the command line only: the model you
have, fine-tuned on its own images with a clinician's 25 patch strokes.

    python experiments/heldout_workflow.py --isic-root ../shared/data/isic2017-256 \\
        --work /tmp/heldout --json docs/shortcuts/heldout_workflow.json

The steps a user runs (each skipped when its output is there):

1. ``feedbackcam data prepare ISIC --size 128 --ignore ISIC/artifacts/patch_masks``: ISIC 2017 as
   downloaded, the lesion masks as keep masks, the 25 patch masks as ignore strokes;
2. ``feedbackcam train-base`` (EfficientNet-Lite0, ImageNet weights, README's recipe, 8 epochs):
   it trains and selects on 1,800 of the 2,000 images;
3. ``feedbackcam simulate --base-model`` (modes cls and combined, batch 32, Adam 3e-4, lambda
   0.7, 6 epochs, every other setting the default; ``--guard average``: the guard on average
   sensitivity alone, as before 2026-12-06): the 1,800 images the base model saw stay in
   feedback-train, validation and test are the 200 it did not see (100 each).

Then, on the images no step trained or selected on (simulate's test split), for the base model
and each mode's kept checkpoint: per-class sensitivity and MEL AUC on the clean images, and a real
patch (cut out with the 25 masks, never over the lesion) pasted into every MEL and BKL image,
``--draws`` times (patch and place drawn per image, the same draws for every seed and model):
the share that turns NV (and was not NV without it), and the share of all predictions that
change. The same on the 200 images the base never saw (validation included: simulate chose its
epoch there by Jaccard and the guard, never by a pasted patch) for a less noisy count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from feedbackcam.checkpoint import load_checkpoint
from feedbackcam.data.artifacts import cut_out, paste_cutouts
from feedbackcam.data.prepared import load_prepared, load_prepared_ignore
from feedbackcam.shortcuts.data import float_images
from feedbackcam.shortcuts.metrics import target_shift
from feedbackcam.simulation_data import seen_ids_of


def run(cmd: list[str], done: Path, log: Path) -> float:
    """Run one CLI step unless ``done`` exists; its seconds (0 when skipped)."""
    if done.exists():
        return 0.0
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def predict(model, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Probabilities (N, C) of uint8 (N, H, W, 3) images."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(model(float_images(images[i : i + batch])).logits.softmax(1))
    return torch.cat(out).numpy()


def scores(model, images, pasted, has, labels, classes, rows) -> dict:
    """Clean-image scores on ``rows`` (indices), and the pasted patch's flips there, averaged
    over the paste draws (``pasted`` (K, N, ...), ``has`` (K, N)); ``push_to_nv``: the
    benchmark's offset-free push (:func:`~feedbackcam.shortcuts.metrics.target_shift`) on those
    melanomas and keratoses."""
    nv, mel = classes.index("NV"), classes.index("MEL")
    y = labels[rows]
    p_clean = predict(model, images[rows])
    clean = p_clean.argmax(1)
    flips, changed, n_flips, pushes = [], [], [], []
    for x, h in zip(pasted, has, strict=True):
        p_patch = predict(model, x[rows])
        with_patch = p_patch.argmax(1)
        at = h[rows] & (y != nv)
        flipped = (with_patch[at] == nv) & (clean[at] != nv)
        flips.append(flipped.mean())
        t = torch.from_numpy
        pushes.append(target_shift(t(p_patch), t(p_clean), t(y), t(h[rows]), nv))
        n_flips.append(int(flipped.sum()))
        changed.append((with_patch[h[rows]] != clean[h[rows]]).mean())
    return {
        "n": int(len(rows)),
        "n_flip_rows": int((has[0][rows] & (y != nv)).sum()),
        "acc_clean": float((clean == y).mean()),
        "sens_clean": [float((clean[y == c] == c).mean()) for c in range(len(classes))],
        "mel_auc_clean": float(roc_auc_score(y == mel, p_clean[:, mel])),
        "flip_to_nv": float(np.mean(flips)),
        "flip_to_nv_draws": [float(f) for f in flips],
        "n_flipped_to_nv_draws": n_flips,
        "changed": float(np.mean(changed)),
        "push_to_nv": float(np.mean(pushes)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--isic-root", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--base-epochs", type=int, default=8)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0, help="simulate's split and fine-tuning seed")
    p.add_argument(
        "--base-seed",
        type=int,
        default=0,
        help="train-base's seed: which 1,800 images it trains on, so which 200 are held out "
        "(0: the work folder's base/; others: base-seedN/)",
    )
    p.add_argument("--lam", type=float, default=0.7, help="simulate's --lambda")
    p.add_argument(
        "--base-recipe",
        choices=("readme", "bench"),
        default="readme",
        help="readme: train-base as the README's recipe (8 epochs at 1e-4, flips and rotations); "
        "bench: as the shortcut benchmark trains its baselines (6 epochs at 3e-4, no "
        "augmentation), in base-bench[-seedN]/",
    )
    p.add_argument("--draws", type=int, default=5, help="patch pastes per image, averaged")
    p.add_argument(
        "--marks",
        type=int,
        default=25,
        help="how many of the 25 patch masks the clinician gave (drawn by --seed; 0: none, the "
        "lesion masks alone): the base model is shared, the prepared folder and the "
        "simulation are per setting",
    )
    p.add_argument("--modes", default="cls,combined")
    p.add_argument(
        "--guard",
        choices=("per-class", "average"),
        default="per-class",
        help="simulate's collapse guard: every class's Youden's J and the average "
        "sensitivity (the default since 2026-12-06; folders sim-pc*) or the average alone (the "
        "runs before)",
    )
    p.add_argument(
        "--symmetries",
        choices=("on", "off", "default"),
        default="default",
        help="simulate's --counterfactual-symmetries / --no-counterfactual-symmetries "
        "(default: simulate's own default; a set value goes into the folder name)",
    )
    args = p.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    log = w / "cli.log"
    exe = [sys.executable, "-m", "feedbackcam.cli"]
    patch_masks = args.isic_root / "artifacts" / "patch_masks"
    prepared, base, sim = w / "prepared", w / "base", w / f"sim-seed{args.seed}"
    tag = ""  # settings other than the first runs' go into the folder names
    base_args = ["--epochs", str(args.base_epochs)]
    if args.base_recipe == "bench":
        base_args = ["--epochs", "6", "--lr", "3e-4", "--no-augment"]
        base = w / "base-bench"
        tag += "-bench"
    if args.base_seed:
        base = base.with_name(f"{base.name}-seed{args.base_seed}")
        tag += f"-base{args.base_seed}"
    if args.lam != 0.7 or args.epochs != 6:
        tag += f"-lam{args.lam:g}-ep{args.epochs}"
    guard = ["--no-guard-per-class"]
    if args.guard == "per-class":
        guard = ["--guard-per-class", "--guard-class-measure", "youden"]
        tag = "-pc" + tag
    symmetries = []
    if args.symmetries != "default":
        symmetries = [f"--{'' if args.symmetries == 'on' else 'no-'}counterfactual-symmetries"]
        tag += f"-sym{args.symmetries}"
    sim = w / f"sim{tag}-seed{args.seed}"
    marks = ["--ignore", str(patch_masks)]
    if args.marks != 25:  # a subset of the strokes: its own folder, prepared folder, simulation
        sim = w / f"sim{tag}-{args.marks}marks-seed{args.seed}"
        prepared_marks = w / f"prepared-{args.marks}marks-seed{args.seed}"
        marks = []
        if args.marks:
            folder = w / f"marks-{args.marks}-seed{args.seed}"
            folder.mkdir(exist_ok=True)
            files = sorted(patch_masks.glob("*.png"))
            rng = np.random.default_rng([args.seed, 25])
            for k in rng.choice(len(files), args.marks, replace=False):
                (folder / files[k].name).write_bytes(files[k].read_bytes())
            marks = ["--ignore", str(folder)]
    else:
        prepared_marks = prepared
    seconds = {
        "prepare": run(
            [*exe, "data", "prepare", str(args.isic_root), "--size", str(args.size),
             "--ignore", str(patch_masks), "--out", str(prepared)],
            prepared / "meta.json", log,
        ),
        "prepare_marks": run(
            [*exe, "data", "prepare", str(args.isic_root), "--size", str(args.size),
             *marks, "--out", str(prepared_marks)],
            prepared_marks / "meta.json", log,
        ),
        "train_base": run(
            [*exe, "train-base", "--data", str(prepared), "--model", "efficientnet_lite0",
             "--weights", "imagenet", *base_args,
             "--seed", str(args.base_seed), "--out", str(base)],
            base / "model.pt", log,
        ),
        "simulate": run(
            [*exe, "simulate", "--data", str(prepared_marks), "--base-model",
             str(base / "model.pt"), "--modes", args.modes, "--lambda", str(args.lam),
             "--epochs", str(args.epochs),
             "--batch-size", "32", "--optimizer", "adam", "--lr", "3e-4", *guard, *symmetries,
             "--seed", str(args.seed), "--out", str(sim)],
            sim / "results.json", log,
        ),
    }  # fmt: skip
    data = load_prepared(prepared)
    ignore, has_ignore = load_prepared_ignore(prepared)
    classes = list(data.classes)
    index = {k: i for i, k in enumerate(data.ids)}
    splits = json.loads((sim / "splits.json").read_text())
    _, _, base_payload = load_checkpoint(base / "model.pt")
    seen = set(seen_ids_of(base_payload))
    unseen = np.array(sorted(index[k] for k in (*splits["val"], *splits["test"])))
    assert not any(data.ids[i] in seen for i in unseen)
    test = set(splits["test"])
    sets = {
        "test": np.array([k for k, i in enumerate(unseen) if data.ids[i] in test]),
        "unseen by the base (val + test)": np.arange(len(unseen)),
    }
    marked = np.flatnonzero(has_ignore)
    cutouts = [cut_out(data.images[i], ignore[i], data.ids[i]) for i in marked]
    images, lesions = np.asarray(data.images[unseen]), np.asarray(data.masks[unseen])
    labels = np.asarray(data.labels[unseen])
    # the same draws for every seed and model: image k of the 200 gets patch draw d by
    # default_rng([1000 + d, k])
    draws = [paste_cutouts(images, lesions, cutouts, seed=1000 + d) for d in range(args.draws)]
    pasted = np.stack([x for x, _, _ in draws])
    has = np.stack([h for _, _, h in draws])
    results = json.loads((sim / "results.json").read_text())
    models = {"base": base / "model.pt"}
    models |= {m: sim / "checkpoints" / f"{m}.pt" for m in args.modes.split(",")}
    rows = []
    for model_name, path in models.items():
        model, _, _ = load_checkpoint(path)
        for name, idx in sets.items():
            row = {"set": name, "model": model_name}
            row |= scores(model, images, pasted, has, labels, classes, idx)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {
        "machine": "2-core CPU VM, torch 2.14.1, no GPU",
        "classes": classes,
        "seconds": seconds,
        "n_marked_patches": args.marks,
        "base_seed": args.base_seed,
        "base_recipe": args.base_recipe,
        "guard": args.guard,
        "lambda": args.lam,
        "epochs": args.epochs,
        "marks": marks,
        "base_seen": len(seen),
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "simulate": {
            m: {
                k: r.get(k) for k in ("best_epoch", "improved", "guard_rejected_epochs", "warnings")
            }
            for m, r in results["runs"].items()
        },
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
