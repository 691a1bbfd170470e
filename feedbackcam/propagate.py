"""One correction, many images: from a few ignore strokes on an artifact, find the other images
that carry it and propose a mask for each.

Two scorers, measured against each other on the real patches (docs/propagation.md):

- ``"concept"``: the artifact as a concept in a network's activations (Reveal2Revise's
  localisation, Pahde et al. 2023): a linear classifier (logistic regression, classes
  balanced), per location of one layer's activation map, of the marked locations against the
  unmarked ones (of the marked images and of a sample of the others). Its probability map,
  upsampled, is the proposed mask; its maximum is the image's score.
- ``"colour"``: colour matching, the baseline: a Gaussian of the marked pixels' colour against
  one of all other pixels, the per-pixel posterior smoothed over a small window.
- ``"outlined"``: the concept scorer chooses the images and where, a pixel model outlines the
  artifact there (:func:`outlined`): a feature map's cells are coarse (8 px at the explanation
  layer of a 64 px model) for a small patch, colour alone finds skin-coloured look-alikes in
  every image. The pixel model reads colour and local texture (:data:`OUTLINE_FEATURES`,
  :func:`pixel_features`): a ruler's box is skin between thin dark ticks, which colour alone
  cannot outline.

Both return one :class:`Proposals`: a score per image (0..1) and a probability map per image at
the images' size. An image is proposed when its score reaches ``threshold`` (default
:data:`DEFAULT_THRESHOLD`), its mask where the map reaches ``mask_threshold``
(:data:`MASK_THRESHOLD`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SCORERS = ("concept", "colour", "outlined")
# An image is proposed when its score reaches this: somewhere in it, the location classifier
# (trained with the classes balanced, so 0.5 means even odds against a rare class) is 90 % sure.
# A maximum over every location of every image is a maximum over thousands of trials: even odds
# would propose many images by chance (docs/propagation.md measures it).
DEFAULT_THRESHOLD = 0.9
# The offline network's own threshold and query expansion (its activations give other
# probabilities than a model's explanation layer): chosen together on a development half of
# ISIC 2017's real patches from 5 marks (thresholds 0.5..0.9; expansion off, or at 0.8 or 0.9
# with 4 or 10 images per mark; the best mean of min(precision, recall)) and measured on the
# other half (experiments/propagation_threshold.py --expansion, docs/propagation.md). Without
# expansion the same rule chose 0.8.
LITE0_THRESHOLD = 0.9
LITE0_EXPAND_AT = 0.9
# Query expansion adds at most this many images per mark (the surest first).
EXPAND_PER_MARK = 10
# What the outlined scorer outlines with (:func:`pixel_features`): colour and local texture.
# Measured against colour alone on SynthDerm's patch and ruler and ISIC 2017's real patches
# (docs/propagation.md, "Outlined by colour and texture").
OUTLINE_FEATURES = "appearance"
# A proposed mask is where the map reaches this.
MASK_THRESHOLD = 0.5
# The offline network's layer for propagation: EfficientNet-Lite0's blocks.5 (stride 32: an
# 8x8 map at 256 px; 192 channels), the layer docs/propagation.md measures.
LITE0_LAYER = "blocks.5"
# Negatives: locations of this many unmarked images (seeded) beside the marked images' own.
NEGATIVE_IMAGES = 200
# The most marks one round of "Find more like these" fits on (the app's limit per request).
MAX_MARKS = 50


def offline_network():
    """The offline network propagation scores with when no model is given: EfficientNet-Lite0
    with its ImageNet weights (shipped, no download), in eval mode; read :data:`LITE0_LAYER`."""
    from .models import build_model

    return build_model("efficientnet_lite0", 2, weights="imagenet").eval()


def offline_features(images, cache: str | Path | None = None) -> torch.Tensor:
    """(N, K, h, w) activations of :data:`LITE0_LAYER` of :func:`offline_network` for
    ``images`` (uint8 (N, H, W, 3)); with ``cache`` (a ``.pt`` file), read from it when it
    exists, else computed and saved there."""
    from .self_explaining import layer_activations

    if cache is not None and Path(cache).exists():
        return torch.load(cache)
    features = layer_activations(offline_network(), images, LITE0_LAYER, batch_size=32)
    if cache is not None:
        torch.save(features, cache)
    return features


@dataclass(frozen=True)
class Proposals:
    """Scores (N,) in [0, 1] and probability maps (N, H, W) float32 of one scorer."""

    scores: np.ndarray
    maps: np.ndarray

    def proposed(self, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
        """Bool (N,): the images whose score reaches ``threshold``."""
        return self.scores >= threshold

    def masks(self, mask_threshold: float = MASK_THRESHOLD) -> np.ndarray:
        """uint8 (N, H, W) 0/1: where each map reaches ``mask_threshold``."""
        return (self.maps >= mask_threshold).astype(np.uint8)


def _coverage(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The share of each feature-map cell that ``masks`` (N, H, W) cover: (N, h, w)."""
    m = torch.from_numpy(np.ascontiguousarray(masks)).float()[:, None]
    return F.adaptive_avg_pool2d(m, size)[:, 0].numpy()


