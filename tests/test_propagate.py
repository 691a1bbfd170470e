"""Propagation: a few ignore marks on an artifact -> the other images that carry it, each with a
proposed mask (feedbackcam.propagate and ``feedbackcam propagate``)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from feedbackcam.cli import main
from feedbackcam.data.dataset import ArrayDataset
from feedbackcam.data.prepared import save_prepared
from feedbackcam.propagate import (
    DEFAULT_THRESHOLD,
    LITE0_EXPAND_AT,
    LITE0_THRESHOLD,
    OUTLINE_FEATURES,
    colour_proposals,
    concept_proposals,
    iou,
    outlined,
    outlined_masks,
    review_rounds,
    round_marks,
)

SIZE = 64


def skin_with_lesion(rng: np.random.Generator, centre: tuple, radius: tuple):
    """Skin-coloured noise (float (SIZE, SIZE, 3)) with a dark disc, its centre and radius drawn
    from the ``centre`` and ``radius`` ranges. Returns (image, lesion mask)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    im = np.array([200, 150, 130]) + rng.normal(0, 10, 3) + rng.normal(0, 8, (SIZE, SIZE, 3))
    cx, cy, r = *rng.uniform(*centre, 2), rng.uniform(*radius)
    lesion = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    im[lesion] = np.array([90, 60, 50]) + rng.normal(0, 10, 3)
    return im, lesion


def patched_images(n: int = 90, seed: int = 0, share: float = 0.3):
    """Skin-coloured noise, a dark lesion in the middle, and on ``share`` of the images a magenta
    patch of 8-12 px in a random corner. Returns (images, patch masks, lesion masks, has)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    patches = np.zeros((n, SIZE, SIZE), np.uint8)
    lesions = np.zeros((n, SIZE, SIZE), np.uint8)
    has = rng.random(n) < share
    for i in range(n):
        im, lesions[i] = skin_with_lesion(rng, centre=(24, 40), radius=(8, 14))
        if has[i]:
            s, corner = int(rng.integers(8, 13)), int(rng.integers(0, 4))
            x0, y0 = [2, SIZE - s - 2][corner % 2], [2, SIZE - s - 2][corner // 2]
            im[y0 : y0 + s, x0 : x0 + s] = [220, 60, 200]
            patches[i, y0 : y0 + s, x0 : x0 + s] = 1
        images[i] = np.clip(im, 0, 255)
    return images, patches, lesions, has


def _precision_recall(chosen: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    tp = (chosen & truth).sum()
    return tp / max(chosen.sum(), 1), tp / max(truth.sum(), 1)


def test_colour_matching_finds_the_marked_artifact_on_the_other_images():
    images, patches, lesions, has = patched_images()
    marked = np.flatnonzero(has)[:3]
    props = colour_proposals(images, {i: patches[i] for i in marked})
    rest = np.setdiff1d(np.arange(len(images)), marked)
    precision, recall = _precision_recall(props.proposed()[rest], has[rest])
    assert precision >= 0.9 and recall >= 0.9
    found = [iou(props.masks()[i], patches[i]) for i in rest[has[rest]]]
    assert np.mean(found) >= 0.6
    # a mark on something else (the lesion) proposes that, not the patch
    wrong = colour_proposals(images, {i: lesions[i] for i in marked})
    assert np.mean([iou(wrong.masks()[i], patches[i]) for i in rest[has[rest]]]) < 0.1


def direction_features(patches: np.ndarray, cells: int, covered, k: int = 16) -> torch.Tensor:
    """(N, k, cells, cells) seeded noise, plus one fixed direction at the cells whose patch
    coverage passes ``covered``: features in which the artifact is a known concept."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(len(patches), k, cells, cells, generator=g)
    cover = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(patches).float()[:, None], cells
    )
    direction = torch.randn(k, generator=g)
    return features + 4 * covered(cover).float() * direction.view(1, k, 1, 1)


