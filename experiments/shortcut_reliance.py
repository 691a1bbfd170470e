"""How much does a model rely on the SynthDerm patch? Counterfactual test (docs/results.md).

The test pool is drawn twice from the same seed: with the patch at random and with no patch at
all. Images differ only inside the patch, so the change of a model's prediction when the patch
is removed measures how much the patch alone drives it. Usage:
python experiments/shortcut_reliance.py RUNS_DIR  (the output folder of confounder.py)
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from feedbackcam.checkpoint import load_checkpoint
from feedbackcam.data.synth import CLASSES, SynthConfig, make_synthderm
from feedbackcam.demo import DemoConfig
from feedbackcam.explain import explain
from feedbackcam.fileio import write_json


def reliance(model, with_patch, without_patch, has_patch) -> dict[str, float]:
    def probs(images):
        x = torch.from_numpy(images[has_patch]).permute(0, 3, 1, 2).float() / 255
        return explain(model, x).probs.numpy()

    p1, p0 = probs(with_patch), probs(without_patch)
    mel = CLASSES.index("MEL")
    return {
        "flip_rate": float((p1.argmax(1) != p0.argmax(1)).mean()),
        "mel_prob_shift": float((p1[:, mel] - p0[:, mel]).mean()),
    }


def main() -> None:
    runs = Path(sys.argv[1])
    setup = DemoConfig().synth
    rows = []
    for seed_dir in sorted(runs.glob("seed*")):
        seed = int(seed_dir.name[4:])
        s = replace(setup, seed=seed)
        cfg = SynthConfig(
            n=s.n_feedback,
            size=s.size,
            seed=seed + 1,
            confounder="patch",
            confounder_rate=0.5,
            id_prefix="SYN",
        )
        patched = make_synthderm(cfg)
        clean = make_synthderm(replace(cfg, confounder=None))
        assert np.array_equal(patched.labels, clean.labels)
        for ckpt in sorted(seed_dir.glob("*/checkpoints/*.pt")):
            run = ckpt.parent.parent.name
            if (ckpt.stem == "baseline") != (run == "baseline"):
                continue  # each run's copy of the baseline, or the baseline folder's cls run
            name = run
            model, _, _ = load_checkpoint(ckpt)
            r = reliance(model, patched.images, clean.images, patched.has_artifact)
            rows.append({"seed": seed, "setting": name} | r)
            print(json.dumps(rows[-1]), flush=True)
    write_json(runs / "reliance.json", rows)


if __name__ == "__main__":
    main()
