"""The benchmark's data sets, each a function of the seed: a confounded training set for the
baseline, a confounded feedback pool with the user's masks, a confounded validation split and a
test split where the confounder is class-independent, and the same images without the confounder
(the ceiling's training data and the counterfactual test).

Every set is an :class:`~feedbackcam.data.dataset.ArrayDataset` whose ``ignore`` masks are the
confounder's (the user's "must not matter" strokes) and ``masks`` the keep masks (the digit's
strokes, SynthDerm's attribute masks, ISIC's lesion).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data.dataset import ArrayDataset
from .config import MASK_CONTROLS, WHOLE_CONTROLS, BenchConfig


@dataclass(frozen=True, eq=False)
class ShortcutEval:
    """A validation or test split: ``data`` (the images with their confounder where they have
    one; ``data.ignore`` is the confounder's mask, ``data.masks`` the keep masks), ``clean`` (the
    same images without the confounder, uint8 (N, H, W, 3)), ``misleads`` (bool (N,): the
    confounder points at another class than the label), ``target`` (the class the confounder
    stands for, if one) and ``flags`` (artifact name -> bool (N,): which images carry it as
    annotated, for per-artifact accuracies)."""

    data: ArrayDataset
    clean: np.ndarray
    misleads: np.ndarray
    target: int | None = None
    flags: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def images(self) -> Tensor:
        return float_images(self.data.images)

    @property
    def clean_images(self) -> Tensor:
        return float_images(self.clean)

    @property
    def labels(self) -> Tensor:
        return torch.from_numpy(self.data.labels)

    @property
    def confounder(self) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.data.ignore)).float()

    @property
    def keep(self) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.data.masks)).float()


@dataclass(frozen=True, eq=False)
class ShortcutData:
    """One data set of one seed (see the module docstring).

    Attributes:
        base, clean_base: the baseline's training set, with and without the confounder.
        pool, clean_pool: the feedback pool, with and without it; ``pool.ignore`` holds the true
            confounder masks of every image that has one.
        controls: control masks of the pool by kind (random, wrong, half).
        val, test: the validation split (confounded like training) and the test split.
    """

    base: ArrayDataset
    clean_base: ArrayDataset
    pool: ArrayDataset
    clean_pool: ArrayDataset
    controls: dict[str, np.ndarray]
    val: ShortcutEval
    test: ShortcutEval

    @property
    def classes(self) -> tuple[str, ...]:
        return self.pool.classes

    def pool_with(
        self, mask_kind: str = "ignore", given: np.ndarray | None = None, seed: int = 0
    ) -> ArrayDataset:
        """The pool with the ``mask_kind`` ignore masks (the true ones or a control) on the
        images in ``given`` (bool (N,); default all): an image without feedback has an empty
        ignore mask, so the counterfactual losses never fill or move what nobody marked.

        A whole-feedback control (``"random_all"``, ``"wrong_all"``) replaces the keep masks
        too (:func:`keep_control_masks`, seeded by ``seed``), and the strokes by the control of
        the same name (:func:`control_masks`)."""
        pool = self.pool
        kind = mask_kind
        if mask_kind in WHOLE_CONTROLS:
            kind = mask_kind.removesuffix("_all")
            pool = replace(pool, masks=keep_control_masks(pool.masks, seed)[kind])
        if pool.ignore is None:  # nothing was marked (the trap splits): keep masks only
            return pool
        masks = pool.ignore if kind == "ignore" else self.controls[kind]
        given = np.ones(len(pool), bool) if given is None else np.asarray(given, bool)
        ignore = (masks * given[:, None, None]).astype(np.uint8)
        return replace(pool, ignore=ignore, has_ignore=given)


def float_images(a: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) as float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float().div_(255)


def _dataset(images, labels, classes, keep=None, ignore=None, ids=None) -> ArrayDataset:
    n = len(labels)
    keep = np.zeros(images.shape[:3], np.uint8) if keep is None else keep
    return ArrayDataset(
        images=images,
        masks=keep,
        labels=np.asarray(labels, np.int64),
        has_mask=np.ones(n, bool),
        ids=tuple(ids) if ids is not None else tuple(str(i) for i in range(n)),
        classes=tuple(classes),
        ignore=ignore,
        has_ignore=None if ignore is None else np.ones(n, bool),
    )


def _random_boxes(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each mask, a box of its bounding box's size placed anywhere (empty stays empty)."""
    n, h, w = masks.shape
    out = np.zeros_like(masks)
    for i in range(n):
        ys, xs = np.nonzero(masks[i])
        if not len(ys):
            continue
        bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        y0, x0 = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        out[i, y0 : y0 + bh, x0 : x0 + bw] = 1
    return out


