"""Do flipped copies of the marked images (their masks flipped alike), added as extra marks,
help the concept scorer? The same halves, draws and grid as propagation_threshold.py; judged on
the development half (docs/propagation.md: they did not help there, so they were not adopted).

    python experiments/propagation_flips.py ISIC2017_FOLDER CACHE_DIR FEATURES.pt
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from propagation_threshold import GRID, SPLIT_SEED, summary  # noqa: E402
from propagation_threshold import rows_of as threshold_rows  # noqa: E402

from feedbackcam.models import build_model
from feedbackcam.propagate import LITE0_LAYER, offline_features
from feedbackcam.self_explaining import layer_activations
from feedbackcam.shortcuts.data import isic_arrays
from feedbackcam.shortcuts.isic_real import read_annotations

torch.set_num_threads(2)
root, cache, feats = sys.argv[1:4]
data = isic_arrays(root, 256, cache)
lists, by_id, _, _ = read_annotations(str(Path(root) / "artifacts"), 256)
index = {k: i for i, k in enumerate(data.ids)}
n = len(data)
patched = np.zeros(n, bool)
patched[[index[k] for k in lists["patch"] if k in index]] = True
masks = {index[k]: m for k, m in by_id.items()}
features = offline_features(data.images, feats)
hand = sorted(masks)
FLIPS = {"h": (2,), "v": (1,), "hv": (1, 2)}  # axes of (N, H, W, 3)
imgs = np.asarray(data.images)[hand]
flipped_feats, flipped_masks = {}, {}
model = build_model("efficientnet_lite0", 2, weights="imagenet")
for name, axes in FLIPS.items():
    f = layer_activations(
        model, np.ascontiguousarray(np.flip(imgs, axis=axes)), LITE0_LAYER, batch_size=32
    )
    for j, i in enumerate(hand):
        flipped_feats[(i, name)] = f[j]
        flipped_masks[(i, name)] = np.ascontiguousarray(
            np.flip(masks[i], axis=tuple(a - 1 for a in axes))
        )
dev = np.random.default_rng(SPLIT_SEED).permutation(n) < n // 2


def with_flips(flips):
    """The ``augment`` of ``rows_of``: each marked image's flips, masks flipped alike, as
    extra marked rows after the 2,000 images."""

    def augment(hand, marks, feats):
        extra = [(int(i), name) for i in hand for name in flips]
        if not extra:
            return feats, marks
        feats = torch.cat([feats, torch.stack([flipped_feats[e] for e in extra])])
        return feats, {**marks, **{n + j: flipped_masks[e] for j, e in enumerate(extra)}}

    return augment


def rows_of(part, flips):
    return threshold_rows(part, patched, masks, features, 256, augment=with_flips(flips))


out = {}
for label, flips in (("none", ()), ("h", ("h",)), ("h+v+hv", ("h", "v", "hv"))):
    for name, part in (("development", dev), ("test", ~dev)):
        s = summary(rows_of(part, flips))["5"]
        out[(label, name)] = s
        for t in GRID:
            x = s[str(t)]
            print(
                f"{label:7s} {name:11s} t={t} P {x['precision']} R {x['recall']} "
                f"minR {x['min_recall']} both {x['both_at_least_0.9']}/{x['draws']}",
                flush=True,
            )
