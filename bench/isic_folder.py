"""An ISIC 2017 folder as the generic layout, with its annotated real patches as ignore masks.

    python bench/isic_folder.py ISIC_ROOT --out FOLDER

ISIC_ROOT holds ``ISIC-2017_Training_Data/``, ``ISIC-2017_Training_Part1_GroundTruth/``,
``ISIC-2017_Training_Part3_GroundTruth.csv`` and ``artifacts/patch_masks/`` (the 25 pixel masks of
real coloured patches, see ../shared/data/README.md). FOLDER gets ``images/``, ``masks/`` (the
lesion masks, what should matter), ``ignore/`` (the patch masks, what must not) as symbolic links,
and ``labels.csv`` (MEL, SK or NV): what ``feedbackcam data prepare`` reads, so ``simulate``
learns with the default objective's ignore loss on the real patches (bench/gpu_session.sh).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    root, out = args.root.resolve(), args.out
    for area in ("images", "masks", "ignore"):
        (out / area).mkdir(parents=True, exist_ok=False)
    rows, patches = [], 0
    with open(root / "ISIC-2017_Training_Part3_GroundTruth.csv", newline="") as f:
        for r in csv.DictReader(f):
            key = r["image_id"]
            mel, sk = float(r["melanoma"]), float(r["seborrheic_keratosis"])
            rows.append((key, "MEL" if mel else "SK" if sk else "NV"))
            (out / "images" / f"{key}.jpg").symlink_to(
                root / "ISIC-2017_Training_Data" / f"{key}.jpg"
            )
            lesion = root / "ISIC-2017_Training_Part1_GroundTruth" / f"{key}_segmentation.png"
            (out / "masks" / f"{key}.png").symlink_to(lesion)
            patch = root / "artifacts" / "patch_masks" / f"{key}.png"
            if patch.is_file():
                (out / "ignore" / f"{key}.png").symlink_to(patch)
                patches += 1
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        w.writerows(rows)
    print(f"{len(rows)} images, {patches} with an ignore mask (a real patch), in {out}")


if __name__ == "__main__":
    main()