def control_masks(true: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Random (a box of the artifact's size anywhere), wrong (the artifact's mask moved to the
    opposite side of the image) and half (the artifact's upper half) masks."""
    half = np.zeros_like(true)
    for i in range(len(true)):
        ys = np.nonzero(true[i].any(1))[0]
        if len(ys):
            mid = (ys.min() + ys.max()) // 2
            half[i, : mid + 1] = true[i, : mid + 1]
    random = _random_boxes(true, np.random.default_rng([seed, 7]))
    return {"random": random, "wrong": np.ascontiguousarray(true[:, ::-1, ::-1]), "half": half}


def keep_control_masks(keep: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Controls of keep masks (uint8 (N, H, W)): random (a box of the mask's bounding-box size
    anywhere) and wrong (the mask rolled by half the image in both directions: a centred
    lesion's keep mask lands on the corners, i.e. on its surroundings). Empty masks stay
    empty."""
    _, h, w = keep.shape
    return {
        "random": _random_boxes(keep, np.random.default_rng([seed, 19])),
        "wrong": np.roll(keep, (h // 2, w // 2), axis=(1, 2)),
    }


def decoy_data(seed: int, sizes: dict[str, int]) -> ShortcutData:
    """Decoy-MNIST (:mod:`feedbackcam.data.decoy`): the pool is the baseline's training set."""
    from ..data.decoy import CLASSES, make_decoy_mnist

    d = make_decoy_mnist(seed, sizes)
    tr = d["train"]

    def evalset(s) -> ShortcutEval:
        data = _dataset(s.images, s.labels, CLASSES, s.masks["keep"], s.masks["ignore"])
        return ShortcutEval(data, s.clean, s.misleads)

    pool = _dataset(tr.images, tr.labels, CLASSES, tr.masks["keep"], tr.masks["ignore"])
    clean = _dataset(tr.clean, tr.labels, CLASSES, tr.masks["keep"])
    controls = {k: tr.masks[k] for k in MASK_CONTROLS}
    base = replace(pool, ignore=None, has_ignore=None)
    return ShortcutData(base, clean, pool, clean, controls, evalset(d["val"]), evalset(d["test"]))


def synth_data(seed: int, confounder: str, n: tuple[int, int, int, int]) -> ShortcutData:
    """SynthDerm with a patch or ruler on 95 % of MEL and 5 % of the rest (base, pool and
    validation), at random on half of the test images; keep masks are the attribute masks."""
    from ..data.synth import CLASSES, SynthConfig, make_synthderm

    target = CLASSES.index("MEL")

    def make(count: int, s: int, rate: float, conf: str | None = confounder):
        return make_synthderm(
            SynthConfig(n=count, size=64, seed=s, confounder=conf, confounder_rate=rate)
        )

    def sets(count: int, s: int, rate: float) -> tuple[ArrayDataset, ArrayDataset, object]:
        ds, clean = make(count, s, rate), make(count, s, rate, None)
        with_it = _dataset(ds.images, ds.labels, CLASSES, ds.masks, ds.artifact_masks)
        return with_it, _dataset(clean.images, ds.labels, CLASSES, ds.masks), ds

    base_seed = 1000 * seed
    base, clean_base, _ = sets(n[0], base_seed, 0.95)
    pool, clean_pool, _ = sets(n[1], base_seed + 1, 0.95)

    def evalset(count: int, s: int, rate: float) -> ShortcutEval:
        data, clean, ds = sets(count, s, rate)
        return ShortcutEval(data, clean.images, ds.has_artifact != (ds.labels == target), target)

    return ShortcutData(
        replace(base, ignore=None, has_ignore=None),
        clean_base,
        pool,
        clean_pool,
        control_masks(pool.ignore, seed),
        evalset(n[2], base_seed + 2, 0.95),
        evalset(n[3], base_seed + 3, 0.5),
    )


@functools.lru_cache(maxsize=2)
def isic_arrays(root: str, size: int, cache: str) -> ArrayDataset:
    """ISIC 2017 at ``size`` x ``size`` with its lesion masks, through the project's prepared
    data: ``root`` is a prepared folder (used as it is) or an ISIC 2017 folder, prepared once
    into ``cache`` (images bilinear, masks nearest-neighbour). Every image must have its mask."""
    from ..data.prepared import is_prepared, load_prepared, prepare

    folder = Path(root)
    if not is_prepared(folder):
        folder = prepare(folder, cache, size=size, image_resample="bilinear", progress=False)
    data = load_prepared(folder, mmap=False)
    if data.size != size:
        raise ValueError(f"{folder}: prepared at {data.size} px, the benchmark asks for {size}")
    missing = [i for i, m in zip(data.ids, data.masks.reshape(len(data), -1).max(1)) if not m]
    if missing:
        raise ValueError(f"{root}: {len(missing)} images have no lesion mask, e.g. {missing[0]}")
    return data


def stratified_parts(labels: np.ndarray, shares, seed: int) -> list[np.ndarray]:
    """Sorted index arrays of a stratified split into ``shares`` (seeded)."""
    from sklearn.model_selection import train_test_split

    rest = np.arange(len(labels))
    parts = []
    shares = list(shares)
    for k, share in enumerate(shares[:-1]):
        take = share / sum(shares[k:])
        part, rest = train_test_split(
            rest, train_size=take, stratify=labels[rest], random_state=seed * 10 + k
        )
        parts.append(np.sort(part))
    parts.append(np.sort(rest))
    return parts


def isic_data(seed: int, cfg: BenchConfig, cache: str | Path) -> ShortcutData:
    """ISIC 2017 with band-aids pasted outside the lesion (``data.artifacts``): on 90 % of MEL
    and 10 % of the other images of the base, feedback and validation sets, on half of all test
    images; the clean twin of every image is the image itself. Stratified split per seed into
    base / feedback pool / validation / test shares ``cfg.isic_split``. Keep masks: the lesion."""
    from ..data.artifacts import paste_bandaids

    isic = isic_arrays(str(cfg.isic_root), cfg.isic_size, str(cache))
    images, lesions, labels, classes = isic.images, isic.masks, isic.labels, isic.classes
    target = classes.index("MEL")
    base, pool, val, test = stratified_parts(labels, cfg.isic_split, seed)

    def pasted(idx: np.ndarray, rate_target: float, rate_other: float, k: int) -> ArrayDataset:
        x, m, _ = paste_bandaids(
            images[idx],
            lesions[idx],
            labels[idx],
            target=target,
            rate_target=rate_target,
            rate_other=rate_other,
            seed=seed * 100 + k,
        )
        return _dataset(x, labels[idx], classes, lesions[idx], m, [isic.ids[i] for i in idx])

    def clean(idx: np.ndarray) -> ArrayDataset:
        ids = [isic.ids[i] for i in idx]
        return _dataset(images[idx], labels[idx], classes, lesions[idx], ids=ids)

    def evalset(idx: np.ndarray, rate_target: float, rate_other: float, k: int) -> ShortcutEval:
        data = pasted(idx, rate_target, rate_other, k)
        has = data.ignore.reshape(len(idx), -1).any(1)
        return ShortcutEval(data, images[idx], has != (labels[idx] == target), target)

    pool_set = pasted(pool, 0.9, 0.1, 1)
    return ShortcutData(
        replace(pasted(base, 0.9, 0.1, 0), ignore=None, has_ignore=None),
        clean(base),
        pool_set,
        clean(pool),
        control_masks(pool_set.ignore, seed),
        evalset(val, 0.9, 0.1, 2),
        evalset(test, 0.5, 0.5, 3),
    )
