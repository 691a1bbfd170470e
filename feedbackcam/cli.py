"""The ``feedbackcam`` command line: demo, simulate, data check/prepare, train-base, evaluate,
explain, import-keras. Heavy imports happen inside the commands so ``--help`` is instant."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__


def _names(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """Every command's ``--help`` shows each option's default (subcommands inherit this)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        if args and args[0].startswith("-") and kwargs.get("action") not in ("help", "version"):
            kwargs.setdefault("help", " ")  # no help text would hide the default too
        return super().add_argument(*args, **kwargs)


# --------------------------------------------------------------------------- demo / simulate


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


def _add_model_args(p, default_arch: str) -> None:
    p.add_argument(
        "--model",
        default=default_arch,
        help="small_cnn | skincare_vgg16 | efficientnet_lite0 | torchvision:NAME | timm:NAME",
    )
    p.add_argument("--layer", default=None, help="explanation layer (torchvision/timm models)")
    p.add_argument(
        "--weights",
        default="none",
        help="'imagenet' (skincare_vgg16: a download; efficientnet_lite0: shipped offline), "
        "'none', or a local weights file",
    )
    p.add_argument("--width", type=int, default=32, help="small_cnn width")


def _build(args, num_classes: int):
    from .models import build_model

    weights = None if args.weights in (None, "none") else args.weights
    kwargs = {"width": args.width} if args.model == "small_cnn" else {}
    model = build_model(args.model, num_classes, layers=args.layer, weights=weights, **kwargs)
    return model, kwargs


def _add_feedback_args(p) -> None:
    """The FeedbackConfig flags; defaults and choices come from the dataclass and registries."""
    from .cam import CAM_METHODS
    from .losses import EXPLANATION_LOSSES
    from .train import EXPLAIN_CLASSES, FeedbackConfig

    fb = FeedbackConfig()
    p.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=fb.lam,
        help="lambda of L = (1 - lambda) L_cls + lambda L_exp (eq. 4.1)",
    )
    p.add_argument(
        "--explanation-loss",
        choices=tuple(EXPLANATION_LOSSES),
        default=fb.explanation_loss,
        help="; ".join(
            f"{k}: {v.summary} ({v.needs} masks)" for k, v in EXPLANATION_LOSSES.items()
        ),
    )
    p.add_argument(
        "--ignore-loss",
        choices=(*(k for k, v in EXPLANATION_LOSSES.items() if v.needs == "ignore"), "none"),
        default=fb.ignore_loss,
        help="a loss that learns from ignore masks, added to the explanation loss where an "
        "image has one (its scale calibrated so that its starting gradient equals the class "
        "loss's); 'none' leaves ignore masks unused",
    )
    p.add_argument(
        "--auto-scale",
        action=argparse.BooleanOptionalAction,
        default=fb.auto_scale,
        help="scale the explanation loss so that its starting gradient equals the class "
        "loss's: lambda becomes the explanation share of the gradient (docs/shortcuts.md)",
    )
    p.add_argument("--explain-classes", choices=EXPLAIN_CLASSES, default=fb.explain_classes)
    p.add_argument("--cam", choices=tuple(CAM_METHODS), default=fb.cam)
    p.add_argument("--second-order", choices=("detached", "full"), default=fb.second_order)
    p.add_argument("--temperature", type=float, default=fb.temperature)
    p.add_argument("--clip-grad-norm", type=float, default=fb.clip_grad_norm)
    p.add_argument("--precision", choices=("fp32", "bf16"), default=fb.precision)


def _feedback_config(args):
    from .train import FeedbackConfig

    return FeedbackConfig(
        lam=args.lam,
        explanation_loss=args.explanation_loss,
        ignore_loss=None if args.ignore_loss == "none" else args.ignore_loss,
        auto_scale=args.auto_scale,
        explain_classes=args.explain_classes,
        cam=args.cam,
        second_order=args.second_order,
        temperature=args.temperature,
        clip_grad_norm=args.clip_grad_norm,
        precision=args.precision,
    )


