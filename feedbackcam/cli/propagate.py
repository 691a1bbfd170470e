"""``feedbackcam propagate``: one correction, many images."""

from __future__ import annotations

from pathlib import Path

from ..options import command


def _add_propagate(sub) -> None:
    from ..propagate import (
        DEFAULT_THRESHOLD,
        EXPAND_PER_MARK,
        LITE0_EXPAND_AT,
        LITE0_THRESHOLD,
        OUTLINE_FEATURES,
        SCORERS,
    )

    p = command(sub, "propagate", _propagate)
    p.add_argument("--data", type=Path, required=True, help="a prepared folder")
    p.add_argument(
        "--marks",
        type=Path,
        required=True,
        help="a folder of <id>.png ignore masks (white on the artifact) of images in --data",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a checkpoint whose activations score the images (default: the offline ImageNet "
        "EfficientNet-Lite0)",
    )
    p.add_argument("--scorer", choices=SCORERS, default="concept")
    p.add_argument(
        "--layer",
        default=None,
        help="the layer whose activations are used (default: the model's explanation layer; "
        "blocks.5 for the offline EfficientNet-Lite0)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help=f"propose an image at this score (default: {LITE0_THRESHOLD} with the offline "
        f"network, chosen on ISIC 2017's real patches; {DEFAULT_THRESHOLD} with --model or "
        "--scorer colour)",
    )
    p.add_argument(
        "--expand-at",
        type=float,
        default=None,
        help="query expansion: the images scored at least this (at most "
        f"{EXPAND_PER_MARK} per mark) join the marks and the scorer is fitted again (default: "
        f"{LITE0_EXPAND_AT} with the offline network's blocks.5, chosen with its threshold on "
        "ISIC 2017's real patches; off otherwise, where it was not measured)",
    )
    p.add_argument("--no-expand", action="store_true", help="no query expansion")
    p.add_argument(
        "--outline",
        choices=("appearance", "colour"),
        default=OUTLINE_FEATURES,
        help="--scorer outlined: outline each proposed artifact by its colour and local texture "
        "(the default: a ruler is thin ticks on skin), or by its colour alone",
    )
    p.add_argument("--device", default="cpu")


def read_marks(folder: Path, ids: tuple[str, ...], size: int) -> dict:
    """{index in ``ids``: (size, size) uint8 0/1 mask} from ``folder/<id>.png`` (white = marked,
    resized nearest-neighbour).

    Raises:
        ValueError: no PNG in the folder, a file whose name is not an id of the data, an
            unreadable image or an empty mask (each names the file).
    """
    from ..imageio import read_mask

    files = sorted(Path(folder).glob("*.png"))
    if not files:
        raise ValueError(f"{folder}: no <id>.png marks")
    index = {k: i for i, k in enumerate(ids)}
    marks = {}
    for path in files:
        if path.stem not in index:
            raise ValueError(f"{path}: {path.stem!r} is not an image id of the data")
        mask = read_mask(path, size=size)
        if not mask.any():
            raise ValueError(f"{path}: the mask is empty (no white pixels)")
        marks[index[path.stem]] = mask
    return marks


def _propagate(args) -> int:
    """Propose the artifact a few ignore marks show on every other image that carries it.

    From --marks (<id>.png ignore masks of images in --data), score every other image of --data
    for the same artifact (--scorer concept: a linear classifier on a network's activations,
    per location; colour: a colour model of the marked pixels; outlined: the concept chooses
    the images and where, the colour outlines the artifact there) and propose a mask for each
    image whose score reaches --threshold (0.9 by default; with the offline network, after one
    round of query expansion: docs/propagation.md). Writes OUT/proposals.csv (id, score,
    proposed; the highest scores first), OUT/masks/<id>.png for the proposed images and
    OUT/config.json."""
    import shutil
    import tempfile

    import numpy as np
    from PIL import Image

    from ..data.prepared import load_prepared
    from ..fileio import write_csv, write_json
    from ..propagate import (
        DEFAULT_THRESHOLD,
        EXPAND_PER_MARK,
        LITE0_EXPAND_AT,
        LITE0_LAYER,
        LITE0_THRESHOLD,
        colour_proposals,
        concept_proposals,
        offline_network,
        outlined_masks,
    )
    from ..self_explaining import layer_activations

    data = load_prepared(args.data, mmap=True)
    marks = read_marks(args.marks, data.ids, data.size)
    layer = args.layer
    model_name = None
    threshold = DEFAULT_THRESHOLD
    expand_at = None
    if args.scorer in ("concept", "outlined"):
        if args.model is not None:
            from ..checkpoint import load_checkpoint

            model, _, _ = load_checkpoint(args.model, map_location=args.device)
            model_name = str(args.model)
        else:
            model = offline_network()
            model_name = "efficientnet_lite0 (ImageNet, offline)"
            layer = layer or LITE0_LAYER
            if layer == LITE0_LAYER:  # the setting measured on ISIC 2017's real patches
                threshold, expand_at = LITE0_THRESHOLD, LITE0_EXPAND_AT
        model.to(args.device)
        features = layer_activations(model, data.images, layer, batch_size=32)
        layer = layer or model.layers[0]
        expand_at = args.expand_at if args.expand_at is not None else expand_at
        expand_at = None if args.no_expand else expand_at
        props = concept_proposals(features, marks, data.size, expand_at=expand_at)
    else:
        props = colour_proposals(np.asarray(data.images), marks)
    threshold = threshold if args.threshold is None else args.threshold
    chosen = props.proposed(threshold)
    order = [i for i in np.argsort(-props.scores, kind="stable") if i not in marks]
    written = [i for i in order if chosen[i]]
    outline = None
    if args.scorer == "outlined":  # the pixel model outlines the artifact, grown by a cell
        grow = data.size // features.shape[-1]
        images = np.asarray(data.images)
        outline = args.outline
        outlines = outlined_masks(props, images, marks, written, grow, features=outline)
        masks = dict(zip(written, outlines, strict=True))
    else:
        masks = props.masks()
    rows = [
        {"id": data.ids[i], "score": round(float(props.scores[i]), 4), "proposed": int(chosen[i])}
        for i in order
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    # the masks land in a temporary folder first: a failed run leaves no half-written masks/
    tmp = Path(tempfile.mkdtemp(dir=args.out, prefix=".masks-"))
    try:
        for i in written:
            Image.fromarray(masks[i] * 255).save(tmp / f"{data.ids[i]}.png")
        if (args.out / "masks").exists():
            shutil.rmtree(args.out / "masks")
        tmp.rename(args.out / "masks")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    write_csv(args.out / "proposals.csv", rows, ["id", "score", "proposed"])
    config = {
        "data": str(args.data),
        "marks": sorted(data.ids[i] for i in marks),
        "scorer": args.scorer,
        "model": model_name,
        "layer": layer,
        "threshold": threshold,
        "expand_at": expand_at,
        "expand_per_mark": EXPAND_PER_MARK if expand_at is not None else None,
        "outline": outline,
        "proposed": int(sum(r["proposed"] for r in rows)),
        "scored": len(rows),
    }
    write_json(args.out / "config.json", config)
    print(
        f"{config['proposed']} of {len(rows)} images proposed from {len(marks)} mark(s); "
        f"{args.out / 'proposals.csv'}"
    )
    return 0


COMMANDS = (_add_propagate,)
