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


def _add_simulate(sub) -> None:
    from .losses import EXPLANATION_LOSSES

    p = sub.add_parser(
        "simulate",
        help="run the thesis' feedback simulations (chapter 5)",
        description="Train or load a baseline, then fine-tune it from simulated class and "
        "explanation feedback per loss mode; write config, history, results, table, plots "
        "and checkpoints to --out.",
    )
    p.add_argument("--data", default="synth", help="'synth' or a prepared folder")
    p.add_argument("--modes", type=_names, default=("cls", "exp", "combined"))
    p.add_argument("--lambda", dest="lam", type=float, default=0.3)
    p.add_argument("--balance", choices=("none", "reduce", "upsample"), default="none")
    p.add_argument("--drop-classes", type=_names, default=(), help="e.g. BKL (thesis 5.7)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--slices", type=int, default=None)
    p.add_argument("--slice-epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--select-by", choices=("jaccard", "accuracy"), default="jaccard")
    p.add_argument("--explanation-loss", choices=EXPLANATION_LOSSES, default="jaccard")
    p.add_argument("--explain-classes", choices=("label", "predicted", "all"), default="label")
    p.add_argument("--cam", choices=("gradcam", "gradcam++"), default="gradcam")
    p.add_argument("--second-order", choices=("detached", "full"), default="detached")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--clip-grad-norm", type=float, default=None)
    p.add_argument("--base-model", type=Path, default=None, help="a checkpoint (train-base)")
    p.add_argument(
        "--base-fraction",
        type=float,
        default=0.5,
        help="prepared data without --base-model: this stratified share trains the baseline",
    )
    p.add_argument("--base-epochs", type=int, default=12)
    p.add_argument(
        "--overlap",
        type=Path,
        default=None,
        help="a prepared folder (e.g. the base model's data): shared ids stay in feedback-train",
    )
    _add_model_args(p, "small_cnn")
    p.add_argument("--size", type=int, default=64, help="SynthDerm resolution")
    p.add_argument("--n-base", type=int, default=900, help="SynthDerm base-set size")
    p.add_argument("--n-feedback", type=int, default=900, help="SynthDerm feedback-pool size")
    p.add_argument("--confounder-rate", type=float, default=0.95)
    p.add_argument("--no-confounder", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_simulate)


def _simulation_config(args):
    from .simulate import SimulationConfig
    from .train import FeedbackConfig

    return SimulationConfig(
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
        base_epochs=args.base_epochs,
        base_lr=2e-3 if args.model == "small_cnn" else 1e-4,
        feedback=FeedbackConfig(
            lam=args.lam,
            explanation_loss=args.explanation_loss,
            explain_classes=args.explain_classes,
            cam=args.cam,
            second_order=args.second_order,
            temperature=args.temperature,
            clip_grad_norm=args.clip_grad_norm,
            precision=args.precision,
        ),
        seed=args.seed,
        device=args.device,
    )


def _simulate(args) -> int:
    from dataclasses import replace

    import torch

    from .checkpoint import ModelSpec, load_checkpoint
    from .distributed import init_from_env
    from .simulate import run_simulation

    ctx, device = init_from_env(args.device)
    cfg = replace(_simulation_config(args), device=device)
    baseline = None
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
        data, classes, size = _prepared_simulation_data(args)
    if args.base_model is not None:
        baseline, spec, _ = load_checkpoint(args.base_model)
        data = _align_classes(data, spec.classes, args.base_model)
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
        print(f"{name:>9}: accuracy {r['accuracy']:.3f}  mean Jaccard {r['jaccard_mean']:.3f}")
    print(f"results: {args.out / 'results.md'}")
    return 0