def _add_simulate(sub) -> None:
    from .demo import SynthSetup
    from .simulate import MODES, SimulationConfig

    d, synth = SimulationConfig(), SynthSetup()
    p = sub.add_parser(
        "simulate",
        help="run the thesis' feedback simulations (chapter 5)",
        description="Train or load a baseline, then fine-tune it from simulated class and "
        "explanation feedback per loss mode; write config, history, results, table, plots "
        "and checkpoints to --out. Defaults reproduce the thesis (batch 1, SGD, 40 epochs).",
    )
    p.add_argument("--data", default="synth", help="'synth' or a prepared folder")
    p.add_argument("--modes", type=_names, default=d.modes, help=f"a subset of {MODES}")
    _add_feedback_args(p)
    p.add_argument("--balance", choices=("none", "reduce", "upsample"), default=d.balance)
    p.add_argument("--drop-classes", type=_names, default=d.drop_classes, help="e.g. BKL (5.7)")
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
        "--guard-per-class", action="store_true", help="the guard holds every class's sensitivity"
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
    _add_model_args(p, "small_cnn")
    p.add_argument("--size", type=int, default=synth.size, help="SynthDerm resolution")
    p.add_argument("--n-base", type=int, default=synth.n_base, help="SynthDerm base-set size")
    p.add_argument("--n-feedback", type=int, default=synth.n_feedback, help="SynthDerm pool size")
    p.add_argument("--confounder-rate", type=float, default=synth.confounder_rate)
    p.add_argument("--no-confounder", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_simulate)


def _simulation_config(args):
    from .simulate import SimulationConfig

    return SimulationConfig(
        modes=args.modes,
        feedback=_feedback_config(args),
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
        base_epochs=args.base_epochs,
        base_lr=args.base_lr,
        base_batch_size=args.base_batch_size,
        seed=args.seed,
        device=args.device,
    )


