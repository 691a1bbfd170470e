"""Serving the demo: its model, a validation set and a gallery, made on first use.

``feedbackcam demo`` trains on SynthDerm seeds 0 (base set) and 1 (feedback pool and test
split). The gate's validation set uses seed 101 and the gallery seed 102, so neither shares an
image with training nor with each other: feedback on gallery images can never leak into the set
that judges the updates. Both carry the confounding patch at random (rate 0.5), like the demo's
test split, so a model that leans on the patch is caught out. The replay set is the start of the
demo's own feedback pool (seed 1, patch with MEL at rate 0.95, masks included): the data the
served combined-loss model was fine-tuned on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..data.synth import SynthConfig, as_array_dataset, make_synthderm
from ..demo import run_demo
from ..fileio import write_bytes
from .datasets import save_npz
from .uploads import png_bytes

log = logging.getLogger(__name__)

VALIDATION_SEED, GALLERY_SEED, REPLAY_SEED = 101, 102, 1
VALIDATION_N, GALLERY_N, REPLAY_N = 300, 36, 300


def _synth(n: int, seed: int, size: int, rate: float = 0.5):
    return make_synthderm(
        SynthConfig(n=n, size=size, seed=seed, confounder="patch", confounder_rate=rate)
    )


def _absent(data_dir: Path, name: str) -> bool:
    return not (data_dir / f"{name}.npz").is_file() and not (data_dir / name).is_dir()


def ensure_demo(data_dir: Path, *, model: bool = True) -> Path:
    """Train the demo (quick) if its checkpoint is absent (and ``model``); write the validation
    and replay sets and the gallery if absent. Returns the combined-loss checkpoint's path."""
    data_dir = Path(data_dir)
    checkpoint = data_dir / "demo" / "checkpoints" / "combined.pt"
    if model and not checkpoint.is_file():
        log.warning("no demo model in %s: training it (about a minute on a CPU)", data_dir)
        print(f"training the demo model in {data_dir / 'demo'} (about a minute)...", flush=True)
        run_demo(data_dir / "demo", quick=True, progress=False)
    size = 64  # the demo's SynthDerm resolution
    if _absent(data_dir, "validation"):
        validation = _synth(VALIDATION_N, VALIDATION_SEED, size)
        save_npz(data_dir / "validation.npz", as_array_dataset(validation))
    if _absent(data_dir, "replay"):
        replay = _synth(REPLAY_N, REPLAY_SEED, size, rate=0.95)
        save_npz(data_dir / "replay.npz", as_array_dataset(replay))
    gallery = data_dir / "gallery"
    if not gallery.is_dir():
        write_gallery(gallery, _synth(GALLERY_N, GALLERY_SEED, size))
    return checkpoint


def write_gallery(folder: Path, synth) -> None:
    """PNGs named by class and artifact, and ``labels.json``; written beside, then renamed."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    labels = {}
    for i in range(len(synth)):
        label = synth.classes[int(synth.labels[i])]
        name = f"{i:02d}-{label}{'-patch' if synth.has_artifact[i] else ''}.png"
        write_bytes(tmp / name, png_bytes(synth.images[i]))
        labels[name] = label
    write_bytes(tmp / "labels.json", json.dumps(labels, indent=1).encode())
    tmp.replace(folder)
