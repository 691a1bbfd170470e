"""The demo's simulation under each collapse guard: the average alone (the default before
2026-12-06), every class's sensitivity, every class's Youden's J against the rest.

The demo's baseline is a model a shortcut shaped (on validation with the patch filled: NV 1.00,
MEL 0.03, BKL 1.00), the case where a per-class guard on sensitivity refuses the repair
(docs/real-artifacts.md, "A guard that tells repair from collapse"). Same data, seed and
schedule for every guard; only the epoch kept can differ.

    python experiments/demo_guard.py OUT [--seeds 0 1 2] [--guards youden]
    python experiments/demo_guard.py OUT --guards youden --symmetries off on  # turned
        # counterfactuals (FeedbackConfig.counterfactual_symmetries) or not, folders *-sym-on
    python experiments/demo_guard.py OUT --guards youden --shares all 0.5 0.3  # the rows a
        # counterfactual term forwards per step (FeedbackConfig.counterfactual_share)
    python experiments/demo_guard.py OUT --guards youden --ignore-losses default \
        invariance_target  # the loss that learns from ignore marks (FeedbackConfig.ignore_loss)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from feedbackcam.demo import DemoConfig, add_patch_reliance, demo_model
from feedbackcam.simulate import run_simulation
from feedbackcam.simulation_data import synth_simulation_data

GUARDS = {
    "average": {"guard_per_class": False},
    "sensitivity": {"guard_per_class": True, "guard_class_measure": "sensitivity"},
    "youden": {"guard_per_class": True, "guard_class_measure": "youden"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--guards", nargs="+", choices=list(GUARDS), default=list(GUARDS))
    p.add_argument(
        "--symmetries",
        nargs="+",
        choices=("default", "on", "off"),
        default=["default"],
        help="the fine-tunes' counterfactual_symmetries: the library's default, or set",
    )
    p.add_argument(
        "--shares",
        nargs="+",
        default=["default"],
        help="the fine-tunes' counterfactual_share: 'default' (the library's), 'all' (None: "
        "every marked row) or a share of the batch",
    )
    p.add_argument(
        "--ignore-losses",
        nargs="+",
        default=["default"],
        help="the fine-tunes' ignore_loss: 'default' (the library's) or a registered loss",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        base = DemoConfig()
        cfg = replace(
            base,
            synth=replace(base.synth, seed=seed),
            simulation=replace(base.simulation, seed=seed),
        )
        data, test_pool = synth_simulation_data(cfg.synth)
        spec, make_model = demo_model(cfg)

        arms = [
            (g, s, c, i)
            for g in args.guards
            for s in args.symmetries
            for c in args.shares
            for i in args.ignore_losses
        ]
        for guard, symmetries, share, ignore_loss in arms:
            fields = GUARDS[guard]
            sim = replace(cfg.simulation, **fields)
            name = guard
            if symmetries != "default":
                feedback = replace(sim.feedback, counterfactual_symmetries=symmetries == "on")
                sim = replace(sim, feedback=feedback)
                name += f"-sym-{symmetries}"
            if share != "default":
                value = None if share == "all" else float(share)
                sim = replace(sim, feedback=replace(sim.feedback, counterfactual_share=value))
                name += f"-share-{share}"
            if ignore_loss != "default":
                sim = replace(sim, feedback=replace(sim.feedback, ignore_loss=ignore_loss))
                name += f"-ignore-{ignore_loss}"
            run_cfg = replace(cfg, simulation=sim)
            out = args.out / f"seed{seed}" / name
            results = run_simulation(
                data, run_cfg.simulation, out, make_model=make_model, spec=spec, progress=False
            )
            results = add_patch_reliance(out, results, run_cfg, test_pool)
            for name, r in [("baseline", results["baseline"]), *results["runs"].items()]:
                rows.append(
                    {
                        "seed": seed,
                        "guard": guard,
                        "symmetries": sim.feedback.counterfactual_symmetries,
                        "share": sim.feedback.counterfactual_share,
                        "ignore_loss": sim.feedback.ignore_loss,
                        "run": name,
                        "best_epoch": r.get("best_epoch"),
                        "rejected": r.get("guard_rejected_epochs"),
                        "accuracy": r["accuracy"],
                        "avg_sensitivity": r["avg_sensitivity"],
                        "sensitivity": r["sensitivity"],
                        "jaccard": r["jaccard_mean"],
                        "patch_flip": r["patch_flip_rate"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    (args.out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