def _simulate(args) -> int:
    from dataclasses import replace

    import torch

    from .checkpoint import ModelSpec, load_checkpoint
    from .distributed import init_from_env
    from .simulate import prepared_simulation_data, run_simulation, seen_ids_of

    ctx, device = init_from_env(args.device)
    cfg = replace(_simulation_config(args), device=device)
    baseline, payload = None, None
    if args.base_model is not None:
        baseline, spec, payload = load_checkpoint(args.base_model)
    if args.data == "synth":
        from .data.synth import CLASSES
        from .demo import SynthSetup, synth_simulation_data

        setup = SynthSetup(
            size=args.size,
            n_base=args.n_base,
            n_feedback=args.n_feedback,
            confounder=None if args.no_confounder else "patch",
            confounder_rate=args.confounder_rate,
            seed=args.seed,
        )
        data, _ = synth_simulation_data(setup)
        classes, size = CLASSES, args.size
    else:
        from .data.prepared import load_prepared

        prepared = load_prepared(args.data, mmap=False)
        seen = seen_ids_of(payload) if payload is not None else ()
        if args.overlap is not None:
            seen = seen + load_prepared(args.overlap).ids
        overlap = len(set(seen) & set(prepared.ids))
        if seen and ctx.is_main:
            print(
                f"{overlap} image(s) of {args.data} were seen by the base model "
                f"({args.base_model or args.overlap}): kept in feedback-train only, never in "
                "val or test"
            )
        data = prepared_simulation_data(
            prepared,
            base_fraction=None if baseline is not None else args.base_fraction,
            seen_ids=seen,
            seed=args.seed,
        )
        classes, size = prepared.classes, prepared.size
    if baseline is not None:
        data = data.with_classes(spec.classes, args.base_model)
    else:
        probe, kwargs = _build(args, len(classes))
        spec = ModelSpec(args.model, tuple(classes), probe.layers, size, kwargs)

    def make_model():
        torch.manual_seed(args.seed)
        return _build(args, len(classes))[0]

    results = run_simulation(
        data, cfg, args.out, make_model=make_model, spec=spec, baseline=baseline, ctx=ctx
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
    p = sub.add_parser(
        "shortcuts",
        help="the shortcut-removal benchmark: Decoy-MNIST and SynthDerm, methods, controls "
        "(docs/shortcuts.md); 'feedbackcam shortcuts --help' lists its options",
        add_help=False,
        prefix_chars="+",  # every option goes on to the benchmark's own parser
    )
    p.add_argument("args", nargs="*")

    def run(args) -> int:
        from .shortcuts import main as shortcuts_main

        shortcuts_main(args.args)
        return 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- data


def _layout(text: str) -> str:
    return text.replace("-", "_")


def _add_data(sub) -> None:
    from .data.layouts import LAYOUTS

    p = sub.add_parser("data", help="check and prepare datasets (ISIC layouts or your own)")
    dsub = p.add_subparsers(dest="data_command", required=True)
    for name, helptext in [
        ("check", "list class counts and every problem with its file; exit 1 on errors"),
        ("prepare", "decode once, resize, store memory-mappable arrays and an index"),
    ]:
        q = dsub.add_parser(name, help=helptext, description=helptext)
        q.add_argument(
            "root",
            type=Path,
            help="the dataset folder: an ISIC layout as downloaded, or your own "
            "(images/, optional masks/ and ignore/, labels.csv; see the README)",
        )
        q.add_argument(
            "--layout",
            type=_layout,
            choices=("auto", *LAYOUTS),
            default="auto",
            help="the folder's layout (default: %(default)s, detected from the folder names)",
        )
        q.add_argument(
            "--labels",
            type=Path,
            default=None,
            help="labels CSV: required for isic2018_task2; generic: default ROOT/labels.csv",
        )
        q.add_argument(
            "--classes",
            type=_names,
            default=None,
            help="generic: class names in label order, e.g. NV,MEL,BKL; a CSV row of another "
            "class is an error (default: the classes the CSV names)",
        )
        q.add_argument(
            "--attributes",
            type=_names,
            default=None,
            help="Task 2: attribute subset for the feedback mask (default: all five)",
        )
        q.add_argument(
            "--missing-attribute",
            choices=("error", "empty"),
            default="error",
            help="Task 2: a missing attribute file leaves the image out (error) or counts as an "
            "empty mask (default: %(default)s)",
        )
        if name == "prepare":
            q.add_argument(
                "--size", type=int, default=227, help="side in pixels (default: %(default)s)"
            )
            q.add_argument(
                "--resample",
                choices=("nearest", "bilinear"),
                default="nearest",
                help="how images are resized to --size x --size (default: %(default)s, as in "
                "the thesis); masks are always resized nearest-neighbour so they stay 0/1",
            )
            q.add_argument("--out", type=Path, required=True)
        q.set_defaults(func=_data_check if name == "check" else _data_prepare)


def _reader_options(args) -> dict:
    """The reader keyword arguments the flags ask for, refused where the layout has no use
    for them (e.g. --attributes on a generic folder; each layout's options are its row of
    ``data.layouts.LAYOUTS``)."""
    opts = {}
    if args.layout != "auto":
        opts["layout"] = args.layout
    given = {}
    if args.attributes is not None:
        given["attributes"] = ("--attributes", args.attributes)
    if args.missing_attribute != "error":
        given["missing_attribute"] = ("--missing-attribute", args.missing_attribute)
    if args.classes is not None:
        given["classes"] = ("--classes", args.classes)
    if given:
        from .data.layouts import LAYOUTS, detect_layout

        layout = opts.get("layout") or detect_layout(args.root)
        wrong = [flag for key, (flag, _) in given.items() if key not in LAYOUTS[layout].options]
        if wrong:
            takes = "; ".join(
                f"{' and '.join('--' + o.replace('_', '-') for o in r.options)} for {name}"
                for name, r in LAYOUTS.items()
                if set(r.options) & set(given)
            )
            raise CliError(f"{args.root}: layout {layout} takes no {' or '.join(wrong)} ({takes})")
        opts |= {key: value for key, (_, value) in given.items()}
    return opts


def _data_check(args) -> int:
    from .data.check import check_dataset, format_report

    report = check_dataset(args.root, args.labels, **_reader_options(args))
    print(format_report(report))
    return 1 if report.errors else 0


def _data_prepare(args) -> int:
    from .data.prepared import prepare, read_prepared_meta

    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {args.out}: a file is there; expected a folder to create")
    out = prepare(
        args.root,
        args.out,
        size=args.size,
        labels_csv=args.labels,
        image_resample=args.resample,
        **_reader_options(args),
    )
    meta = read_prepared_meta(out)
    counts = meta["counts"]
    ignore = f", {counts['with_ignore']} with ignore masks" if counts.get("with_ignore") else ""
    print(
        f"prepared {counts['images']} image(s) at {args.size}x{args.size} in {out} "
        f"(layout {meta['layout']}): {counts['per_class']}; {counts['with_mask']} with masks"
        f"{ignore}; {counts['excluded']} excluded (see meta.json)"
    )
    return 0


# --------------------------------------------------------------------------- models


def _add_train_base(sub) -> None:
    from .base import BaseConfig

    d = BaseConfig()
    p = sub.add_parser(
        "train-base",
        help="train the base classifier (class-weighted CE, flips + 24 rotations)",
    )
    p.add_argument("--data", type=Path, required=True, help="a prepared folder")
    _add_model_args(p, "skincare_vgg16")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=d.optimizer)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--select-by", choices=("avg_sensitivity", "accuracy"), default=d.select_by)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_train_base)


