"""What the counterfactual terms train on, with and without turned counterfactuals
(``FeedbackConfig.counterfactual_symmetries``), on real ISIC 2017 images: a marked patch moved
onto another image where it lay and turned or mirrored, and a lesion set into another image's
surroundings as they are and turned (docs/real-artifacts.md, "Where the patch lies").

    python experiments/symmetries_figure.py --isic-root ISIC2017_FOLDER --cache CACHE \\
        --out docs/symmetries.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from feedbackcam import counterfactual as cf  # noqa: E402
from feedbackcam.shortcuts.data import isic_arrays  # noqa: E402
from feedbackcam.shortcuts.isic_real import read_annotations  # noqa: E402

NAMES = {0: "as it lay", 2: "quarter turn", 4: "half turn", 7: "three quarters, mirrored"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--isic-root", required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--donor", type=int, default=0, help="which of the 25 masked patches")
    p.add_argument("--recipient", default=None, help="an image id (default: the first MEL)")
    args = p.parse_args()
    isic = isic_arrays(args.isic_root, args.size, str(args.cache))
    root = Path(args.isic_root) / "artifacts"
    _, patch_masks, _, _ = read_annotations(str(root), args.size)
    index = {k: i for i, k in enumerate(isic.ids)}
    donor_id = sorted(k for k in patch_masks if k in index)[args.donor]
    mel = isic.classes.index("MEL")
    recipient_id = args.recipient or next(
        k for k, y in zip(isic.ids, isic.labels, strict=True) if y == mel and k not in patch_masks
    )
    rows = [index[donor_id], index[recipient_id]]
    images = torch.from_numpy(isic.images[rows]).permute(0, 3, 1, 2).float() / 255
    keep = torch.from_numpy(isic.masks[rows]).float()
    ignore = torch.zeros_like(keep)
    ignore[0] = torch.from_numpy(patch_masks[donor_id]).float()
    recipients, donors = torch.tensor([1]), torch.tensor([0])
    moved = {
        code: cf.transplant(images, ignore, recipients, keep, donors=donors, symmetry=code)[0][0]
        for code in NAMES
    }
    swapped = {
        code: cf.swap_surroundings(images, keep, donors, receivers=recipients, symmetry=code)[0][0]
        for code in (0, 4)
    }

    def show(ax, image, title, outline=None):
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        if outline is not None:
            ax.contour(outline.numpy(), levels=[0.5], colors="magenta", linewidths=0.8)
        ax.set_title(title, fontsize=8)
        ax.axis("off")

    fig, axes = plt.subplots(2, 4, figsize=(10, 5.4))
    show(axes[0, 0], images[0], f"marked image (NV)\n{donor_id}, patch outlined", ignore[0])
    show(axes[0, 1], images[1], f"recipient (MEL)\n{recipient_id}, lesion outlined", keep[1])
    show(axes[0, 2], swapped[0], "lesion in the marked image's\nsurroundings, as they are")
    show(axes[0, 3], swapped[4], "the same surroundings,\nhalf turn (symmetries on)")
    for ax, (code, image) in zip(axes[1], moved.items(), strict=True):
        turned = cf.moved_masks(ignore[:1], recipients, keep, code)[0]
        label = "symmetries off" if code == 0 else "symmetries on"
        show(ax, image, f"patch moved, {NAMES[code]}\n({label})", turned)
    fig.suptitle(
        "What the counterfactual terms train on: a marked patch moved onto a melanoma, a lesion\n"
        "in another image's surroundings; nothing is painted over the recipient's lesion",
        fontsize=9,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out, donor_id, recipient_id, np.round(ignore[0].mean().item(), 4))


if __name__ == "__main__":
    main()
