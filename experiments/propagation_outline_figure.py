"""The picture of docs/propagation.md's "Outlined by colour and texture": SynthDerm ruler
proposals from 5 hand marks, outlined by colour and by colour and texture.

    python experiments/propagation_outline_figure.py --cache CACHE \\
        --out docs/propagation/outlines_ruler.png
"""

import argparse
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from feedbackcam.propagate import (
    DEFAULT_THRESHOLD,
    colour_proposals,
    concept_proposals,
    iou,
    outlined,
)
from feedbackcam.self_explaining import layer_activations
from feedbackcam.shortcuts.bench import baseline
from feedbackcam.shortcuts.config import BenchConfig
from feedbackcam.shortcuts.data import synth_data

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument(
    "--cache", type=Path, default=Path("/tmp/discovery"), help="baselines (trained if absent)"
)
p.add_argument("--out", type=Path, required=True)
args = p.parse_args()
torch.set_num_threads(1)
cfg = BenchConfig()
seed = 0
conf = "ruler"
d = synth_data(seed, conf, cfg.synth_n)
base = baseline(args.cache / f"base_{conf}_{seed}.pt", d, cfg.synth, seed)
pool = d.pool
n = len(pool)
true = pool.ignore
has = true.reshape(n, -1).any(1)
feats = layer_activations(base, pool.images)
order = np.random.default_rng([seed, 19]).permutation(np.flatnonzero(has))
hand = order[:5]
marks = {int(i): true[i] for i in hand}
con = concept_proposals(feats, marks, pool.size, seed=seed)
masks = {
    k: outlined(con, colour_proposals(pool.images, marks, seed=seed, features=k), 8).masks()
    for k in ("colour", "appearance")
}
prop = con.proposed(DEFAULT_THRESHOLD)
prop[hand] = False
idx = np.flatnonzero(prop & has)[:5]
fig, ax = plt.subplots(3, len(idx), figsize=(2.2 * len(idx), 7))
for c, i in enumerate(idx):
    for r, (title, m) in enumerate(
        [
            ("true box", true[i]),
            ("colour", masks["colour"][i]),
            ("colour + texture", masks["appearance"][i]),
        ]
    ):
        img = pool.images[i].copy()
        img[m.astype(bool)] = (0.5 * img[m.astype(bool)] + 0.5 * np.array([0, 255, 255])).astype(
            np.uint8
        )
        ax[r, c].imshow(img, interpolation="nearest")
        ax[r, c].axis("off")
        ax[r, c].set_title(title if r == 0 else f"{title}: IoU {iou(m, true[i]):.2f}", fontsize=9)
fig.suptitle(
    "SynthDerm ruler, seed 0: proposals from 5 hand marks, outlined two ways (cyan)", fontsize=10
)
fig.tight_layout()
fig.savefig(args.out, dpi=80)
