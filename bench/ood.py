"""How well the app's unfamiliar-input check separates images like the validation set from
images that are not skin: AUROC of each score (the energy, the feature and image-statistics
Mahalanobis distances of ``feedbackcam.service.ood``, and the check as the app combines them),
and how many of the out-of-distribution images pass without a warning.

    OMP_NUM_THREADS=2 python bench/ood.py --demo-data /tmp/ood/demo \
        [--model base/model.pt --data prepared/] --out docs/benchmarks/ood.json

The demo: the demo's model and its validation set (the app's reference), in-distribution test
images from another SynthDerm seed. ``--model/--data``: a ``train-base`` checkpoint; its own
validation split is the reference and its test split the in-distribution images, as the app
would be set up. Out of distribution: ``ood.probe_images`` (plain colours, noise, an invoice and
a letter), 30 more random plain colours, noise at 5 seeds, and scikit-image's bundled natural
photographs when scikit-image is installed.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from feedbackcam.checkpoint import load_checkpoint
from feedbackcam.service.datasets import load_labelled
from feedbackcam.service.ood import Familiarity, probe_images
from feedbackcam.service.registry import Served


def photos(size: int) -> dict[str, np.ndarray]:
    try:
        from skimage import data
    except ImportError:
        return {}
    out = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page"):
        try:
            image = np.asarray(getattr(data, name)())
        except Exception:  # an image that would need a download: skip it
            continue
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        image = Image.fromarray(image[..., :3].astype(np.uint8))
        out[f"photo {name}"] = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
    return out


def outliers(size: int) -> dict[str, np.ndarray]:
    out = {}
    for seed in range(5):
        for name, image in probe_images(size, seed=seed).items():
            if seed == 0 or "noise" in name:
                out[f"{name} #{seed}"] = image
    rng = np.random.default_rng(1)
    for k in range(30):
        colour = rng.integers(0, 256, 3)
        out[f"plain random #{k}"] = np.broadcast_to(colour, (size, size, 3)).astype(np.uint8)
    out.update(photos(size))
    return out


def evaluate(served: Served, reference, inside: np.ndarray, quantile: float) -> dict:
    """Scores of in-distribution and generated images; AUROC per score; misses."""
    familiarity = Familiarity(reference, quantile)
    familiarity.reference(served)
    others = outliers(inside.shape[1])
    rows = []
    for kind, images in (("in", list(inside)), ("out", list(others.values()))):
        names = [None] * len(images) if kind == "in" else list(others)
        for name, image in zip(names, images):
            f = familiarity.score(served, np.asarray(image))
            combined = max(f.features / f.features_threshold, f.image / f.image_threshold)
            rows.append((kind, name, f.energy, f.features, f.image, combined, f.unfamiliar))
    label = np.array([r[0] == "out" for r in rows])
    result = {"n_in": int((~label).sum()), "n_out": int(label.sum()), "auroc": {}}
    for k, score in enumerate(("energy", "features", "image", "combined"), start=2):
        result["auroc"][score] = round(float(roc_auc_score(label, [r[k] for r in rows])), 4)
    flags = np.array([r[6] for r in rows])
    result["in_flagged"] = round(float(flags[~label].mean()), 4)
    result["out_passed"] = sorted(r[1] for r in rows if r[0] == "out" and not r[6])
    result["out_passed_by_kind"] = {
        kind: sum(1 for r in rows if r[0] == "out" and not r[6] and kind in r[1])
        for kind in ("plain", "noise", "invoice", "letter", "photo")
    }
    return result


def served_from(path: Path) -> tuple[Served, object, dict]:
    model, spec, payload = load_checkpoint(path)
    return Served(version_id=1, model=model.eval(), spec=spec), spec, payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-data", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None, help="a train-base model.pt")
    parser.add_argument("--data", type=Path, default=None, help="its prepared data")
    parser.add_argument("--quantile", type=float, default=0.99)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch thread(s), CPU",
        "quantile": args.quantile,
    }
    if args.demo_data is not None:
        from feedbackcam.data.synth import SynthConfig, as_array_dataset, make_synthderm
        from feedbackcam.service.demo import ensure_demo

        checkpoint = ensure_demo(args.demo_data)
        served, spec, _ = served_from(checkpoint)
        reference = load_labelled(args.demo_data, "validation", spec.classes, spec.input_size)
        test = as_array_dataset(make_synthderm(SynthConfig(n=300, seed=77, size=64)))
        report["demo"] = evaluate(served, reference, np.asarray(test.images), args.quantile)
        print("demo", json.dumps(report["demo"]["auroc"]), report["demo"]["out_passed_by_kind"])
    if args.model is not None:
        from feedbackcam.data.prepared import load_prepared

        served, spec, payload = served_from(args.model)
        data = load_prepared(args.data)
        index = {i: k for k, i in enumerate(data.ids)}
        split = payload["config"]["trained_on"]
        reference = data.subset([index[i] for i in split["val"]])
        inside = np.asarray(data.subset([index[i] for i in split["test"]]).images)
        report["model"] = {"checkpoint": str(args.model), "arch": spec.arch}
        report["model"].update(evaluate(served, reference, inside, args.quantile))
        print("model", json.dumps(report["model"]["auroc"]), report["model"]["out_passed_by_kind"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