def test_the_concept_scorer_learns_the_marked_direction_per_location():
    """Features with a known artifact direction at the patch's cells: the scorer fitted on three
    marks finds every other patched image and outlines its patch; unpatched images score low."""
    _, patches, _, has = patched_images()
    n = len(has)
    features = direction_features(patches, cells=16, covered=lambda c: c >= 0.5)
    marked = np.flatnonzero(has)[:3]
    props = concept_proposals(features, {i: patches[i] for i in marked}, SIZE)
    rest = np.setdiff1d(np.arange(n), marked)
    precision, recall = _precision_recall(props.proposed()[rest], has[rest])
    assert precision >= 0.9 and recall >= 0.9
    assert np.mean([iou(props.masks()[i], patches[i]) for i in rest[has[rest]]]) >= 0.4
    assert props.scores[rest][~has[rest]].max() < props.scores[rest][has[rest]].min()


def drifting_features(patches: np.ndarray, seed: int, cells: int = 16, k: int = 16):
    """Like :func:`direction_features`, but the artifact's direction turns from ``a`` towards
    ``b`` (an angle drawn per image in [0, 0.8] rad): patches that differ from image to image,
    as real ones do. Returns (features, angles)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(len(patches), k, cells, cells, generator=g)
    cover = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(patches).float()[:, None], cells
    )
    a, b = torch.randn(k, generator=g), torch.randn(k, generator=g)
    b = b - (b @ a) / (a @ a) * a
    b = b / b.norm() * a.norm()
    angle = np.random.default_rng([seed, 1]).uniform(0, 0.8, len(patches))
    angle = torch.from_numpy(angle).float()
    direction = torch.cos(angle)[:, None] * a + torch.sin(angle)[:, None] * b
    return features + 4 * (cover >= 0.5).float() * direction[:, :, None, None], angle.numpy()


def test_query_expansion_finds_patches_unlike_the_marked_ones():
    """Marks on the three patches nearest ``a``: one fit finds the patches like them; with
    expansion, the patches it finds join the marks and the second fit reaches the patches
    further along, without proposing unpatched images."""
    _, patches, _, has = patched_images(150, seed=1, share=0.4)
    features, angle = drifting_features(patches, seed=1)
    marked = np.argsort(np.where(has, angle, np.inf))[:3]
    marks = {int(i): patches[i] for i in marked}
    rest = np.setdiff1d(np.arange(len(has)), marked)
    once = concept_proposals(features, marks, SIZE)
    expanded = concept_proposals(features, marks, SIZE, expand_at=0.9)
    p1, r1 = _precision_recall(once.proposed(0.9)[rest], has[rest])
    p2, r2 = _precision_recall(expanded.proposed(0.9)[rest], has[rest])
    assert r1 < 0.6 and r2 >= r1 + 0.25 and p2 >= 0.85
    far = rest[has[rest] & (angle[rest] > 0.5)]  # the patches least like the marked ones
    assert expanded.scores[far].mean() > once.scores[far].mean() + 0.1
    # no image above the expansion score, or none allowed per mark: one fit, unchanged
    for kwargs in ({"expand_at": 1.01}, {"expand_at": 0.9, "expand_per_mark": 0}):
        same = concept_proposals(features, marks, SIZE, **kwargs)
        assert np.array_equal(same.scores, once.scores)


def test_round_marks_keep_the_hand_marks_and_the_newest_accepted():
    assert round_marks([7, 3], [10, 11, 12], cap=10) == [7, 3, 10, 11, 12]
    assert round_marks([7, 3], [10, 11, 12, 13], cap=4) == [7, 3, 12, 13]
    assert round_marks([7, 3, 5], [10], cap=2) == [7, 3]


def test_rounds_from_the_newest_accepted_reach_patches_unlike_the_marks():
    """A reviewer accepts the patched images each round proposes; the next round fits on the
    hand marks and the newest accepted (at most 6 marks). Fitted on the first accepted instead,
    the rounds stall: the marks stop changing once the cap is reached."""
    _, patches, _, has = patched_images(150, seed=1, share=0.4)
    features, angle = drifting_features(patches, seed=1)
    hand = [int(i) for i in np.argsort(np.where(has, angle, np.inf))[:3]]

    def recall(choose) -> float:
        accepted: list[int] = []
        for _ in range(3):
            props = concept_proposals(features, {i: patches[i] for i in choose(accepted)}, SIZE)
            ranked = np.argsort(-props.scores, kind="stable")
            accepted += [
                int(i)
                for i in ranked
                if props.scores[i] >= 0.9 and has[i] and i not in hand and i not in accepted
            ]
        return (len(hand) + len(accepted)) / has.sum()

    newest = recall(lambda accepted: round_marks(hand, accepted, cap=6))
    first = recall(lambda accepted: (hand + accepted)[:6])
    assert newest >= 0.9 and newest >= first + 0.3


def test_a_review_offers_each_image_once_and_counts_its_clicks():
    """review_rounds, the simulated "Find more like these": a reviewer who accepts only every
    other patched image. No image is offered twice, only accepted ones are returned, and the
    clicks are one per hand mark, one per round's "accept all" and per rejection, and one per
    round after the first."""
    images, patches, _, has = patched_images(150, seed=1, share=0.4)
    features, _ = drifting_features(patches, seed=1)
    hand = [int(i) for i in np.flatnonzero(has)[:3]]
    accept = lambda i, m: bool(has[i] and i % 2 == 0)  # noqa: E731
    review = review_rounds(
        features, images, {i: patches[i] for i in hand}, accept, threshold=0.9, rounds=4
    )
    offered = [i for _, new, _ in review.rounds for i in new]
    assert len(offered) == len(set(offered)) and not set(offered) & set(hand)
    assert set(review.accepted) == {i for i in offered if has[i] and i % 2 == 0}
    assert review.accepted and not review.painted
    rejected = len(offered) - len(review.accepted)
    asked = len(review.rounds) - 1
    accepts = sum(1 for _, new, _ in review.rounds if new)
    assert review.clicks == len(hand) + accepts + rejected + asked
    # the per-round summary the experiments write agrees with the rounds
    summary = review.per_round(has, "patched", chain=True)
    assert [s["proposed"] for s in summary] == [len(new) for _, new, _ in review.rounds]
    assert sum(s["accepted"] for s in summary) == len(review.accepted)
    assert sum(s["rejected"] for s in summary) == rejected
    assert sum(s.get("patched", 0) for s in summary) == int(has[offered].sum())
    assert all(s["chain"] == 0 for s in summary)


def test_outlined_keeps_the_concept_choice_and_sharpens_its_masks():
    """On coarse cells (16 px for an 8-12 px patch) the concept's mask is blocky; outlined
    keeps the concept's scores (the same images proposed) and outlines the patch by colour and
    texture (the default outline)."""
    images, patches, _, has = patched_images()
    cells = 4
    features = direction_features(patches, cells=cells, covered=lambda c: c > 0)
    marked = np.flatnonzero(has)[:3]
    marks = {i: patches[i] for i in marked}
    concept = concept_proposals(features, marks, SIZE)
    pixels = colour_proposals(images, marks, features=OUTLINE_FEATURES)
    both = outlined(concept, pixels, grow=SIZE // cells)
    assert np.array_equal(both.scores, concept.scores)
    rest = np.setdiff1d(np.flatnonzero(has), marked)
    coarse = np.mean([iou(concept.masks()[i], patches[i]) for i in rest])
    sharp = np.mean([iou(both.masks()[i], patches[i]) for i in rest])
    assert sharp >= 0.7 and sharp > coarse + 0.15
    # nothing is outlined outside the concept's region
    assert not both.masks()[~concept.proposed(0.0) | (concept.maps < 0.5).all((1, 2))].any()
    # outlining only some images gives the masks that outlining every image gives
    some = rest[::2]
    alone = outlined_masks(concept, images, marks, some, grow=SIZE // cells)
    assert np.array_equal(alone, both.masks()[some])


def ruled_images(n: int = 90, seed: int = 0, share: float = 0.3):
    """Like :func:`patched_images`, with a ruler instead of a patch: a 7 px box along the top or
    bottom edge holding a dark baseline and a dark tick every 3 px, the box being the mask (as
    SynthDerm's ruler is marked). Its pixels are mostly skin. Returns (images, boxes, has)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    boxes = np.zeros((n, SIZE, SIZE), np.uint8)
    has = rng.random(n) < share
    for i in range(n):
        im, _ = skin_with_lesion(rng, centre=(26, 38), radius=(8, 12))
        if has[i]:
            length, x0 = int(rng.integers(24, 37)), int(rng.integers(2, 8))
            y0 = [3, SIZE - 10][int(rng.integers(2))]
            boxes[i, y0 : y0 + 7, x0 : x0 + length] = 1
            ink = np.zeros((SIZE, SIZE), bool)
            ink[y0 + 1, x0 + 1 : x0 + length - 1] = True
            for t in range(x0 + 1, x0 + length - 1, 3):
                ink[y0 + 1 : y0 + 6, t] = True
            im[ink] = [40, 40, 45]
        images[i] = np.clip(im, 0, 255)
    return images, boxes, has


def test_a_ruler_is_outlined_by_its_texture_not_its_colour():
    """A ruler's box is mostly skin between thin dark ticks: colour alone outlines the ticks (or
    skin anywhere in the concept's region), colour and local texture outline the box."""
    images, boxes, has = ruled_images()
    cells = 8
    features = direction_features(boxes, cells=cells, covered=lambda c: c > 0)
    marked = np.flatnonzero(has)[:3]
    marks = {i: boxes[i] for i in marked}
    concept = concept_proposals(features, marks, SIZE)
    rest = np.setdiff1d(np.flatnonzero(has), marked)

    def mean_iou(kind: str) -> float:
        pixels = colour_proposals(images, marks, features=kind)
        masks = outlined(concept, pixels, grow=SIZE // cells).masks()
        return float(np.mean([iou(masks[i], boxes[i]) for i in rest]))

    by_colour, by_appearance = mean_iou("colour"), mean_iou("appearance")
    assert by_appearance >= 0.6 and by_colour < 0.4
    # the default outline is colour and texture
    default = outlined_masks(concept, images, marks, rest, grow=SIZE // cells)
    assert np.mean([iou(m, boxes[i]) for m, i in zip(default, rest)]) == pytest.approx(
        by_appearance
    )
    with pytest.raises(ValueError, match="kind"):
        colour_proposals(images, marks, features="shape")


@pytest.fixture
def prepared(tmp_path):
    images, patches, lesions, has = patched_images(60, seed=1)
    ids = tuple(f"img{i:03d}" for i in range(len(images)))
    data = ArrayDataset(
        images, lesions, np.zeros(len(images), np.int64), np.ones(len(images), bool), ids, ("NV",)
    )
    folder = save_prepared(data, tmp_path / "prepared")
    marks = tmp_path / "marks"
    marks.mkdir()
    for i in np.flatnonzero(has)[:3]:
        Image.fromarray(patches[i] * 255).save(marks / f"{ids[i]}.png")
    return folder, marks, ids, patches, has


def test_propagate_command_writes_scored_proposals_and_their_masks(tmp_path, prepared, capsys):
    folder, marks, ids, patches, has = prepared
    out = tmp_path / "out"
    args = ["propagate", "--data", str(folder), "--marks", str(marks), "--out", str(out)]
    assert main([*args, "--scorer", "colour"]) == 0
    with open(out / "proposals.csv") as f:
        rows = list(csv.DictReader(f))
    marked = {p.stem for p in marks.glob("*.png")}
    assert len(rows) == len(ids) - 3 and not marked & {r["id"] for r in rows}
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    proposed = {r["id"] for r in rows if r["proposed"] == "1"}
    truth = {ids[i] for i in np.flatnonzero(has)} - marked
    assert len(proposed & truth) >= 0.9 * len(truth) and len(proposed - truth) <= 1
    assert {p.stem for p in (out / "masks").glob("*.png")} == proposed
    some = sorted(proposed & truth)[0]
    mask = np.asarray(Image.open(out / "masks" / f"{some}.png")) > 127
    assert iou(mask, patches[ids.index(some)]) >= 0.5
    config = json.loads((out / "config.json").read_text())
    assert config["scorer"] == "colour" and config["marks"] == sorted(marked)
    assert config["threshold"] == DEFAULT_THRESHOLD
    assert config["expand_at"] is None  # no expansion outside the concept scorers
    # the default scorer: the offline ImageNet network's activations (no download), proposing
    # at that network's own threshold after its query expansion
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["scorer"] == "concept" and config["layer"] == "blocks.5"
    assert "efficientnet_lite0" in config["model"]
    assert config["threshold"] == LITE0_THRESHOLD
    assert config["expand_at"] == LITE0_EXPAND_AT and config["expand_per_mark"] == 10
    with open(out / "proposals.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(r["proposed"] == str(int(float(r["score"]) >= LITE0_THRESHOLD)) for r in rows)
    assert main([*args, "--threshold", "0.99", "--no-expand"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["threshold"] == 0.99 and config["expand_at"] is None
    assert "proposals.csv" in capsys.readouterr().out
    # outlined: the concept's choice of images, masks only inside its region
    with open(out / "proposals.csv") as f:
        concept = {r["id"]: r["score"] for r in csv.DictReader(f)}
    assert main([*args, "--threshold", "0.99", "--scorer", "outlined"]) == 0
    with open(out / "proposals.csv") as f:
        assert {r["id"]: r["score"] for r in csv.DictReader(f)} == concept
    # what outlined the masks is recorded
    assert json.loads((out / "config.json").read_text())["outline"] == "appearance"
    assert main([*args, "--threshold", "0.99", "--scorer", "outlined", "--outline", "colour"]) == 0
    assert json.loads((out / "config.json").read_text())["outline"] == "colour"


def test_propagate_names_the_bad_mark_and_writes_nothing(tmp_path, prepared, capsys):
    folder, marks, ids, _, _ = prepared
    out = tmp_path / "out"
    args = ["propagate", "--data", str(folder), "--marks", str(marks), "--out", str(out)]
    stranger = marks / "not-an-image-of-the-data.png"
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(stranger)
    assert main([*args, "--scorer", "colour"]) == 2
    assert str(stranger) in capsys.readouterr().err and not out.exists()
    stranger.unlink()
    empty = marks / f"{ids[0]}.png"
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(empty)
    assert main([*args, "--scorer", "colour"]) == 2
    assert f"{empty}: the mask is empty" in capsys.readouterr().err and not out.exists()
    nothing = tmp_path / "no-marks"
    nothing.mkdir()
    given = ["--data", str(folder), "--marks", str(nothing), "--out", str(out)]
    assert main(["propagate", *given, "--scorer", "colour"]) == 2
    assert "no <id>.png marks" in capsys.readouterr().err


def test_offline_features_are_the_lite0_layer_and_cached(tmp_path):
    from feedbackcam.models import build_model
    from feedbackcam.propagate import LITE0_LAYER, offline_features
    from feedbackcam.self_explaining import layer_activations

    images = patched_images(n=4)[0]
    cache = tmp_path / "features.pt"
    features = offline_features(images, cache)
    model = build_model("efficientnet_lite0", 3, weights="imagenet")
    assert torch.equal(features, layer_activations(model, images, LITE0_LAYER))
    torch.save(features + 1, cache)  # a cache that exists is read, not recomputed
    assert torch.equal(offline_features(images, cache), features + 1)
