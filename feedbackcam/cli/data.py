"""``feedbackcam data check`` and ``data prepare``: a dataset folder as read by its layout's
reader (:mod:`feedbackcam.data.layouts`), checked or decoded once into a prepared folder."""

from __future__ import annotations

from pathlib import Path

from ..options import names


def _layout(text: str) -> str:
    return text.replace("-", "_")


def _add_data(sub) -> None:
    from ..data.layouts import LAYOUTS

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
            type=names,
            default=None,
            help="generic: class names in label order, e.g. NV,MEL,BKL; a CSV row of another "
            "class is an error (default: the classes the CSV names)",
        )
        q.add_argument(
            "--attributes",
            type=names,
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
        q.add_argument(
            "--ignore",
            type=Path,
            default=None,
            metavar="FOLDER",
            help='"must not matter" masks for any layout, named <id>.png or <id>_ignore.png '
            "after their images (e.g. a clinician's strokes on the patches of ISIC 2017): "
            "ignore feedback beside the data set as downloaded",
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
    if args.ignore is not None:
        opts["ignore"] = args.ignore
    given = {}
    if args.attributes is not None:
        given["attributes"] = ("--attributes", args.attributes)
    if args.missing_attribute != "error":
        given["missing_attribute"] = ("--missing-attribute", args.missing_attribute)
    if args.classes is not None:
        given["classes"] = ("--classes", args.classes)
    if given:
        from ..data.layouts import LAYOUTS, detect_layout

        layout = opts.get("layout") or detect_layout(args.root)
        wrong = [flag for key, (flag, _) in given.items() if key not in LAYOUTS[layout].options]
        if wrong:
            takes = "; ".join(
                f"{' and '.join('--' + o.replace('_', '-') for o in r.options)} for {name}"
                for name, r in LAYOUTS.items()
                if set(r.options) & set(given)
            )
            raise ValueError(
                f"{args.root}: layout {layout} takes no {' or '.join(wrong)} ({takes})"
            )
        opts |= {key: value for key, (_, value) in given.items()}
    return opts


def _data_check(args) -> int:
    from ..data.check import check_dataset, format_report

    report = check_dataset(args.root, args.labels, **_reader_options(args))
    print(format_report(report))
    return 1 if report.errors else 0


def _data_prepare(args) -> int:
    from ..data.prepared import prepare, read_prepared_meta

    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out}: a file is there; expected a folder to create")
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


COMMANDS = (_add_data,)