def _prepared_simulation_data(args):
    import numpy as np

    from .data.prepared import load_prepared
    from .data.splits import split_feedback
    from .simulate import SimulationData

    data = load_prepared(args.data, mmap=False)
    train_only = None
    if args.overlap is not None:
        other = set(load_prepared(args.overlap).ids)
        train_only = np.array([i in other for i in data.ids])
        print(f"{int(train_only.sum())} image(s) also in {args.overlap}: feedback-train only")
    if args.base_model is not None:
        return SimulationData(feedback=data, train_only=train_only), data.classes, data.size
    f = args.base_fraction
    if not 0 < f < 1:
        raise CliError(f"--base-fraction: expected a value in (0, 1), got {f}")
    parts = split_feedback(data.labels, seed=args.seed, fractions=(1 - f, f / 2, f / 2))
    base_idx = np.concatenate([parts.val, parts.test])
    feedback_idx = parts.train
    sim = SimulationData(
        feedback=data.subset(feedback_idx),
        base=data.subset(base_idx),
        train_only=None if train_only is None else train_only[feedback_idx],
    )
    return sim, data.classes, data.size


def _align_classes(data, model_classes, ckpt):
    """Re-index labels by the checkpoint's class names (e.g. a 3-class Task 2 set evaluated
    by an 8-class ISIC 2019 model, as in the thesis)."""
    from dataclasses import replace

    import numpy as np

    from .data.dataset import ArrayDataset

    def align(ds):
        if ds is None or tuple(ds.classes) == tuple(model_classes):
            return ds
        missing = [c for c in ds.classes if c not in model_classes]
        if missing:
            raise CliError(f"{ckpt}: the model has no class {missing}; it knows {model_classes}")
        mapping = [model_classes.index(c) for c in ds.classes]
        labels = np.asarray(mapping)[ds.labels]
        return ArrayDataset(ds.images, ds.masks, labels, ds.has_mask, ds.ids, tuple(model_classes))

    return replace(
        data,
        feedback=align(data.feedback),
        base=align(data.base),
        test_override=align(data.test_override),
    )


# --------------------------------------------------------------------------- data


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="check and prepare ISIC datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    for name, helptext in [
        ("check", "list class counts and every problem with its file; exit 1 on errors"),
        ("prepare", "decode once, resize, store memory-mappable arrays and an index"),
    ]:
        q = dsub.add_parser(name, help=helptext, description=helptext)
        q.add_argument("root", type=Path, help="the dataset folder, in its official layout")
        q.add_argument("--labels", type=Path, default=None, help="labels CSV (Task 2)")
        q.add_argument(
            "--attributes",
            type=_names,
            default=None,
            help="Task 2: attribute subset for the feedback mask (default: all five)",
        )
        q.add_argument("--missing-attribute", choices=("error", "empty"), default="error")
        if name == "prepare":
            q.add_argument("--size", type=int, default=227)
            q.add_argument("--resample", choices=("nearest", "bilinear"), default="nearest")
            q.add_argument("--out", type=Path, required=True)
        q.set_defaults(func=_data_check if name == "check" else _data_prepare)


def _reader_options(args) -> dict:
    opts = {}
    if args.attributes is not None:
        opts["attributes"] = args.attributes
    if args.missing_attribute != "error":
        opts["missing_attribute"] = args.missing_attribute
    return opts


def _data_check(args) -> int:
    from .data.check import check_dataset, format_report

    report = check_dataset(args.root, args.labels, **_reader_options(args))
    print(format_report(report))
    return 1 if report.errors else 0


def _data_prepare(args) -> int:
    from .data.prepared import prepare, read_prepared_meta

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
    print(
        f"prepared {counts['images']} image(s) at {args.size}x{args.size} in {out}: "
        f"{counts['per_class']}; {counts['excluded']} excluded (see meta.json)"
    )
    return 0


# --------------------------------------------------------------------------- models


