"""SynthDerm: procedural dermoscopy-like images with known ISIC 2018 Task 2 attribute masks.

Each sample is a skin-toned field with hairs and a dermatoscope vignette, holding one irregular
pigmented lesion. The class is decided only by the dermoscopic structures drawn inside the lesion
(pigment network, negative network, streaks, milia-like cysts, globules), each with its own
region mask; the explanation feedback mask is their union, as in ISIC 2018 Task 2. Lesion size,
shape and colour are drawn before, and independently of, the label.

Class rule (a caricature of the dermoscopy textbooks):

* ``NV``: a regular pigment network; sometimes regular globules, rarely a few milia-like cysts.
* ``MEL``: streaks at the periphery and/or a negative network; sometimes an atypical network
  (warped, broken, thick dark lines) and irregular globules of uneven size and colour.
* ``BKL`` (seborrheic keratosis): many milia-like cysts, never a network.

An optional confounder (a band-aid ``"patch"`` or a ``"ruler"``) is drawn outside the lesion
with a class-dependent frequency, so a classifier can learn a shortcut that the explanation
feedback should remove. Artifacts come from their own random stream and are drawn after
everything else but the vignette and sensor noise, so the same seed with and without a
confounder gives images that differ only inside ``artifact_masks``.

Coordinates are normalised to [-1, 1] across the image and every length below is in those
units, so a sample looks the same at any resolution; line widths are chosen to stay >= 1 px at 64.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import ArrayDataset
from .records import ATTRIBUTES
from .synth_render import render, render_versions

CLASSES = ("NV", "MEL", "BKL")
CONFOUNDERS = ("patch", "ruler")


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 32:
        raise ValueError(f"size must be an int >= 32, got {size!r}")


def _check_artifact(kind: str | None) -> None:
    if kind is not None and kind not in CONFOUNDERS:
        raise ValueError(f"confounder must be None or one of {CONFOUNDERS}, got {kind!r}")


@dataclass(frozen=True)
class SynthConfig:
    """How to generate a SynthDerm split.

    Attributes:
        n: Number of images.
        size: Side in pixels (>= 32; 32..256 is the tested range, 227 included).
        seed: Sample ``i`` depends only on ``(seed, i)``.
        class_probs: Probability of ``NV``, ``MEL``, ``BKL``; must sum to 1.
        confounder: ``None``, ``"patch"`` or ``"ruler"``.
        confounder_class: Class the artifact is correlated with.
        confounder_rate: ``P(artifact | confounder_class) = r`` and
            ``P(artifact | other class) = 1 - r``; 0.5 makes it independent of the class.
        id_prefix: Ids read ``f"{id_prefix}_{seed}_{i:06d}"``.
    """

    n: int = 600
    size: int = 128
    seed: int = 0
    class_probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    confounder: str | None = None
    confounder_class: str = "MEL"
    confounder_rate: float = 0.5
    id_prefix: str = "SYN"

    def __post_init__(self) -> None:
        if not isinstance(self.n, (int, np.integer)) or self.n < 0:
            raise ValueError(f"n must be an int >= 0, got {self.n!r}")
        _check_size(self.size)
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        p = np.asarray(self.class_probs, dtype=float)
        if p.shape != (len(CLASSES),) or (p < 0).any() or not np.isclose(p.sum(), 1.0):
            raise ValueError(
                f"class_probs must be {len(CLASSES)} non-negative numbers summing to 1, "
                f"got {self.class_probs!r}"
            )
        _check_artifact(self.confounder)
        if self.confounder_class not in CLASSES:
            raise ValueError(
                f"confounder_class must be one of {CLASSES}, got {self.confounder_class!r}"
            )
        if not 0.0 <= self.confounder_rate <= 1.0:
            raise ValueError(f"confounder_rate must be in [0, 1], got {self.confounder_rate!r}")


@dataclass(frozen=True)
class SynthDataset:
    """A generated split; all arrays share the leading sample axis.

    Attributes:
        images: uint8 ``(N, H, W, 3)``.
        masks: uint8 ``(N, H, W)`` in {0, 1}: union of the attributes, the explanation feedback.
        attributes: uint8 ``(N, 5, H, W)`` in {0, 1}, in ``ATTRIBUTES`` order.
        labels: int64 ``(N,)``, indices into ``classes``.
        has_artifact: bool ``(N,)``.
        artifact_masks: uint8 ``(N, H, W)`` in {0, 1}; never part of ``masks``.
        ids: One string id per sample.
        classes: Class names, ``CLASSES``.
        lesion_masks: uint8 ``(N, H, W)`` lesion segmentation (body plus streak zone), or
            ``None`` when the dataset was built by hand without one.
        clean_images: uint8 ``(N, H, W, 3)``, the same images without their artifact (the
            counterfactual a shortcut test needs), or ``None`` when not drawn
            (:func:`make_synthderm_versions` with ``clean=True`` draws them).
        patched_images: uint8 ``(N, H, W, 3)``, the same images with the artifact, drawn for
            every sample (where ``has_artifact`` they equal ``images``), or ``None``: with
            ``clean_images``, the pair a shortcut test compares on every image.
    """

    images: np.ndarray
    masks: np.ndarray
    attributes: np.ndarray
    labels: np.ndarray
    has_artifact: np.ndarray
    artifact_masks: np.ndarray
    ids: tuple[str, ...]
    classes: tuple[str, ...] = CLASSES
    lesion_masks: np.ndarray | None = None
    clean_images: np.ndarray | None = None
    patched_images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray | list[int] | slice) -> SynthDataset:
        """Return the samples at ``index`` (integer array, boolean mask or slice)."""
        idx = np.arange(len(self))[index]
        return SynthDataset(
            images=self.images[idx],
            masks=self.masks[idx],
            attributes=self.attributes[idx],
            labels=self.labels[idx],
            has_artifact=self.has_artifact[idx],
            artifact_masks=self.artifact_masks[idx],
            ids=tuple(self.ids[i] for i in idx),
            classes=self.classes,
            lesion_masks=None if self.lesion_masks is None else self.lesion_masks[idx],
            clean_images=None if self.clean_images is None else self.clean_images[idx],
            patched_images=None if self.patched_images is None else self.patched_images[idx],
        )


def make_synthderm(
    config: SynthConfig = SynthConfig(),  # noqa: B008
    indices: Sequence[int] | None = None,
) -> SynthDataset:
    """Generate a SynthDerm split.

    Sample ``i`` is drawn from ``np.random.default_rng([seed, i])``: label from ``class_probs``,
    then the artifact coin, then the image. The first ``k`` samples of a split therefore equal
    a split of ``n=k``, and changing only the confounder changes only artifact pixels.

    Args:
        config: Generation settings.
        indices: draw only these samples of the split (in this order), each exactly as the
            whole split would; None draws all ``config.n``.

    Returns:
        The dataset.

    Example:
        >>> ds = make_synthderm(SynthConfig(n=8, size=64, confounder="patch"))
        >>> ds.images.shape, ds.masks.shape, ds.attributes.shape
        ((8, 64, 64, 3), (8, 64, 64), (8, 5, 64, 64))
    """
    if not isinstance(config, SynthConfig):
        raise TypeError(f"config must be a SynthConfig, got {type(config).__name__}")
    return make_synthderm_versions(config, (config.confounder_rate,), indices)[0]


def make_synthderm_versions(
    config: SynthConfig,
    rates: Sequence[float | None],
    indices: Sequence[int] | None = None,
    *,
    clean: bool = False,
) -> tuple[SynthDataset, ...]:
    """One SynthDerm split at several confounder rates, each image drawn once.

    Version ``k`` equals ``make_synthderm(replace(config, confounder_rate=rates[k]), indices)``
    (``None``: ``confounder=None``, no artifact anywhere): the artifact coin and the artifact
    are drawn from their own streams, so the versions share every lesion and differ only where
    an image's artifact is drawn in one and not in another. Drawing the versions together costs
    one rendering per image instead of one per version. ``clean``: every version also holds
    ``clean_images``, its images without their artifact, and (with a confounder)
    ``patched_images``, every image with its artifact.
    """
    if not isinstance(config, SynthConfig):
        raise TypeError(f"config must be a SynthConfig, got {type(config).__name__}")
    for rate in rates:
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise ValueError(f"rates must be in [0, 1] or None, got {rate!r}")
    order = range(config.n) if indices is None else [int(i) for i in indices]
    if any(not 0 <= i < config.n for i in order):
        raise ValueError(f"indices: expected values in [0, {config.n}), got {list(indices)}")
    n, s, v = len(order), config.size, len(rates)
    images = np.empty((v, n, s, s, 3), np.uint8)
    clean_images = np.empty((n, s, s, 3), np.uint8) if clean else None
    both = clean and config.confounder is not None
    patched_images = np.empty((n, s, s, 3), np.uint8) if both else None
    attributes = np.empty((n, len(ATTRIBUTES), s, s), np.uint8)
    artifact_masks = np.zeros((v, n, s, s), np.uint8)
    lesion_masks = np.empty((n, s, s), np.uint8)
    labels = np.empty(n, np.int64)
    has_artifact = np.zeros((v, n), bool)
    for row, (label, has, plain, patched, attrs, art_mask, lesion) in enumerate(
        _draw_all(config, tuple(rates), list(order), always=both)
    ):
        has_artifact[:, row] = has
        for k in range(v):
            if has[k]:
                images[k, row], artifact_masks[k, row] = patched, art_mask
            else:
                images[k, row] = plain
        if clean_images is not None:
            clean_images[row] = plain
        if patched_images is not None:
            patched_images[row] = patched
        attributes[row], lesion_masks[row], labels[row] = attrs, lesion, label
    masks = attributes.max(axis=1, initial=0)
    ids = tuple(f"{config.id_prefix}_{config.seed}_{i:06d}" for i in order)
    return tuple(
        SynthDataset(
            images=images[k],
            masks=masks,
            attributes=attributes,
            labels=labels,
            has_artifact=has_artifact[k],
            artifact_masks=artifact_masks[k],
            ids=ids,
            lesion_masks=lesion_masks,
            clean_images=clean_images,
            patched_images=patched_images,
        )
        for k in range(v)
    )


# Below this many images the drawing stays in this process (starting workers costs more).
_PARALLEL_FROM = 64


def _draw(config: SynthConfig, rates: tuple[float | None, ...], i: int, always: bool = False):
    """Sample ``i`` of a split: (label, has-artifact per rate, clean image, image with the
    artifact or None, attributes, artifact mask, lesion mask). ``always``: draw the image with
    the artifact even where no rate gives it one (the artifact has its own random stream, so
    nothing else changes)."""
    rng = np.random.default_rng([config.seed, i])
    probs = np.asarray(config.class_probs, dtype=float)
    label = int(rng.choice(len(CLASSES), p=probs / probs.sum()))
    # The coin is drawn even without a confounder so the images do not depend on it.
    coin = rng.random()
    target = CLASSES.index(config.confounder_class)
    has = [
        config.confounder is not None
        and rate is not None
        and coin < (rate if label == target else 1.0 - rate)
        for rate in rates
    ]
    artifact = config.confounder if any(has) or always else None
    return (label, has, *render_versions(rng, label, config.size, artifact))


def _draw_chunk(
    config: SynthConfig, rates: tuple[float | None, ...], order: list[int], always: bool = False
):
    return [_draw(config, rates, i, always) for i in order]


def _draw_all(
    config: SynthConfig, rates: tuple[float | None, ...], order: list[int], always: bool = False
):
    """Every sample of ``order``, drawn in worker processes when there are many and the
    platform forks cheaply (Linux); each sample has its own random stream, so the result does
    not depend on how the work is split."""
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 8)
    daemon = multiprocessing.current_process().daemon  # may not start processes of its own
    if len(order) < _PARALLEL_FROM or workers < 2 or sys.platform != "linux" or daemon:
        return _draw_chunk(config, rates, order, always)
    chunks = [order[k::workers] for k in range(workers)]
    try:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            parts = list(
                pool.map(
                    _draw_chunk, [config] * workers, [rates] * workers, chunks, [always] * workers
                )
            )
    except (OSError, BrokenProcessPool):  # no processes to be had: draw here
        return _draw_chunk(config, rates, order, always)
    drawn = [None] * len(order)
    for k, part in enumerate(parts):
        drawn[k::workers] = part
    return drawn


def render_sample(
    rng: np.random.Generator, label: int, size: int, artifact: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image of class ``label``.

    Args:
        rng: Random stream; consumed identically whatever ``artifact`` is.
        label: Index into ``CLASSES``.
        size: Side in pixels (>= 32).
        artifact: ``None``, ``"patch"`` or ``"ruler"``.

    Returns:
        ``image`` uint8 ``(size, size, 3)``, ``attributes`` uint8 ``(5, size, size)`` in
        ``ATTRIBUTES`` order, ``artifact_mask`` uint8 ``(size, size)``.
    """
    if not isinstance(label, (int, np.integer)) or not 0 <= label < len(CLASSES):
        raise ValueError(f"label must be an int in [0, {len(CLASSES)}), got {label!r}")
    _check_size(size)
    _check_artifact(artifact)
    image, attributes, artifact_mask, _ = render(rng, int(label), size, artifact)
    return image, attributes, artifact_mask