def _train_base(args) -> int:
    from .base import BaseConfig, train_base
    from .checkpoint import ModelSpec
    from .data.prepared import load_prepared

    data = load_prepared(args.data, mmap=False)
    model, kwargs = _build(args, len(data.classes))
    spec = ModelSpec(args.model, data.classes, model.layers, data.size, kwargs)
    from .distributed import init_from_env

    ctx, device = init_from_env(args.device)
    args.device = device
    cfg = BaseConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        augment=not args.no_augment,
        select_by=args.select_by,
        precision=args.precision,
        seed=args.seed,
        device=args.device,
    )
    result = train_base(model, data, cfg, args.out, spec, ctx=ctx)
    if not ctx.is_main:
        return 0
    print((args.out / "table.md").read_text())
    print(f"best epoch {result['best_epoch']}; checkpoint: {args.out / 'model.pt'}")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="metrics of a checkpoint on a prepared dataset, per image and per class",
        description="Write metrics.json, table.md and predictions.csv (one row per image: "
        "label, prediction, probabilities, Jaccard against the keep mask) to --out; "
        "optionally the saliency maps and a counterfactual comparison.",
    )
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="a prepared folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="explanation = saliency >= this share of its max (default: %(default)s)",
    )
    p.add_argument(
        "--save-maps", action="store_true", help="write each saliency as maps/<id>.png (0-255)"
    )
    p.add_argument(
        "--counterfactual",
        type=Path,
        default=None,
        metavar="OTHER_PREPARED",
        help="a prepared folder of the same ids (e.g. an artifact added or removed): write "
        "counterfactual.json with the flip rate, flips per class pair and both accuracies",
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    from .checkpoint import load_checkpoint
    from .data.prepared import load_prepared
    from .evaluate import (
        counterfactual_report,
        evaluate,
        write_predictions,
        write_saliency_maps,
    )
    from .fileio import write_json, write_text
    from .metrics import per_class_table

    model, spec, _ = load_checkpoint(args.model)

    def load(folder):
        return load_prepared(folder, mmap=False).with_classes(spec.classes, args.model)

    data = load(args.data)
    other = load(args.counterfactual) if args.counterfactual is not None else None
    model.to(args.device)
    ev = evaluate(
        model, data, threshold=args.threshold, device=args.device, keep_saliency=args.save_maps
    )
    args.out.mkdir(parents=True, exist_ok=True)
    summary = ev.summary() | {
        "classes": list(data.classes),
        "model": str(args.model),
        "data": str(args.data),
    }
    summary["per_class"] = {k: v.to_dict() for k, v in ev.classification.per_class.items()}
    write_json(args.out / "metrics.json", summary)
    table = per_class_table(ev.classification)
    write_text(args.out / "table.md", table)
    write_predictions(args.out / "predictions.csv", ev, data, data.ignore)
    print(table)
    print(
        f"accuracy {summary['accuracy']:.3f}, mean (SD) Jaccard "
        f"{ev.jaccard.mean:.3f} ({ev.jaccard.sd:.3f}), ISIC Jaccard {ev.isic_jaccard:.3f}"
    )
    absent = f" ({', '.join(ev.absent_classes)} absent from this set)" if ev.absent_classes else ""
    print(
        f"average sensitivity {ev.classification.avg_sensitivity:.3f} over "
        f"{', '.join(ev.avg_sensitivity_classes)}{absent}"
    )
    written = ["metrics.json", "table.md", "predictions.csv"]
    if args.save_maps:
        write_saliency_maps(args.out / "maps", ev, data.ids)
        written.append("maps/")
    if other is not None:
        report = counterfactual_report(
            model, data, other, names=(str(args.data), str(args.counterfactual)), device=args.device
        )
        write_json(args.out / "counterfactual.json", report)
        written.append("counterfactual.json")
        print(_format_counterfactual(report))
    print(f"written to {args.out}: {', '.join(written)}")
    return 0


def _format_counterfactual(report: dict) -> str:
    a, b = report["data"], report["counterfactual"]
    lines = [
        f"counterfactual {b}: {report['n_flips']} of {report['n']} predictions change "
        f"(flip rate {report['flip_rate']:.3f})",
        *(
            f"  {src} -> {dst}: {n}"
            for src, row in report["flips"].items()
            for dst, n in sorted(row.items(), key=lambda kv: -kv[1])
        ),
        f"  accuracy {report['accuracy'][a]:.3f} on {a}, {report['accuracy'][b]:.3f} on {b}",
    ]
    if report["label_mismatches"]:
        lines.append(f"  warning: {report['label_mismatches']} id(s) have different labels")
    return "\n".join(lines)


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="predict and explain one image; write an overlay PNG")
    p.add_argument("image", type=Path)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    from .cam import CAM_METHODS

    p.add_argument("--cam", choices=tuple(CAM_METHODS), default="gradcam")
    p.add_argument(
        "--fit",
        choices=("squash", "pad"),
        default="squash",
        help="how a non-square image becomes the model's square input: squash (as prepared "
        "training data is) or pad (keep the aspect ratio, black borders); the overlay keeps the "
        "image's aspect ratio either way",
    )
    p.set_defaults(func=_explain)


