"""Which explanation loss removes the SynthDerm patch shortcut? (docs/results.md)

Trains one baseline on confounded SynthDerm, then fine-tunes it with each feedback setting and
reports test accuracy (the test patch is random), accuracy where the patch misleads, MEL
sensitivity and mean Jaccard. Usage: python experiments/confounder.py OUT_DIR [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from feedbackcam.checkpoint import ModelSpec, load_checkpoint
from feedbackcam.data.synth import CLASSES
from feedbackcam.demo import DemoConfig
from feedbackcam.fileio import write_json
from feedbackcam.models import build_model
from feedbackcam.objective import FeedbackConfig
from feedbackcam.simulate import run_simulation
from feedbackcam.simulation_data import synth_simulation_data

SETTINGS: dict[str, tuple[str, FeedbackConfig, dict]] = {
    "cls": ("cls", FeedbackConfig(), {}),
    "jaccard l=0.3": ("combined", FeedbackConfig(), {}),
    "jaccard l=1": ("exp", FeedbackConfig(), {}),
    "jaccard l=0.7": ("combined", FeedbackConfig(), {"lam": 0.7}),
    "jaccard l=0.9": ("combined", FeedbackConfig(), {"lam": 0.9}),
    "jaccard l=0.97": ("combined", FeedbackConfig(), {"lam": 0.97}),
    "jaccard full 2nd order l=0.7": ("combined", FeedbackConfig(second_order="full"), {"lam": 0.7}),
    "jaccard gradcam++ l=0.3": ("combined", FeedbackConfig(cam="gradcam++"), {}),
    "jaccard gradcam++ l=0.7": ("combined", FeedbackConfig(cam="gradcam++"), {"lam": 0.7}),
    "jaccard T=0.05 l=0.7": ("combined", FeedbackConfig(temperature=0.05), {"lam": 0.7}),
    "dice l=0.7": ("combined", FeedbackConfig(explanation_loss="dice"), {"lam": 0.7}),
    "energy l=0.7": ("combined", FeedbackConfig(explanation_loss="energy"), {"lam": 0.7}),
    "mse l=0.7": ("combined", FeedbackConfig(explanation_loss="mse"), {"lam": 0.7}),
    "rrr x100 l=0.7": (
        "combined",
        FeedbackConfig(explanation_loss="rrr", rrr_scale=100),
        {"lam": 0.7},
    ),
    "rrr x1000 l=0.7": (
        "combined",
        FeedbackConfig(explanation_loss="rrr", rrr_scale=1000),
        {"lam": 0.7},
    ),
    "rrr x10000 l=0.7": (
        "combined",
        FeedbackConfig(explanation_loss="rrr", rrr_scale=10000),
        {"lam": 0.7},
    ),
    "jaccard all-classes l=0.7": ("combined", FeedbackConfig(explain_classes="all"), {"lam": 0.7}),
    "jaccard predicted l=0.7": (
        "combined",
        FeedbackConfig(explain_classes="predicted"),
        {"lam": 0.7},
    ),
    "energy all-classes l=0.7": (
        "combined",
        FeedbackConfig(explanation_loss="energy", explain_classes="all"),
        {"lam": 0.7},
    ),
    "energy predicted l=0.7": (
        "combined",
        FeedbackConfig(explanation_loss="energy", explain_classes="predicted"),
        {"lam": 0.7},
    ),
    "rrr x1000 l=0.7 by acc": (
        "combined",
        FeedbackConfig(explanation_loss="rrr", rrr_scale=1000),
        {"lam": 0.7, "select_by": "accuracy"},
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    demo = DemoConfig()
    rows = []
    for seed in args.seeds:
        setup = replace(demo.synth, seed=seed)
        data, _ = synth_simulation_data(setup)
        spec = ModelSpec(
            "small_cnn", CLASSES, ("features.relu4",), setup.size, {"width": demo.width}
        )
        base_dir = args.out / f"seed{seed}" / "baseline"
        base_cfg = replace(demo.simulation, seed=seed, modes=("cls",), epochs=1)

        def make_model(seed=seed):
            torch.manual_seed(seed)
            return build_model("small_cnn", len(CLASSES), width=demo.width)

        if not (base_dir / "checkpoints" / "baseline.pt").exists():
            run_simulation(
                data, base_cfg, base_dir, make_model=make_model, spec=spec, progress=False
            )
        for name, (mode, fb, extra) in SETTINGS.items():
            if args.only and name not in args.only:
                continue
            baseline, _, _ = load_checkpoint(base_dir / "checkpoints" / "baseline.pt")
            extra = dict(extra)  # lambda belongs to the feedback config, the rest to the run
            fb = replace(fb, lam=extra.pop("lam")) if "lam" in extra else fb
            cfg = replace(demo.simulation, seed=seed, modes=(mode,), feedback=fb, **extra)
            res = run_simulation(
                data,
                cfg,
                args.out / f"seed{seed}" / name.replace(" ", "_"),
                make_model=make_model,
                spec=spec,
                baseline=baseline,
                progress=False,
            )
            for label, r in [("baseline", res["baseline"]), (name, res["runs"][mode])]:
                if label == "baseline" and any(
                    x["setting"] == "baseline" and x["seed"] == seed for x in rows
                ):
                    continue
                rows.append(
                    {
                        "seed": seed,
                        "setting": label,
                        "accuracy": r["accuracy"],
                        "misleads": r["groups"]["artifact misleads"]["accuracy"],
                        "no_artifact": r["groups"]["no artifact"]["accuracy"],
                        "sens_MEL": r["sensitivity"]["MEL"],
                        "avg_sens": r["avg_sensitivity"],
                        "jaccard": r["jaccard_mean"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                with open(args.out / "log.jsonl", "a") as log:
                    log.write(json.dumps(rows[-1]) + "\n")
    write_json(args.out / "rows.json", rows)


if __name__ == "__main__":
    main()
