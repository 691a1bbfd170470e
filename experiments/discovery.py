"""Discovery measured on SynthDerm (docs/discovery.md): the suspicious-first order and the
explanation clusters of a model trained on confounded data, judged against what the labels-free
methods never read — which images carry the artifact, and on which it decides.

For each confounder (patch, ruler) and seed: the benchmark's baseline (docs/shortcuts.md:
SynthDerm with the artifact on 95 % of melanomas and 5 % of the rest, small CNN) and its
feedback pool (900 images, the images a clinician would review), with SynthDerm's lesion masks
as the keep masks. Reported:
- order: the share of the artifact's images (and of the images where it *decides*: the
  prediction changes when it is removed) in the first 30 % of the suspicious-first order; each
  sign alone; at random the share is 0.30, and with more artifact images than 30 % of the list
  the best possible is below 1 (``ceiling``);
- clusters: the most suspicious cluster's size and its share of artifact / deciding images,
  for map and activation features.

    python experiments/discovery.py --json docs/discovery/synth.json --figure docs/discovery
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from feedbackcam.clusters import explanation_clusters, map_features, write_sheet
from feedbackcam.data.synth import SynthConfig, make_synthderm
from feedbackcam.fileio import write_json
from feedbackcam.self_explaining import layer_activations
from feedbackcam.shortcuts.bench import baseline
from feedbackcam.shortcuts.config import BenchConfig
from feedbackcam.shortcuts.data import float_images, synth_data
from feedbackcam.suspicion import SIGNS, suspicion

SHARE = 0.3


def top_share(score: np.ndarray, flags: np.ndarray, share: float = SHARE) -> float:
    """The share of ``flags`` among the first ``share`` of images ordered by ``score``."""
    order = np.argsort(-np.nan_to_num(score, nan=-1.0), kind="stable")
    head = order[: int(share * len(score))]
    return float(flags[head].sum() / max(flags.sum(), 1))


def run(confounder: str, seed: int, cache: Path, figure: Path | None) -> dict:
    cfg = BenchConfig()
    d = synth_data(seed, confounder, cfg.synth_n)
    model = baseline(cache / f"base_{confounder}_{seed}.pt", d, cfg.synth, seed)
    pool = d.pool
    # the pool's lesion masks: the same generator call as synth_data's pool
    made = make_synthderm(
        SynthConfig(n=cfg.synth_n[1], size=64, seed=1000 * seed + 1, confounder=confounder,
                    confounder_rate=0.95)
    )  # fmt: skip
    assert (made.images == pool.images).all()
    lesion = made.lesion_masks
    has = pool.ignore.reshape(len(pool), -1).any(1)
    started = time.perf_counter()
    sus = suspicion(model, pool.images, lesion, seed=seed)
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        clean = model(float_images(d.clean_pool.images)).logits.argmax(1).numpy()
    decides = has & (clean != sus.predicted)
    row = {
        "confounder": confounder,
        "seed": seed,
        "images": len(pool),
        "artifact_share": float(has.mean()),
        "decides_share": float(decides.mean()),
        "ceiling": float(min(1.0, SHARE * len(pool) / has.sum())),
        "order": {
            name: {
                "artifact": top_share(getattr(sus, name), has),
                "decides": top_share(getattr(sus, name), decides),
            }
            for name in ("score", *SIGNS)
        },
        "suspicion_seconds": round(seconds, 1),
        "clusters": {},
    }
    feats = {
        "maps": map_features(sus.maps),
        "activations": layer_activations(model, pool.images).mean((2, 3)).numpy(),
    }
    for kind, f in feats.items():
        found = explanation_clusters(f, sus.predicted, sus.score, seed=seed)
        top = found.ranked[0]
        row["clusters"][kind] = {
            "top_size": int(len(found.members[top])),
            "top_class": d.classes[found.classes[top]],
            "top_artifact": found.purity(has),
            "top_decides": found.purity(decides),
            "second_artifact": found.purity(has, found.ranked[1]),
            "n_clusters": len(found.ranked),
        }
        if figure is not None and kind == "maps" and seed == 0:
            path = figure / f"clusters_{confounder}.png"
            share = {c: f"{confounder} on {found.purity(has, c):.0%}" for c in found.ranked}
            write_sheet(model, pool.images, lesion, found, d.classes, path, clusters=6,
                        note=share.get)  # fmt: skip
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--figure", type=Path, default=None, help="folder for the seed-0 sheets")
    p.add_argument("--cache", type=Path, default=Path("/tmp/discovery"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--confounders", nargs="+", default=["patch", "ruler"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.figure is not None:
        args.figure.mkdir(parents=True, exist_ok=True)
    rows = []
    for confounder in args.confounders:
        for seed in args.seeds:
            rows.append(run(confounder, seed, args.cache, args.figure))
            print(json.dumps(rows[-1]), flush=True)
    meta = {
        "rows": rows,
        "share": SHARE,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), CPU",
    }
    write_json(args.json, meta)


if __name__ == "__main__":
    main()
