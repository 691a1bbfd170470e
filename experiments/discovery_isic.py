"""Discovery on real dermoscopy (docs/discovery.md): the suspicious-first order and the
explanation clusters of the ``isic-real`` baseline (EfficientNet-Lite0 trained on ISIC 2017 as
downloaded, 128 px; docs/real-artifacts.md) on its own training images, judged against the
published artifact annotations that the methods never read: the 121 real coloured patches, and
the rulers, ink (skin markers) and dark corners flagged by Bissoto et al.

    python experiments/discovery_isic.py --isic-root ../shared/data/isic2017-256 \\
        --cache /tmp/isic-cache --json docs/discovery/isic.json --figure docs/discovery
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
from feedbackcam.fileio import write_json
from feedbackcam.shortcuts.bench import baseline
from feedbackcam.shortcuts.config import BenchConfig
from feedbackcam.shortcuts.datasets import load_data
from feedbackcam.shortcuts.isic_real import artifacts_root, flags_of, read_annotations
from feedbackcam.suspicion import SIGNS, suspicion

SHARE = 0.3
ARTIFACTS = ("patch", "ruler", "ink", "dark_corner")


def top_share(score: np.ndarray, flags: np.ndarray, share: float = SHARE) -> float:
    order = np.argsort(-np.nan_to_num(score, nan=-1.0), kind="stable")
    return float(flags[order[: int(share * len(score))]].sum() / max(flags.sum(), 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--isic-root", required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--figure", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(datasets=("isic-real",), isic_root=args.isic_root)
    args.cache.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data, sched = load_data("isic-real", args.seed, cfg, args.cache / "data")
    model = baseline(args.cache / f"isic-real-seed{args.seed}.pt", data, sched, args.seed)
    trained = time.perf_counter() - started
    base = data.base
    lists, _, flag_ids, flags = read_annotations(str(artifacts_root(cfg)), cfg.isic_size)
    every = flags_of(base.ids, flag_ids, flags)
    truth = {
        "patch": np.isin(np.array(base.ids), lists["patch"]),
        "ruler": every["ruler"],
        "ink": every["ink"],
        "dark_corner": every["dark_corner"],
    }
    started = time.perf_counter()
    sus = suspicion(model, base.images, base.masks, seed=args.seed)
    seconds = time.perf_counter() - started
    row = {
        "seed": args.seed,
        "images": len(base),
        "shares": {a: float(truth[a].mean()) for a in ARTIFACTS},
        "order": {
            name: {a: top_share(getattr(sus, name), truth[a]) for a in ARTIFACTS}
            for name in ("score", *SIGNS)
        },
        "clusters": {},
        "baseline_seconds": round(trained),
        "suspicion_seconds": round(seconds),
    }
    found = explanation_clusters(map_features(sus.maps), sus.predicted, sus.score, seed=args.seed)
    top = found.ranked[:5]
    row["clusters"] = [
        {
            "rank": r,
            "class": base.classes[found.classes[c]],
            "images": int(len(found.members[c])),
            "suspicion": found.suspicion[c],
            **{a: found.purity(truth[a], c) for a in ARTIFACTS},
            **{
                f"{a}_in_class": float(truth[a][sus.predicted == found.classes[c]].mean())
                for a in ARTIFACTS
            },
        }
        for r, c in enumerate(top, 1)
    ]
    print(json.dumps(row, indent=1), flush=True)
    if args.figure is not None:

        def note(c: int) -> str:
            return (
                f"patch {found.purity(truth['patch'], c):.0%}, "
                f"ruler {found.purity(truth['ruler'], c):.0%}"
            )

        path = args.figure / "clusters_isic.png"
        write_sheet(model, base.images, base.masks, found, base.classes, path, clusters=len(top),
                    note=note)  # fmt: skip
    meta = {"row": row, "machine": f"{platform.machine()}, {args.threads} thread(s), CPU"}
    write_json(args.json, meta)


if __name__ == "__main__":
    main()
