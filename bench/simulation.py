"""Time a whole SimSet-size feedback simulation, end to end, from prepared data.

The thesis' simulation set: 2,594 images at 227x227, 40 epochs, SkinCare VGG16, combined loss
(262-554 minutes per epoch there). Images are SynthDerm written as a prepared folder (what is
timed does not depend on the pixels), the baseline is an untrained network (the baseline's own
training is not part of a simulation), and every step, validation pass and checkpoint is real.

    python bench/simulation.py --device cuda --precision bf16
    python bench/simulation.py --device cpu --model small_cnn --size 64 --n 600 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from feedbackcam.checkpoint import ModelSpec, save_checkpoint
from feedbackcam.data.dataset import ArrayDataset
from feedbackcam.data.prepared import save_prepared
from feedbackcam.data.synth import CLASSES, SynthConfig, make_synthderm
from feedbackcam.models import build_model
from feedbackcam.objective import FeedbackConfig
from feedbackcam.simulate import SimulationConfig, run_simulation
from feedbackcam.simulation_data import assemble


def _chunk(args: tuple[int, int, int]) -> ArrayDataset:
    n, size, seed = args
    ds = make_synthderm(SynthConfig(n=n, size=size, seed=seed))
    return ArrayDataset(ds.images, ds.masks, ds.labels, np.ones(n, bool), ds.ids, CLASSES)


def synth_prepared(n: int, size: int, out: Path, workers: int) -> Path:
    per = -(-n // workers)
    jobs = [(min(per, n - i * per), size, 1000 + i) for i in range(workers) if n - i * per > 0]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_chunk, jobs))
    data = ArrayDataset(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.masks for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.ones(n, bool),
        tuple(i for p in parts for i in p.ids),
        CLASSES,
    )
    return save_prepared(data, out, layout="synthderm")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="skincare_vgg16")
    p.add_argument("--size", type=int, default=227)
    p.add_argument("--n", type=int, default=2594)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--workers", type=int, default=8, help="processes generating SynthDerm")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        prepared = synth_prepared(args.n, args.size, Path(tmp) / "prepared", args.workers)
        t_data = time.perf_counter() - t0
        start = time.perf_counter()
        classes = len(CLASSES)
        kwargs = {"width": 32} if args.model == "small_cnn" else {}
        torch.manual_seed(0)
        untrained = build_model(args.model, classes, **kwargs)
        spec = ModelSpec(args.model, CLASSES, untrained.layers, args.size, kwargs)
        checkpoint = save_checkpoint(Path(tmp) / "base.pt", untrained, spec)
        # what `feedbackcam simulate --data PREPARED --base-model CKPT` assembles
        sim = assemble(prepared, base_model=checkpoint)
        cfg = SimulationConfig(
            modes=("combined",),
            epochs=args.epochs,
            batch_size=args.batch_size,
            optimizer="sgd",
            lr=1e-4,
            eval_batch_size=256,
            feedback=FeedbackConfig(lam=0.3, precision=args.precision),
            device=args.device,
        )
        run_simulation(
            sim.data,
            cfg,
            Path(tmp) / "run",
            make_model=lambda: sim.baseline,
            spec=sim.spec,
            baseline=sim.baseline,
            progress=False,
        )
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    images = int(args.n * 0.8) * args.epochs
    result = {
        "device": name,
        "model": args.model,
        "size": args.size,
        "n": args.n,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "seconds_end_to_end": seconds,
        "seconds_generating_data": t_data,
        "train_images_per_s": images / seconds,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
