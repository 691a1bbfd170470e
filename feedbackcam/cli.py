"""The ``feedbackcam`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from . import __version__


def _modes(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _add_simulate(sub) -> None:
    from .losses import EXPLANATION_LOSSES

    p = sub.add_parser(
        "simulate",
        help="run the thesis' feedback simulations (chapter 5)",
        description="Train or load a baseline, then fine-tune it from simulated class and "
        "explanation feedback per loss mode; write config, history, results, table, plots "
        "and checkpoints to --out.",
    )
    p.add_argument("--data", default="synth", help="'synth' (embedded SynthDerm)")
    p.add_argument("--modes", type=_modes, default=("cls", "exp", "combined"))
    p.add_argument("--lambda", dest="lam", type=float, default=0.3)
    p.add_argument("--balance", choices=("none", "reduce", "upsample"), default="none")
    p.add_argument("--drop-classes", type=_modes, default=(), help="e.g. BKL (with reduce)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--slices", type=int, default=None)
    p.add_argument("--slice-epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--select-by", choices=("jaccard", "accuracy"), default="jaccard")
    p.add_argument("--explanation-loss", choices=EXPLANATION_LOSSES, default="jaccard")
    p.add_argument("--cam", choices=("gradcam", "gradcam++"), default="gradcam")
    p.add_argument("--second-order", choices=("detached", "full"), default="detached")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--clip-grad-norm", type=float, default=None)
    p.add_argument("--size", type=int, default=64, help="SynthDerm resolution")
    p.add_argument("--n-base", type=int, default=900, help="SynthDerm base-set size")
    p.add_argument("--n-feedback", type=int, default=900, help="SynthDerm feedback-pool size")
    p.add_argument("--confounder-rate", type=float, default=0.95)
    p.add_argument("--no-confounder", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_simulate)


def _simulate(args) -> int:
    import torch

    from .checkpoint import ModelSpec
    from .data.synth import CLASSES
    from .demo import SynthSetup, synth_simulation_data
    from .models import build_model
    from .simulate import SimulationConfig, run_simulation
    from .train import FeedbackConfig

    if args.data != "synth":
        raise SystemExit(
            f"--data {args.data}: only 'synth' is supported so far; prepared ISIC folders "
            "arrive with `feedbackcam data prepare`"
        )
    cfg = SimulationConfig(
        modes=args.modes,
        lam=args.lam,
        epochs=args.epochs,
        slices=args.slices,
        slice_epochs=args.slice_epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        balance=args.balance,
        drop_classes=args.drop_classes,
        select_by=args.select_by,
        base_epochs=12,
        base_lr=2e-3,
        feedback=FeedbackConfig(
            lam=args.lam,
            explanation_loss=args.explanation_loss,
            cam=args.cam,
            second_order=args.second_order,
            temperature=args.temperature,
            clip_grad_norm=args.clip_grad_norm,
        ),
        seed=args.seed,
        device=args.device,
    )
    setup = SynthSetup(
        size=args.size,
        n_base=args.n_base,
        n_feedback=args.n_feedback,
        confounder=None if args.no_confounder else "patch",
        confounder_rate=args.confounder_rate,
        seed=args.seed,
    )
    data, _ = synth_simulation_data(setup)
    spec = ModelSpec("small_cnn", CLASSES, ("features.relu4",), args.size, {"width": 32})

    def make_model():
        torch.manual_seed(args.seed)
        return build_model("small_cnn", len(CLASSES), width=32)

    results = run_simulation(data, replace(cfg), args.out, make_model=make_model, spec=spec)
    _print_summary(results)
    print(f"results: {args.out / 'results.md'}")
    return 0


def _print_summary(results: dict) -> None:
    rows = [("baseline", results["baseline"])] + list(results["runs"].items())
    for name, r in rows:
        print(f"{name:>9}: accuracy {r['accuracy']:.3f}  mean Jaccard {r['jaccard_mean']:.3f}")


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole loop on embedded synthetic data (a few minutes on a CPU)",
        description="Build SynthDerm with a confounder, train a baseline, run class, "
        "explanation and combined feedback, and write a self-contained HTML report.",
    )
    p.add_argument("--out", type=Path, default=Path("feedbackcam-demo"))
    p.add_argument("--quick", action="store_true", help="a smaller run (under a minute)")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from .demo import run_demo

    report = run_demo(args.out, quick=args.quick)
    print(f"report: {report.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="feedbackcam",
        description="Correct an image classifier through its explanation, and make it learn.",
    )
    parser.add_argument("--version", action="version", version=f"feedbackcam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_simulate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