def _add_train_base(sub) -> None:
    p = sub.add_parser(
        "train-base",
        help="train the base classifier (class-weighted CE, flips + 24 rotations)",
    )
    p.add_argument("--data", type=Path, required=True, help="a prepared folder")
    _add_model_args(p, "skincare_vgg16")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument(
        "--select-by", choices=("avg_sensitivity", "accuracy"), default="avg_sensitivity"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
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
    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a prepared dataset")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    from .checkpoint import load_checkpoint
    from .data.prepared import load_prepared
    from .evaluate import evaluate
    from .metrics import per_class_table
    from .simulate import SimulationData, _write_json, _write_text

    model, spec, _ = load_checkpoint(args.model)
    data = _align_classes(
        SimulationData(feedback=load_prepared(args.data, mmap=False)), spec.classes, args.model
    ).feedback
    model.to(args.device)
    ev = evaluate(model, data, threshold=args.threshold, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = ev.summary() | {
        "classes": list(data.classes),
        "model": str(args.model),
        "data": str(args.data),
    }
    summary["per_class"] = {k: v.to_dict() for k, v in ev.classification.per_class.items()}
    _write_json(args.out / "metrics.json", summary)
    table = per_class_table(ev.classification)
    _write_text(args.out / "table.md", table)
    print(table)
    print(
        f"accuracy {summary['accuracy']:.3f}, mean (SD) Jaccard "
        f"{ev.jaccard.mean:.3f} ({ev.jaccard.sd:.3f}), ISIC Jaccard {ev.isic_jaccard:.3f}"
    )
    return 0


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="predict and explain one image; write an overlay PNG")
    p.add_argument("image", type=Path)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cam", choices=("gradcam", "gradcam++"), default="gradcam")
    p.set_defaults(func=_explain)


def _explain(args) -> int:
    from .explain import explain_file

    result = explain_file(args.image, args.model, args.out, method=args.cam)
    probs = ", ".join(f"{c} {p:.3f}" for c, p in result["probabilities"].items())
    print(f"{args.image}: {result['predicted']} ({probs}); overlay: {args.out}")
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


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="the interactive feedback app: predict, explain, correct, learn (web page + API)",
        description="Serve a checkpoint with a web page and a JSON API (docs at /docs). "
        "Without --model, serves the demo's model, training it first if absent.",
    )
    p.add_argument("--model", type=Path, default=None, help="a checkpoint (default: the demo's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite in --data-dir)")
    p.add_argument("--data-dir", type=Path, default=Path("feedbackcam-data"))
    p.add_argument("--update-every", type=int, default=1, help="fine-tune after N new items")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per update")
    p.add_argument("--replay-per-class", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lam", type=float, default=0.3)
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="largest drop in validation accuracy or average sensitivity a promotion may cost",
    )
    p.add_argument("--max-upload-mb", type=float, default=10.0)
    p.add_argument("--device", default="cpu", help="where the model predicts and learns")
    p.add_argument(
        "--low-confidence", type=float, default=0.6, help="warn below this top probability"
    )
    p.add_argument(
        "--unfamiliar-quantile",
        type=float,
        default=0.99,
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
        q.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite in --data-dir)")
        q.add_argument("--data-dir", type=Path, default=Path("feedbackcam-data"))

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
        q.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite in --data-dir)")
        q.add_argument("--data-dir", type=Path, default=Path("feedbackcam-data"))

    def run(args) -> int:
        from .service.commands import worklist

        return worklist(args)

    p.set_defaults(func=run)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="the feedback app's feedback as a dataset (images/, masks/, ignore/, labels.csv)",
    )
    p.add_argument("--data-dir", type=Path, default=Path("feedbackcam-data"))
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite in --data-dir)")
    p.add_argument("--out", type=Path, required=True, help="a new or empty folder")

    def run(args) -> int:
        from .service.commands import export

        return export(args)

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="feedbackcam",
        description="Correct an image classifier through its explanation, and make it learn.",
    )
    parser.add_argument("--version", action="version", version=f"feedbackcam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_demo,
        _add_simulate,
        _add_data,
        _add_train_base,
        _add_evaluate,
        _add_explain,
        _add_import_keras,
        _add_serve,
        _add_users,
        _add_worklist,
        _add_export,
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
    except (CliError, FileNotFoundError, ValueError) as err:
        if args.verbose:
            raise
        print(f"feedbackcam {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