def save_sample_grid(dataset: SynthDataset, path: str | Path, n_per_class: int = 4) -> Path:
    """Save a PNG grid, one row per class, with mask contours drawn over the images.

    The explanation mask is outlined in lime, the artifact mask in magenta; each tile is titled
    with the attributes it holds.

    Args:
        dataset: Samples to show; the first ``n_per_class`` of each class are used.
        path: Output PNG path; parent folders are created.
        n_per_class: Columns.

    Returns:
        The written path.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class!r}")
    # Figure without pyplot: no global backend or figure registry is touched.
    from matplotlib.figure import Figure

    short = {"globules": "glob", "milia_like_cyst": "milia", "negative_network": "neg-net"}
    short |= {"pigment_network": "net", "streaks": "streaks"}
    n_rows = len(dataset.classes)
    fig = Figure(figsize=(2.6 * n_per_class, 2.75 * n_rows + 0.3), dpi=100)
    axes = fig.subplots(n_rows, n_per_class, squeeze=False)
    for row, name in enumerate(dataset.classes):
        idx = np.flatnonzero(dataset.labels == row)[:n_per_class]
        for col in range(n_per_class):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name, fontsize=14, fontweight="bold")
            if col >= len(idx):
                continue
            i = idx[col]
            ax.imshow(dataset.images[i])
            ax.contour(dataset.masks[i], levels=[0.5], colors="lime", linewidths=0.8)
            if dataset.has_artifact[i]:
                ax.contour(dataset.artifact_masks[i], levels=[0.5], colors="magenta")
            present = [
                short[a] for a, m in zip(ATTRIBUTES, dataset.attributes[i], strict=True) if m.any()
            ]
            ax.set_title("+".join(present), fontsize=8)
    fig.suptitle("SynthDerm: lime = explanation mask, magenta = artifact", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def as_array_dataset(ds: SynthDataset) -> ArrayDataset:
    """SynthDerm as feedback data: the attribute masks are the keep masks (what matters), and the
    artifact, where an image has one, is the ignore mask (what a dermatologist marks "not
    this")."""
    return ArrayDataset(
        images=ds.images,
        masks=ds.masks,
        labels=ds.labels,
        has_mask=np.ones(len(ds), bool),
        ids=ds.ids,
        classes=tuple(ds.classes),
        ignore=ds.artifact_masks,
        has_ignore=np.asarray(ds.has_artifact, bool),
    )
