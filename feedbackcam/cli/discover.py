"""``feedbackcam clusters``: what the model relies on, grouped, before anyone marks anything."""

from __future__ import annotations

from pathlib import Path

from ..options import command

SHOWN_CLUSTERS = 8  # rows of clusters.png
SHOWN_IMAGES = 6  # images per row


def _add_clusters(sub) -> None:
    from ..clusters import DEFAULT_CLUSTERS, FEATURES
    from ..suspicion import DEFAULT_DONORS

    p = command(sub, "clusters", _clusters)
    p.add_argument("--data", type=Path, required=True, help="a prepared folder (lesion masks used)")
    p.add_argument("--model", type=Path, required=True, help="the checkpoint to examine")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--clusters", type=int, default=DEFAULT_CLUSTERS, help="per predicted class")
    p.add_argument("--features", choices=FEATURES, default="maps")
    p.add_argument("--donors", type=int, default=DEFAULT_DONORS, help="swaps per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")


def _clusters(args) -> int:
    """Group the model's explanations (SpRAy-style, within each predicted class) and rank the
    groups by suspicion (feedbackcam.suspicion: explanation outside the lesion, prediction
    changed by other surroundings, uncertainty).

    Writes OUT/clusters.csv (one row per image: cluster rank, 1 = most suspicious, predicted
    class and the suspicion signs), OUT/summary.md (one row per cluster), OUT/clusters.png (the
    most suspicious clusters' typical images with their maps and lesion outlines) and
    OUT/config.json."""
    import numpy as np

    from ..checkpoint import load_checkpoint
    from ..clusters import explanation_clusters, map_features, write_sheet
    from ..data.prepared import load_prepared
    from ..fileio import write_csv, write_json, write_text
    from ..self_explaining import layer_activations
    from ..suspicion import suspicion

    if args.clusters < 1:
        raise ValueError(f"--clusters: expected at least 1, got {args.clusters}")
    data = load_prepared(args.data, mmap=True)
    model, spec, _ = load_checkpoint(args.model, map_location=args.device)
    if data.size != spec.input_size:
        raise ValueError(
            f"{args.data}: images are {data.size} px, {args.model} expects {spec.input_size} px"
        )
    images = np.asarray(data.images)
    keep = np.asarray(data.masks) * np.asarray(data.has_mask, bool)[:, None, None]
    sus = suspicion(model, images, keep, donors=args.donors, seed=args.seed)
    if args.features == "maps":
        features = map_features(sus.maps)
    else:
        features = layer_activations(model, images).mean((2, 3)).numpy()
    found = explanation_clusters(
        features, sus.predicted, sus.score, k=args.clusters, seed=args.seed
    )
    rank = {c: r for r, c in enumerate(found.ranked, 1)}
    classes = spec.classes

    def num(v: float):
        return "" if np.isnan(v) else round(float(v), 4)

    rows = []
    for c in found.ranked:
        for i in found.members[c]:
            rows.append(
                {
                    "id": data.ids[i],
                    "cluster": rank[c],
                    "predicted": classes[sus.predicted[i]],
                    "suspicion": num(sus.score[i]),
                    "outside": num(sus.outside[i]),
                    "swap": num(sus.swap[i]),
                    "uncertainty": num(sus.uncertainty[i]),
                }
            )
    lines = [
        f"# Explanation clusters of {args.model.name} on {args.data}",
        "",
        f"{len(images)} images; {args.clusters} clusters per predicted class ({args.features}); "
        "ranked by mean suspicion (explanation outside the lesion, prediction changed by other "
        "images' surroundings, uncertainty; each 0-1).",
        "",
        "| cluster | predicted | images | suspicion | outside | swap | uncertainty |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in found.ranked:
        m = found.members[c]
        means = [np.nanmean(v[m]) if not np.isnan(v[m]).all() else np.nan for v in
                 (sus.outside, sus.swap, sus.uncertainty)]  # fmt: skip
        cells = ["–" if np.isnan(v) else f"{v:.2f}" for v in means]
        lines.append(
            f"| {rank[c]} | {classes[found.classes[c]]} | {len(m)} | "
            f"{found.suspicion[c]:.2f} | " + " | ".join(cells) + " |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    sheet = args.out / "clusters.png"
    write_sheet(model, images, keep, found, classes, sheet, clusters=SHOWN_CLUSTERS,
                per_row=SHOWN_IMAGES)  # fmt: skip
    fields = ["id", "cluster", "predicted", "suspicion", "outside", "swap", "uncertainty"]
    write_csv(args.out / "clusters.csv", rows, fields)
    write_text(args.out / "summary.md", "\n".join(lines) + "\n")
    config = {
        "data": str(args.data),
        "model": str(args.model),
        "clusters_per_class": args.clusters,
        "features": args.features,
        "donors": args.donors,
        "seed": args.seed,
        "images": len(images),
        "with_lesion_mask": int(keep.reshape(len(keep), -1).any(1).sum()),
    }
    write_json(args.out / "config.json", config)
    print(f"{len(found.ranked)} clusters of {len(images)} images; {args.out / 'summary.md'}")
    return 0


COMMANDS = (_add_clusters,)
