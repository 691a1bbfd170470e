"""``feedbackcam train-base``, ``evaluate``, ``explain`` and ``import-keras``: models."""

from __future__ import annotations

from pathlib import Path

from ..options import add_model_args, build_model_from, command, names


def _add_train_base(sub) -> None:
    from ..base import BaseConfig

    d = BaseConfig()
    p = command(sub, "train-base", _train_base)
    p.add_argument("--data", type=Path, required=True, help="a prepared folder")
    add_model_args(p, "skincare_vgg16")
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


def _train_base(args) -> int:
    """Train the base classifier (class-weighted CE, flips + 24 rotations).

    The best epoch by validation goes to --out/model.pt, with history, config, test metrics
    and the per-class table."""
    from ..base import BaseConfig, train_base
    from ..checkpoint import ModelSpec
    from ..data.prepared import load_prepared

    data = load_prepared(args.data, mmap=False)
    model, kwargs = build_model_from(args, len(data.classes))
    spec = ModelSpec(args.model, data.classes, model.layers, data.size, kwargs)
    from ..distributed import init_from_env

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
    p = command(sub, "evaluate", _evaluate)
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
    p.add_argument(
        "--artifacts",
        type=Path,
        default=None,
        metavar="FLAGS.csv",
        help="per-image artifact flags (an id column and 0/1 columns, e.g. ruler, ink, "
        "dark_corner): write artifacts.json with each artifact's accuracy with and without it "
        "and, where the data marks artifacts (ignore masks), the flip rate when they are filled",
    )
    p.add_argument("--device", default="cpu")


def _evaluate(args) -> int:
    """Metrics of a checkpoint on a prepared dataset, per image and per class.

    Write metrics.json, table.md and predictions.csv (one row per image: label, prediction,
    probabilities, Jaccard against the keep mask) to --out; optionally the saliency maps, a
    counterfactual comparison and the per-artifact reliance (--artifacts)."""
    from ..checkpoint import load_checkpoint
    from ..data.prepared import load_prepared
    from ..evaluate import (
        counterfactual_report,
        evaluate,
        write_predictions,
        write_saliency_maps,
    )
    from ..fileio import write_json, write_text
    from ..metrics import per_class_table

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
    if args.artifacts is not None:
        from ..data.artifacts import read_artifact_flags
        from ..reliance import artifact_reliance, reliance_table

        flag_ids, flags = read_artifact_flags(args.artifacts)
        predicted = ev.probs.argmax(axis=1)
        report = artifact_reliance(model, data, flag_ids, flags, predicted, device=args.device)
        write_json(args.out / "artifacts.json", report | {"flags": str(args.artifacts)})
        written.append("artifacts.json")
        print(reliance_table(report))
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
    from ..cam import CAM_METHODS

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
    from ..explain import explain_file

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
        "--classes", type=names, default=("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
    )
    p.add_argument("--preprocessing", choices=("caffe", "rescale", "tf", "torch"), default="caffe")
    p.set_defaults(func=_import_keras)


def _import_keras(args) -> int:
    from ..checkpoint import ModelSpec, save_checkpoint
    from ..keras_import import import_keras

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


COMMANDS = (_add_train_base, _add_evaluate, _add_explain, _add_import_keras)