def _explain(args) -> int:
    from .explain import explain_file

    result = explain_file(args.image, args.model, args.out, method=args.cam, fit=args.fit)
    probs = ", ".join(f"{c} {p:.3f}" for c, p in result["probabilities"].items())
    print(f"{args.image}: {result['predicted']} ({probs}); overlay: {args.out}")
    print(f"input: {result['input']}")
    return 0


def _add_import_keras(sub) -> None:
    p = sub.add_parser("import-keras", help="convert a Keras HDF5 SkinCare VGG16")
    p.add_argument("h5", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--classes", type=_names, default=("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
    )
    p.add_argument("--preprocessing", choices=("caffe", "rescale", "tf", "torch"), default="caffe")
    p.set_defaults(func=_import_keras)


def _import_keras(args) -> int:
    from .checkpoint import ModelSpec, save_checkpoint
    from .keras_import import import_keras

    model = import_keras(args.h5, len(args.classes), preprocessing=args.preprocessing)
    spec = ModelSpec("skincare_vgg16", args.classes, model.layers, 227)
    save_checkpoint(
        args.out,
        model,
        spec,
        config={"imported_from": str(args.h5), "preprocessing": args.preprocessing},
    )
    print(f"{args.h5} -> {args.out}")
    return 0


def _port(text: str) -> int:
    port = int(text) if text.isdigit() else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return port


