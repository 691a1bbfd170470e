"""Query expansion on a trained model's own explanation layer: SynthDerm's feedback pool, k hand
marks (the draws of propagation_efficiency.py), the outlined proposals at the documented
threshold with and without expansion, and what the simulated reviewer would accept (IoU >= 0.5
with the true artifact) or reject (docs/propagation.md, "Query expansion").

    python experiments/propagation_expansion_synth.py --cache /tmp/discovery
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from propagation_efficiency import ACCEPT_IOU, CELL  # noqa: E402

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path("/tmp/discovery"), help="baselines")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    cfg = BenchConfig()
    for confounder in ("patch", "ruler"):
        for seed in args.seeds:
            d = synth_data(seed, confounder, cfg.synth_n)
            path = args.cache / f"base_{confounder}_{seed}.pt"
            base = baseline(path, d, cfg.synth, seed)
            pool = d.pool
            n, true = len(pool), pool.ignore
            has = true.reshape(n, -1).any(1)
            features = layer_activations(base, pool.images)
            order = np.random.default_rng([seed, 19]).permutation(np.flatnonzero(has))
            for k in (1, 5):
                hand = order[:k]
                marks = {int(i): true[i] for i in hand}
                colour = colour_proposals(pool.images, marks, seed=seed)
                for expand_at in (None, DEFAULT_THRESHOLD):
                    props = concept_proposals(
                        features, marks, pool.size, seed=seed, expand_at=expand_at
                    )
                    props = outlined(props, colour, CELL)
                    proposed = props.proposed(DEFAULT_THRESHOLD)
                    proposed[hand] = False
                    masks = props.masks()
                    overlap = np.array(
                        [iou(masks[i], true[i]) if has[i] else 0.0 for i in range(n)]
                    )
                    accepted = proposed & (overlap >= ACCEPT_IOU)
                    row = {
                        "confounder": confounder,
                        "seed": seed,
                        "k": k,
                        "expand_at": expand_at,
                        "with_artifact": int(has.sum()),
                        "proposed": int(proposed.sum()),
                        "proposed_with_artifact": int((proposed & has).sum()),
                        "accepted": int(accepted.sum()),
                        "rejected": int((proposed & ~accepted).sum()),
                    }
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