def _upsample(maps: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(maps)).float()[:, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def concept_proposals(
    features: torch.Tensor,
    marks: dict[int, np.ndarray],
    image_size: int,
    *,
    seed: int = 0,
    negative_images: int = NEGATIVE_IMAGES,
    expand_at: float | None = None,
    expand_per_mark: int = EXPAND_PER_MARK,
) -> Proposals:
    """The concept scorer on ``features`` (N, K, h, w), from ``marks`` {image index: (H, W)
    0/1 ignore mask}. Positives: cells at least half covered by a mark; negatives: the marked
    images' uncovered cells and every cell of ``negative_images`` unmarked images (seeded; a
    few may carry the artifact unmarked, which the balanced logistic regression tolerates).

    With ``expand_at``, one round of query expansion, as retrieval does it: the images the first
    fit scores at or above ``expand_at`` (the surest first, at most ``expand_per_mark`` per
    mark) join the marks, each with its proposed mask, and the classifier is fitted again. A
    clinician marks a few patches; the patches found from them look like more of the patches
    the data holds, so the second fit finds patches unlike the marked ones (docs/
    propagation.md, ISIC 2017's test half, 5 marks: recall 0.92 -> 0.99 at precision 0.95).
    Measured for the offline network only (:data:`LITE0_EXPAND_AT`)."""
    if not marks:
        raise ValueError("marks: expected at least one marked image")
    props = _concept_fit(features, marks, image_size, seed, negative_images)
    if expand_at is None:
        return props
    order = np.argsort(-props.scores, kind="stable")
    found = [int(i) for i in order if props.scores[i] >= expand_at and int(i) not in marks]
    found = found[: expand_per_mark * len(marks)]
    if not found:
        return props
    more = {i: (props.maps[i] >= MASK_THRESHOLD).astype(np.uint8) for i in found}
    return _concept_fit(features, {**marks, **more}, image_size, seed, negative_images)


def _concept_fit(
    features: torch.Tensor,
    marks: dict[int, np.ndarray],
    image_size: int,
    seed: int,
    negative_images: int,
) -> Proposals:
    """One fit of the concept scorer (:func:`concept_proposals` without expansion)."""
    from sklearn.linear_model import LogisticRegression

    n, k, h, w = features.shape
    flat = F.normalize(features, dim=1).permute(0, 2, 3, 1).reshape(n, h * w, k).numpy()
    idx = np.array(sorted(marks))
    cover = _coverage(np.stack([marks[i] for i in idx]), (h, w)).reshape(len(idx), -1)
    pos = flat[idx][cover >= 0.5]
    if not len(pos):  # a mark smaller than a cell: its best-covered cell stands for it
        pos = flat[idx, cover.argmax(1)]
    neg = [flat[idx][cover == 0]]
    rng = np.random.default_rng(seed)
    others = np.setdiff1d(np.arange(n), idx)
    if len(others):
        pick = rng.choice(others, min(negative_images, len(others)), replace=False)
        neg.append(flat[pick].reshape(-1, k))
    neg = np.concatenate(neg)
    x = np.concatenate([pos, neg])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    clf = LogisticRegression(class_weight="balanced", max_iter=2000, C=1.0)
    clf.fit(x, y)
    prob = clf.predict_proba(flat.reshape(-1, k))[:, 1].reshape(n, h, w)
    return Proposals(prob.max(axis=(1, 2)).astype(np.float32), _upsample(prob, image_size))


def pixel_features(images: np.ndarray, kind: str = "colour", window: int = 5) -> np.ndarray:
    """Per-pixel features of ``images`` (uint8 (N, H, W, 3)) in grey levels, float64 (N, H, W,
    D): ``"colour"``, the RGB (D = 3); ``"appearance"``, the RGB, its mean and its standard
    deviation per channel over a ``window`` x ``window`` box (D = 9, edges replicated).

    Appearance is colour and local texture: a ruler's box is mostly skin between dark ticks, so
    its pixels' colour is the skin's, while its local spread is not (docs/propagation.md)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).double().permute(0, 3, 1, 2)
    if kind == "colour":
        return x.permute(0, 2, 3, 1).numpy()
    if kind != "appearance":
        raise ValueError(f"kind: expected 'colour' or 'appearance', got {kind!r}")
    pad = (window // 2,) * 4
    mean = F.avg_pool2d(F.pad(x, pad, mode="replicate"), window, stride=1)
    square = F.avg_pool2d(F.pad(x * x, pad, mode="replicate"), window, stride=1)
    spread = (square - mean * mean).clamp_min(0).sqrt()
    return torch.cat([x, mean, spread], 1).permute(0, 2, 3, 1).numpy()


def colour_proposals(
    images: np.ndarray,
    marks: dict[int, np.ndarray],
    *,
    window: int = 5,
    seed: int = 0,
    features: str = "colour",
) -> Proposals:
    """The colour scorer: Gaussians of the marked pixels' RGB and of the marked images' other
    pixels (a seeded sample of at most 200,000), the posterior of "marked" per pixel (equal
    priors) averaged over a ``window`` x ``window`` box; an image's score is its map's
    maximum. With ``features="appearance"`` the Gaussians are of :func:`pixel_features`'
    colour and local texture in the same window (what :func:`outlined_masks` outlines with).
    The model is fitted on the marked images alone, so an image's map does not depend on which
    other images are scored (:func:`outlined_masks` relies on it)."""
    if not marks:
        raise ValueError("marks: expected at least one marked image")
    idx = np.array(sorted(marks))
    marked = np.stack([marks[i] for i in idx]).astype(bool)
    px = pixel_features(images[idx], features, window)
    px = px.reshape(-1, px.shape[-1])
    inside = marked.reshape(-1)
    rng = np.random.default_rng(seed)
    outside = px[~inside]
    outside = outside[rng.choice(len(outside), min(len(outside), 200_000), replace=False)]

    def gaussian(v: np.ndarray):
        mu = v.mean(0)
        cov = np.cov(v.T) + np.eye(v.shape[1]) * 4.0  # a floor of 2 grey levels per feature
        inv, (_, logdet) = np.linalg.inv(cov), np.linalg.slogdet(cov)
        return mu, inv, logdet

    a, b = gaussian(px[inside]), gaussian(outside)
    maps = np.empty(images.shape[:3], np.float32)
    for i in range(len(images)):
        v = pixel_features(images[i : i + 1], features, window).reshape(-1, px.shape[1])
        ll = []
        for mu, inv, logdet in (a, b):
            d = v - mu
            ll.append(-0.5 * (np.einsum("ij,jk,ik->i", d, inv, d) + logdet))
        p = 1 / (1 + np.exp(np.clip(ll[1] - ll[0], -50, 50)))
        maps[i] = p.reshape(images.shape[1:3])
    smooth = nn.functional.avg_pool2d(
        torch.from_numpy(maps)[:, None], window, stride=1, padding=window // 2
    )[:, 0].numpy()
    return Proposals(smooth.max(axis=(1, 2)).astype(np.float32), smooth.astype(np.float32))


def outlined(concept: Proposals, colour: Proposals, grow: int) -> Proposals:
    """The concept scorer's scores, with maps that are the colour map inside the concept's
    proposed region grown by ``grow`` pixels (one feature cell is a good choice) and zero
    outside it."""
    region = torch.from_numpy(concept.maps >= MASK_THRESHOLD).float()[:, None]
    if grow > 0:
        region = F.max_pool2d(region, 2 * grow + 1, stride=1, padding=grow)
    return Proposals(concept.scores, np.where(region[:, 0].numpy() > 0, colour.maps, 0.0))


def outlined_masks(
    concept: Proposals,
    images: np.ndarray,
    marks: dict[int, np.ndarray],
    which,
    grow: int,
    *,
    seed: int = 0,
    features: str | None = None,
) -> np.ndarray:
    """uint8 (len(which), H, W): the outlined masks (:func:`outlined`) of the images ``which``
    (indices into ``images``) only, outlined with ``features`` (default
    :data:`OUTLINE_FEATURES`; see :func:`pixel_features`). The pixel model is applied to the
    marks and these images, not to every scored one: outlining the few images a reviewer sees
    costs those alone, and gives the masks that outlining all of them would."""
    features = features or OUTLINE_FEATURES
    keys = sorted(marks)
    sub = np.array([*keys, *which], dtype=np.int64)
    colour = colour_proposals(
        images[sub], {k: marks[j] for k, j in enumerate(keys)}, seed=seed, features=features
    )
    part = Proposals(concept.scores[sub], concept.maps[sub])
    return outlined(part, colour, grow).masks()[len(keys) :]


def round_marks(hand: list, accepted: list, cap: int = MAX_MARKS) -> list:
    """The marks the next round of "Find more like these" fits on: every hand mark, then the
    newest accepted proposals (``accepted`` in the order they were accepted), at most ``cap``
    in all (the hand marks first when they alone exceed it).

    The newest, not the first: once the accepted proposals exceed the cap, a round fitted on
    the hand marks and the *first* accepted ones fits the previous round's marks again and
    finds nothing new; the newest are the images unlike the hand marks that the last round
    reached (docs/propagation.md, "Rounds")."""
    room = max(cap - len(hand), 0)
    return list(hand[:cap]) + (list(accepted[-room:]) if room else [])


@dataclass
class Review:
    """What :func:`review_rounds` did: the accepted masks (in the order accepted), the images
    painted by hand to start a new chain, one ``(chain, proposed indices, accepted count)`` per
    round, and the clicks spent."""

    accepted: dict[int, np.ndarray]
    painted: list[int]
    rounds: list[tuple[int, list[int], int]]
    clicks: int

    def per_round(self, positive: np.ndarray, name: str, *, chain: bool = False) -> list[dict]:
        """One summary per round: images proposed, how many of them are ``positive`` (a
        boolean per image, e.g. "has the artifact"; counted under ``name``), accepted and
        rejected; ``chain`` adds the round's chain."""
        out = []
        for c, new, got in self.rounds:
            row = {"chain": c} if chain else {}
            row["proposed"] = len(new)
            if new:
                row[name] = int(positive[new].sum())
            out.append({**row, "accepted": got, "rejected": len(new) - got})
        return out


def review_rounds(
    features: torch.Tensor,
    images: np.ndarray,
    hand: dict[int, np.ndarray],
    accept,
    *,
    threshold: float,
    expand_at: float | None = None,
    rounds: int = 5,
    seed: int = 0,
    outline: str | None = None,
    paint=None,
    chains: int = 1,
) -> Review:
    """A reviewer's rounds of "Find more like these" (the app's workflow, simulated): each round
    fits the concept on :func:`round_marks` of the chain's source marks and its accepted
    proposals, proposes the images at ``threshold`` not reviewed yet (highest score first),
    outlines them (:func:`outlined_masks`, one feature cell grown) and keeps those for which
    ``accept(index, mask)`` is true. A chain ends after a round that accepts nothing; with
    ``paint(proposed) -> (index, mask) | None`` and ``chains`` > 1, the reviewer then paints
    one of that round's images by hand and starts a new chain from it alone, with only the
    marked images left out (as the app leaves out an image already marked where the artifact
    is found). At most ``rounds`` rounds per chain.

    Clicks: one per hand mark (painted ones too); per round one "accept all" and one per
    rejected proposal; one per "Find more like these" / "Find more like this" after the first.
    ``hand``: {image index: its hand mask}, the marks of the first chain."""
    marks_by_hand = dict(hand)
    accepted: dict[int, np.ndarray] = {}
    painted: list[int] = []
    source, chain_accepted = list(hand), []
    reviewed = set(hand)
    done, clicks = [], len(hand)
    grow = images.shape[1] // features.shape[-1]
    chain, r = 0, 0
    while r < rounds:
        keys = round_marks(source, chain_accepted)
        marks = {i: accepted[i] if i in accepted else marks_by_hand[i] for i in keys}
        props = concept_proposals(features, marks, images.shape[1], seed=seed, expand_at=expand_at)
        ranked = np.argsort(-props.scores, kind="stable")
        chosen = props.proposed(threshold)
        new = [int(i) for i in ranked if chosen[i] and int(i) not in reviewed]
        clicks += 1 if r or chain else 0  # "Find more like these" / "... like this"
        if not new:
            done.append((chain, [], 0))
            break
        outlines = outlined_masks(props, images, marks, new, grow, seed=seed, features=outline)
        got = 0
        for i, m in zip(new, outlines, strict=True):
            if accept(i, m):
                accepted[i] = m
                chain_accepted.append(i)
                got += 1
        reviewed.update(new)
        clicks += 1 + len(new) - got  # "accept all", one untick per rejected proposal
        done.append((chain, new, got))
        r += 1
        if not got:
            start = paint(new) if paint is not None and chain + 1 < chains else None
            if start is None:
                break
            i, mask = start
            marks_by_hand[i] = mask
            painted.append(i)
            clicks += 1
            chain, r = chain + 1, 0
            source, chain_accepted = [i], []
            reviewed = {*hand, *painted, *accepted}
    return Review(accepted, painted, done, clicks)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two 0/1 masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0