def _add_store_args(p) -> None:
    """The app's store: ``--data-dir`` and ``--db``, defaults from ``Settings`` (one place)."""
    from .service.settings import Settings

    d = Settings()
    p.add_argument("--db", default=d.db_url, help="SQLAlchemy URL (default: SQLite in --data-dir)")
    p.add_argument("--data-dir", type=Path, default=d.data_dir)


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="the interactive feedback app: predict, explain, correct, learn (web page + API)",
        description="Serve a checkpoint with a web page and a JSON API (docs at /docs). "
        "Without --model, serves the demo's model, training it first if absent.",
    )
    from .service.settings import Settings

    d = Settings()
    p.add_argument("--model", type=Path, default=None, help="a checkpoint (default: the demo's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    _add_store_args(p)
    p.add_argument("--update-every", type=int, default=d.update_every, help="fine-tune after N")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per update")
    p.add_argument("--replay-per-class", type=int, default=d.replay_per_class)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=d.lam,
        help="lambda of L = (1 - lambda) L_cls + lambda L_exp (eq. 4.1)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=d.tolerance,
        help="largest drop in validation accuracy or average sensitivity a promotion may cost",
    )
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20)
    p.add_argument("--device", default=d.device, help="where the model predicts and learns")
    p.add_argument(
        "--low-confidence",
        type=float,
        default=d.low_confidence,
        help="warn below this top probability",
    )
    p.add_argument(
        "--unfamiliar-quantile",
        type=float,
        default=d.unfamiliar_quantile,
        help="warn when an image's energy is above this quantile of the validation set's",
    )

    def run(args) -> int:
        from .service.commands import serve

        return serve(args)

    p.set_defaults(func=run)


def _add_users(sub) -> None:
    p = sub.add_parser("users", help="users of the feedback app (token sign-in)")
    usub = p.add_subparsers(dest="users_command", required=True)
    add = usub.add_parser("add", help="create a user and print their token once")
    add.add_argument("name")
    add.add_argument("--role", choices=("viewer", "clinician", "admin"), required=True)
    add.add_argument("--days", type=float, default=None, help="the token expires after N days")
    listing = usub.add_parser("list", help="list users, roles and token expiry")
    revoke = usub.add_parser("revoke", help="revoke a user's token: it signs in no more")
    revoke.add_argument("name")
    for q in (add, listing, revoke):
        _add_store_args(q)

    def run(args) -> int:
        from .service.commands import users

        return users(args)

    p.set_defaults(func=run)


def _add_worklist(sub) -> None:
    p = sub.add_parser("worklist", help="worklists of the feedback app: images to review")
    wsub = p.add_subparsers(dest="worklist_command", required=True)
    add = wsub.add_parser("add", help="import a folder's PNG and JPEG images as a worklist")
    add.add_argument("folder", type=Path)
    add.add_argument("--name", default=None, help="default: the folder's name")
    listing = wsub.add_parser("list", help="list worklists and their counts")
    for q in (add, listing):
        _add_store_args(q)

    def run(args) -> int:
        from .service.commands import worklist

        return worklist(args)

    p.set_defaults(func=run)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="the feedback app's feedback as a dataset (images/, masks/, ignore/, labels.csv)",
    )
    _add_store_args(p)
    p.add_argument("--out", type=Path, required=True, help="a new or empty folder")

    def run(args) -> int:
        from .service.commands import export

        return export(args)

    p.set_defaults(func=run)


def _add_doctor(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="check the feedback app's data dir and database; --repair what can be repaired",
        description="Check the database, the current version's checkpoint and its SHA-256, "
        "every promoted version, the feedback files and unknown checkpoints. --repair makes the "
        "last good version current and tidies files; no feedback is changed.",
    )
    _add_store_args(p)
    p.add_argument("--repair", action="store_true", help="repair what can be repaired safely")

    def run(args) -> int:
        from .service.doctor import doctor

        return doctor(args)

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="feedbackcam",
        description="Correct an image classifier through its explanation, and make it learn.",
    )
    parser.add_argument("--version", action="version", version=f"feedbackcam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_demo,
        _add_simulate,
        _add_shortcuts,
        _add_data,
        _add_train_base,
        _add_evaluate,
        _add_explain,
        _add_import_keras,
        _add_serve,
        _add_users,
        _add_worklist,
        _add_export,
        _add_doctor,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (CliError, OSError, ValueError) as err:  # user errors: one line, no traceback
        if args.verbose:
            raise
        print(f"feedbackcam {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
