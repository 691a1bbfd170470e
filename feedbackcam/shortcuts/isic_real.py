"""Real dermoscopy artifacts: the shortcuts ISIC 2017 has as downloaded, not pasted by us.

Two kinds of data set, from an ISIC 2017 folder and its ``artifacts/`` annotations
(``artifact_lists.json``: the images with coloured patches, rulers and skin markers;
``patch_masks/<id>.png``: a clinician's ignore strokes on some of the patches;
``artifact_flags.csv``: per-image 0/1 flags of seven artifacts, Bissoto et al.):

- ``isic-real`` (:func:`isic_real_data`): *patch -> NV, as the data has it*. The baseline learns
  from the images as they are (the patched images are nearly all NV). Every patched image is in
  the training split; the feedback pool is the model's own training images, with the clinician's
  masks as ignore feedback and the lesion masks as keep feedback. Validation and test images
  (none patched) get a real patch pasted in (cut out with the masks, never over the lesion):
  the share of melanomas and keratoses that turn NV is the shortcut's strength. The reference is
  the same network trained with the patched images left out.
- ``isic-trap-<artifact>`` (:func:`isic_trap_data`): *trap splits* in Bissoto et al.'s manner,
  melanoma vs benign: the training split has the artifact with one class (90 %) and not with the
  other, the test split the reverse; the reference trains on a correlation-free split of the
  same size and class balance. No artifact is marked: only the lesion (keep) masks are feedback.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..data.artifacts import cut_out, paste_cutouts, read_artifact_flags
from ..data.dataset import ArrayDataset
from ..imageio import read_mask
from .config import BenchConfig
from .data import ShortcutData, ShortcutEval, _dataset, control_masks, isic_arrays, stratified_parts

TRAP_ARTIFACTS = ("ruler", "ink", "dark_corner", "all")
# "all": an image carries at least this many of these artifacts (hair is left out: most have it).
ALL_ARTIFACTS = ("dark_corner", "gel_border", "gel_bubble", "ruler", "ink", "patches")
ALL_AT_LEAST = 2
TRAP_STRENGTH = 0.9  # share of each class's training images on the trap's side
TRAP_TEST_SHARE = 0.5  # share of each reversed cell held out for the test split
TRAP_VAL_SHARE = 0.15  # validation, confounded like training, as a share of the training split
BENIGN_VS_MEL = ("BEN", "MEL")


def artifacts_root(cfg: BenchConfig) -> Path:
    """The annotations folder: ``cfg.artifacts_root``, or ``artifacts/`` in the ISIC folder."""
    root = Path(cfg.artifacts_root) if cfg.artifacts_root else Path(cfg.isic_root) / "artifacts"
    if not (root / "artifact_lists.json").is_file():
        raise ValueError(
            f"{root}: no artifact_lists.json; give the artifacts folder with --artifacts-root "
            "(artifact_lists.json, patch_masks/, artifact_flags.csv)"
        )
    return root


@functools.lru_cache(maxsize=2)
def read_annotations(root: str, size: int) -> tuple[dict, dict[str, np.ndarray], tuple, dict]:
    """(artifact lists, id -> patch mask at ``size`` (0/1, nearest), flag ids, flags)."""
    folder = Path(root)
    lists = json.loads((folder / "artifact_lists.json").read_text())
    masks = {}
    for path in sorted((folder / "patch_masks").glob("*.png")):
        masks[path.stem] = read_mask(path, size=size)
    ids, flags = read_artifact_flags(folder / "artifact_flags.csv")
    return lists, masks, ids, flags


def flags_of(ids, flag_ids, flags) -> dict[str, np.ndarray]:
    """The artifact flags (``read_annotations``' ``flag_ids`` and ``flags``) of the images
    ``ids``, by name (False where an image is not annotated), and ``annotated``."""
    where = {k: i for i, k in enumerate(flag_ids)}
    rows = np.array([where.get(k, -1) for k in ids])
    out = {n: np.where(rows >= 0, f[np.maximum(rows, 0)], False) for n, f in flags.items()}
    out["annotated"] = rows >= 0
    return out


def isic_real_data(seed: int, cfg: BenchConfig, cache: str | Path) -> ShortcutData:
    """``isic-real`` of one seed (see the module docstring). Shares of the images without a
    patch: ``cfg.isic_real_split`` (train / validation / test); the pool is
    ``cfg.isic_real_pool`` training images, the masked patched ones among them."""
    isic = isic_arrays(str(cfg.isic_root), cfg.isic_size, str(cache))
    lists, patch_masks, flag_ids, flags = read_annotations(str(artifacts_root(cfg)), cfg.isic_size)
    nv = isic.classes.index("NV")
    index = {k: i for i, k in enumerate(isic.ids)}
    patched = np.array(sorted(index[k] for k in lists["patch"] if k in index))
    marked = np.array(sorted(index[k] for k in patch_masks if k in index))
    if not len(marked):
        raise ValueError(f"{cfg.isic_root}: none of the patch masks' images is in the data")
    rest = np.setdiff1d(np.arange(len(isic)), patched)
    train_rest, val, test = (
        rest[p] for p in stratified_parts(isic.labels[rest], cfg.isic_real_split, seed)
    )
    train = np.sort(np.concatenate([patched, train_rest]))
    rng = np.random.default_rng([seed, 11])
    others = np.setdiff1d(train, marked)
    extra = rng.choice(others, min(len(others), cfg.isic_real_pool - len(marked)), replace=False)
    pool_idx = np.sort(np.concatenate([marked, extra]))
    clean_idx = np.sort(rng.choice(train_rest, min(len(train_rest), len(pool_idx)), replace=False))

    def subset(idx, ignore=None) -> ArrayDataset:
        ids = [isic.ids[i] for i in idx]
        return _dataset(
            isic.images[idx], isic.labels[idx], isic.classes, isic.masks[idx], ignore, ids
        )

    ignore = np.zeros((len(pool_idx), cfg.isic_size, cfg.isic_size), np.uint8)
    for row, i in enumerate(pool_idx):
        ignore[row] = patch_masks.get(isic.ids[i], ignore[row])
    pool = subset(pool_idx, ignore)
    pool = replace(pool, has_ignore=ignore.reshape(len(pool_idx), -1).any(1))
    cutouts = [cut_out(isic.images[i], patch_masks[isic.ids[i]], isic.ids[i]) for i in marked]

    def evalset(idx: np.ndarray, k: int) -> ShortcutEval:
        x, m, has = paste_cutouts(isic.images[idx], isic.masks[idx], cutouts, seed=seed * 100 + k)
        data = _dataset(
            x, isic.labels[idx], isic.classes, isic.masks[idx], m, [isic.ids[i] for i in idx]
        )
        labels = isic.labels[idx]
        ids = [isic.ids[i] for i in idx]
        return ShortcutEval(
            data, isic.images[idx], has & (labels != nv), nv, flags_of(ids, flag_ids, flags)
        )

    return ShortcutData(
        base=subset(train),
        clean_base=subset(train_rest),
        pool=pool,
        clean_pool=subset(clean_idx),
        controls=control_masks(pool.ignore, seed),
        val=evalset(val, 2),
        test=evalset(test, 3),
    )


def trap_flag(name: str, flags: dict[str, np.ndarray]) -> np.ndarray:
    """The artifact a trap split is built on (``name`` a flag, or "all": at least
    ``ALL_AT_LEAST`` of ``ALL_ARTIFACTS``), from :func:`flags_of`."""
    if name == "all":
        return sum(flags[a].astype(int) for a in ALL_ARTIFACTS) >= ALL_AT_LEAST
    return flags[name]


def trap_indices(labels: np.ndarray, has: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Indices of a trap split of a binary set (``labels`` 0/1, ``has`` the artifact): "train"
    and "val" with the artifact on ``TRAP_STRENGTH`` of the class it goes with in the data and
    on the rest of the other class's share, "test" reversed (that class without it, the other
    with it), and "free": a correlation-free training split of the same size and class balance
    (one artifact rate for both classes), disjoint from val and test."""
    rng = np.random.default_rng([seed, 13])
    # the class the artifact goes with in the data becomes the trap's class
    star = int(has[labels == 1].mean() >= has[labels == 0].mean())
    cell = {
        (c, a): rng.permutation(np.flatnonzero((labels == c) & (has == a)))
        for c in (0, 1)
        for a in (False, True)
    }
    reversed_cells = [(star, False), (1 - star, True)]
    test = {k: cell[k][: int(len(cell[k]) * TRAP_TEST_SHARE)] for k in reversed_cells}
    left = {k: cell[k][len(test.get(k, ())) :] for k in cell}
    s, v = TRAP_STRENGTH, 1 + TRAP_VAL_SHARE
    # the largest split with the data's class balance that every cell can feed
    share = labels.mean() if star == 1 else 1 - labels.mean()
    sizes = [
        len(left[(star, True)]) / (s * v * share),
        len(left[(star, False)]) / ((1 - s) * v * share),
        len(left[(1 - star, False)]) / (s * v * (1 - share)),
        len(left[(1 - star, True)]) / ((1 - s) * v * (1 - share)),
    ]

    def plan(total: int) -> tuple[dict, dict]:
        n_star = int(round(total * share))
        counts = {star: n_star, 1 - star: total - n_star}
        strength = {(c, a): s if a == (c == star) else 1 - s for c, a in cell}
        return counts, {k: strength[k] * counts[k[0]] for k in cell}

    # shrink until a correlation-free split of the same size fits too: one artifact rate r for
    # both classes, drawn from anything but val and test (it may share images with train)
    total = int(min(sizes))
    while True:
        counts, want = plan(total)
        n_val = {k: int(round(n * TRAP_VAL_SHARE)) for k, n in want.items()}
        free_pool = {k: len(left[k]) - n_val[k] for k in cell}
        lo = max(1 - free_pool[(c, False)] / n for c, n in counts.items())
        hi = min(free_pool[(c, True)] / n for c, n in counts.items())
        if lo <= hi:
            break
        if total < 20:
            raise ValueError("the data cannot feed a trap split and a correlation-free one")
        total = int(total * 0.95)
    r = (max(lo, 0.0) + min(hi, 1.0)) / 2
    train, val = {}, {}
    for k, n in want.items():
        val[k] = left[k][: n_val[k]]
        train[k] = left[k][n_val[k] : n_val[k] + int(round(n))]
        left[k] = left[k][n_val[k] :]
    free = []
    for c, n in counts.items():
        k = int(round(r * n))
        free += [rng.permutation(left[(c, True)])[:k], rng.permutation(left[(c, False)])[: n - k]]
    return {
        "train": np.sort(np.concatenate(list(train.values()))),
        "val": np.sort(np.concatenate(list(val.values()))),
        "test": np.sort(np.concatenate(list(test.values()))),
        "free": np.sort(np.concatenate(free)),
        "star": np.array([star]),
    }


def isic_trap_data(seed: int, artifact: str, cfg: BenchConfig, cache: str | Path) -> ShortcutData:
    """``isic-trap-<artifact>`` of one seed (see the module docstring): melanoma vs benign
    (NV and BKL) on the annotated images; keep masks are the lesions, no ignore masks."""
    if artifact not in TRAP_ARTIFACTS:
        raise ValueError(f"trap artifact: expected one of {TRAP_ARTIFACTS}, got {artifact!r}")
    isic = isic_arrays(str(cfg.isic_root), cfg.isic_size, str(cache))
    _, _, flag_ids, flags = read_annotations(str(artifacts_root(cfg)), cfg.isic_size)
    every = flags_of(isic.ids, flag_ids, flags)
    annotated = np.flatnonzero(every.pop("annotated"))
    labels = (isic.labels == isic.classes.index("MEL")).astype(np.int64)
    has = trap_flag(artifact, every)
    split = trap_indices(labels[annotated], has[annotated], seed)
    star = int(split["star"][0])

    def subset(rows: np.ndarray) -> ArrayDataset:
        idx = annotated[rows]
        ids = [isic.ids[i] for i in idx]
        return _dataset(isic.images[idx], labels[idx], BENIGN_VS_MEL, isic.masks[idx], ids=ids)

    def evalset(rows: np.ndarray) -> ShortcutEval:
        data = subset(rows)
        data = replace(data, ignore=np.zeros_like(data.masks), has_ignore=np.zeros(len(rows), bool))
        idx = annotated[rows]
        misleads = has[idx] != (labels[idx] == star)
        local = {n: f[idx] for n, f in every.items()}
        return ShortcutEval(data, data.images, misleads, star, local)

    train = subset(split["train"])
    free = subset(split["free"])
    # the feedback pool: the model's own training images (``cfg.trap_pool`` of them, or all)
    rng = np.random.default_rng([seed, 17])
    size = len(train) if cfg.trap_pool is None else min(len(train), cfg.trap_pool)
    pool = np.sort(rng.choice(len(train), size, replace=False))
    return ShortcutData(
        base=train,
        clean_base=free,
        pool=train.subset(pool),
        clean_pool=free.subset(pool[pool < len(free)]),
        controls={},
        val=evalset(split["val"]),
        test=evalset(split["test"]),
    )
