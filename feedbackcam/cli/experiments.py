"""``feedbackcam demo``, ``simulate`` and ``shortcuts``: the experiments."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..options import (
    add_feedback_args,
    add_model_args,
    build_model_from,
    command,
    feedback_config,
    names,
)


def _add_demo(sub) -> None:
    p = command(sub, "demo", _demo)
    p.add_argument("--out", type=Path, default=Path("feedbackcam-demo"))
    p.add_argument("--quick", action="store_true", help="a smaller run (under a minute)")
    p.add_argument(
        "--refit-bias",
        action="store_true",
        help="re-fit the decision's offsets where the patch was marked (docs/offsets.md)",
    )


def _demo(args) -> int:
    """The whole loop on embedded synthetic data (a few minutes on a CPU).

    Build SynthDerm with a confounder, train a baseline, run class, explanation and combined
    feedback, and write a self-contained HTML report."""
    from ..demo import run_demo

    report = run_demo(args.out, quick=args.quick, refit_bias=args.refit_bias)
    print(f"report: {report.resolve()}")
    return 0


def _add_simulate(sub) -> None:
    from ..selection import CLASS_MEASURES
    from ..simulate import MODES, SimulationConfig
    from ..simulation_data import SynthSetup

    d, synth = SimulationConfig(), SynthSetup()
    p = command(sub, "simulate", _simulate)
    p.add_argument("--data", default="synth", help="'synth' or a prepared folder")
    p.add_argument("--modes", type=names, default=d.modes, help=f"a subset of {MODES}")
    add_feedback_args(p)
    p.add_argument("--balance", choices=("none", "reduce", "upsample"), default=d.balance)
    p.add_argument("--drop-classes", type=names, default=d.drop_classes, help="e.g. BKL (5.7)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--slices", type=int, default=d.slices)
    p.add_argument("--slice-epochs", type=int, default=d.slice_epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--select-by", choices=("jaccard", "accuracy"), default=d.select_by)
    p.add_argument(
        "--guard-tolerance",
        type=float,
        default=d.guard_tolerance,
        help="collapse guard: an epoch whose validation average sensitivity falls more than "
        "this below the baseline's is never selected",
    )
    p.add_argument(
        "--no-guard",
        action="store_true",
        help="select without the collapse guard (the thesis' behaviour)",
    )
    p.add_argument(
        "--guard-per-class",
        action=argparse.BooleanOptionalAction,
        default=d.guard_per_class,
        help="the guard holds every class's score too (the default)",
    )
    p.add_argument(
        "--guard-class-measure",
        choices=CLASS_MEASURES,
        default=d.guard_class_measure,
        help="that score: Youden's J against the rest (a repaired class may lose sensitivity "
        "by what it stops taking from the others) or sensitivity",
    )
    p.add_argument("--base-model", type=Path, default=None, help="a checkpoint (train-base)")
    p.add_argument(
        "--base-fraction",
        type=float,
        default=0.5,
        help="prepared data without --base-model: this stratified share trains the baseline",
    )
    p.add_argument("--base-epochs", type=int, default=d.base_epochs)
    p.add_argument("--base-lr", type=float, default=d.base_lr)
    p.add_argument("--base-batch-size", type=int, default=d.base_batch_size)
    p.add_argument(
        "--overlap",
        type=Path,
        default=None,
        help="a prepared folder (e.g. the base model's data): shared ids stay in feedback-train",
    )
    add_model_args(p, "small_cnn")
    p.add_argument("--size", type=int, default=synth.size, help="SynthDerm resolution")
    p.add_argument("--n-base", type=int, default=synth.n_base, help="SynthDerm base-set size")
    p.add_argument("--n-feedback", type=int, default=synth.n_feedback, help="SynthDerm pool size")
    p.add_argument("--confounder-rate", type=float, default=synth.confounder_rate)
    p.add_argument("--no-confounder", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--out", type=Path, required=True)


def _simulation_config(args):
    from ..simulate import SimulationConfig

    return SimulationConfig(
        modes=args.modes,
        feedback=feedback_config(args),
        epochs=args.epochs,
        slices=args.slices,
        slice_epochs=args.slice_epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        balance=args.balance,
        drop_classes=args.drop_classes,
        select_by=args.select_by,
        guard_tolerance=None if args.no_guard else args.guard_tolerance,
        guard_per_class=args.guard_per_class,
        guard_class_measure=args.guard_class_measure,
        base_epochs=args.base_epochs,
        base_lr=args.base_lr,
        base_batch_size=args.base_batch_size,
        seed=args.seed,
        device=args.device,
    )


def _simulate(args) -> int:
    """Run the thesis' feedback simulations (chapter 5).

    Train or load a baseline, then fine-tune it from simulated class and explanation feedback
    per loss mode; write config, history, results, table, plots and checkpoints to --out.
    Defaults reproduce the thesis (batch 1, SGD, 40 epochs)."""
    from dataclasses import replace

    import torch

    from ..checkpoint import ModelSpec
    from ..distributed import init_from_env
    from ..simulate import run_simulation
    from ..simulation_data import SynthSetup, assemble

    ctx, device = init_from_env(args.device)
    cfg = replace(_simulation_config(args), device=device)
    synth = SynthSetup(
        size=args.size,
        n_base=args.n_base,
        n_feedback=args.n_feedback,
        confounder=None if args.no_confounder else "patch",
        confounder_rate=args.confounder_rate,
        seed=args.seed,
    )
    sim = assemble(
        args.data,
        base_model=args.base_model,
        overlap=args.overlap,
        synth=synth,
        base_fraction=args.base_fraction,
        seed=args.seed,
    )
    if (args.base_model or args.overlap) and args.data != "synth" and ctx.is_main:
        print(
            f"{sim.n_seen} image(s) of {args.data} were seen by the base model "
            f"({args.base_model or args.overlap}): kept in feedback-train only, never in "
            "val or test"
        )
    spec = sim.spec
    if spec is None:
        probe, kwargs = build_model_from(args, len(sim.classes))
        spec = ModelSpec(args.model, sim.classes, probe.layers, sim.size, kwargs)

    def make_model():
        torch.manual_seed(args.seed)
        return build_model_from(args, len(sim.classes))[0]

    results = run_simulation(
        sim.data, cfg, args.out, make_model=make_model, spec=spec, baseline=sim.baseline, ctx=ctx
    )
    if not ctx.is_main:
        return 0
    for name, r in [("baseline", results["baseline"])] + list(results["runs"].items()):
        epoch = f"  best epoch {r['best_epoch']}" if "best_epoch" in r else ""
        print(
            f"{name:>9}: accuracy {r['accuracy']:.3f}  average sensitivity "
            f"{r['avg_sensitivity']:.3f}  mean Jaccard {r['jaccard_mean'] or float('nan'):.3f}"
            + epoch
        )
        for warning in r.get("warnings", []):
            print(f"{'':>11}warning: {warning}")
    print(f"results: {args.out / 'results.md'}")
    return 0


def _add_shortcuts(sub) -> None:
    from ..selection import CLASS_MEASURES
    from ..shortcuts.config import CONTROLS, DATASETS, BenchConfig, check_method, methods

    def method(text: str) -> str:
        try:
            return check_method(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{err}; losses: {', '.join(methods())}") from err

    d = BenchConfig()
    p = command(sub, "shortcuts", _shortcuts)
    p.add_argument("out", type=Path, help="output folder")
    rule = "run nothing: the default-loss rule on OUT/*/runs.jsonl, to OUT/default.md"
    p.add_argument("--choose-default", action="store_true", help=rule)
    p.add_argument("--quick", action="store_true", help="a tiny Decoy-MNIST run (the test's)")

    def bench(flag: str, field: str, **kw) -> None:
        documented = getattr(d, field)
        shown = " ".join(map(str, documented)) if isinstance(documented, tuple) else documented
        p.add_argument(flag, default=argparse.SUPPRESS, help=f"documented run: {shown}", **kw)

    bench("--datasets", "datasets", nargs="+", choices=DATASETS)
    bench("--seeds", "seeds", nargs="+", type=int)
    bench("--tune-seed", "tune_seed", type=int)
    bench("--methods", "methods", nargs="+", type=method, metavar="METHOD")
    bench("--lams", "lams", nargs="+", type=float)
    bench("--isic-size", "isic_size", type=int)
    p.add_argument(
        "--artifacts-root",
        default=argparse.SUPPRESS,
        help="isic-real and the trap splits: the artifact annotations (artifact_lists.json, "
        "patch_masks/, artifact_flags.csv); default: ISIC_ROOT/artifacts",
    )
    bench("--controls", "controls", nargs="*", choices=CONTROLS)
    bench("--control-methods", "control_methods", nargs="*", type=method, metavar="METHOD")
    bench("--control-seeds", "control_seeds", nargs="*", type=int)
    bench("--fractions", "fractions", nargs="*", type=float)
    bench("--efficiency-methods", "efficiency_methods", nargs="*", type=method, metavar="METHOD")
    bench("--efficiency-seeds", "efficiency_seeds", nargs="*", type=int)
    p.add_argument(
        "--isic-root",
        default=argparse.SUPPRESS,
        help="isic-bandaid: an ISIC 2017 folder (official layout, lesion masks), prepared once "
        "into OUT/data/, or a folder prepared from one (feedbackcam data prepare)",
    )
    p.add_argument(
        "--class-weighted",
        action="store_true",
        default=argparse.SUPPRESS,
        help="weight every fine-tuning cross-entropy by inverse class frequency",
    )
    p.add_argument(
        "--refit-bias",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also score every fine-tune after re-fitting its decision's offsets, marked "
        "regions filled: on its pool, on validation, on its pool class-weighted (rows "
        "'METHOD +refit', '+refit val', '+refit weighted')",
    )
    p.add_argument(
        "--select-epoch",
        action="store_true",
        default=argparse.SUPPRESS,
        help="keep each fine-tune's best epoch under the per-class guard (lowest validation "
        "flip rate), as simulate does, instead of its last",
    )
    p.add_argument(
        "--guard-measure",
        choices=CLASS_MEASURES,
        default=argparse.SUPPRESS,
        help="the per-class guard's score: Youden's J against the rest (default) or "
        "sensitivity (the runs before 2026-12-06)",
    )
    p.add_argument(
        "--no-recalibrate-bn",
        dest="recalibrate_batchnorm",
        action="store_false",
        default=argparse.SUPPRESS,
        help="leave BatchNorm's statistics those of the incoming model during fine-tuning (the "
        "runs before 2026-12-05)",
    )
    p.add_argument(
        "--counterfactual-symmetries",
        action="store_true",
        default=argparse.SUPPRESS,
        help="the fine-tunes' counterfactual terms turn or mirror what they move (an option, "
        "not the library's default; docs/real-artifacts.md)",
    )
    p.add_argument(
        "--counterfactual-share",
        type=_share,
        default=argparse.SUPPRESS,
        help="the counterfactual rows a fine-tune's term forwards per step, a share of the batch "
        "in (0, 1] (default: every marked row, as every documented run; the library samples "
        "one, FeedbackConfig.counterfactual_share)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads")


def _share(text: str) -> float:
    from ..objective import check_counterfactual_share

    try:
        share = float(text)
        check_counterfactual_share(share)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected a share of the batch in (0, 1], got {text!r}"
        ) from err
    return share


def _shortcuts(args) -> int:
    """The shortcut-removal benchmark: Decoy-MNIST, SynthDerm, ISIC (docs/shortcuts.md).

    For each data set and seed: a baseline trained on confounded data, every method
    fine-tuning a copy on the feedback pool, the same network trained without the confounder,
    and the metrics that say whether the confounder still decides. Writes config.json,
    runs.jsonl (a rerun resumes from it), runs.csv, summary.md and efficiency.png to OUT. A flag
    not given keeps the documented run's value (or the quick run's, with --quick)."""
    from dataclasses import fields, replace

    import torch

    from ..fileio import write_text
    from ..shortcuts import QUICK, BenchConfig, run_benchmark
    from ..shortcuts.report import default_choice_from

    if args.choose_default:
        text = default_choice_from(args.out)
        write_text(args.out / "default.md", text)
        print(text, end="")
        return 0
    given = {
        f.name: tuple(v) if isinstance(v, list) else v
        for f in fields(BenchConfig)
        if (v := getattr(args, f.name, None)) is not None
    }
    config = replace(QUICK if args.quick else BenchConfig(), **given)
    torch.set_num_threads(args.threads)
    run_benchmark(config, args.out)
    return 0


COMMANDS = (_add_demo, _add_simulate, _add_shortcuts)
