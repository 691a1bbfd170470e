"""Tests for the SynthDerm procedural dataset."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from feedbackcam.data.synth import (
    ATTRIBUTES,
    CLASSES,
    SynthConfig,
    SynthDataset,
    make_synthderm,
    render_sample,
    save_sample_grid,
)

NV, MEL, BKL = range(3)
ATTR = {name: i for i, name in enumerate(ATTRIBUTES)}


@pytest.fixture(scope="module")
def split() -> SynthDataset:
    """A small split with a patch on about half of the images."""
    return make_synthderm(SynthConfig(n=60, size=48, seed=11, confounder="patch"))


def _fields(ds: SynthDataset) -> dict[str, object]:
    return {f.name: getattr(ds, f.name) for f in dataclasses.fields(ds)}


def test_same_seed_same_arrays_and_prefix_stable() -> None:
    a = make_synthderm(SynthConfig(n=6, size=40, seed=3, confounder="ruler"))
    b = make_synthderm(SynthConfig(n=6, size=40, seed=3, confounder="ruler"))
    head = make_synthderm(SynthConfig(n=3, size=40, seed=3, confounder="ruler"))
    other = make_synthderm(SynthConfig(n=6, size=40, seed=4, confounder="ruler"))
    for name, value in _fields(a).items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, _fields(b)[name], err_msg=name)
            np.testing.assert_array_equal(value[:3], _fields(head)[name], err_msg=name)
    assert a.ids[:3] == head.ids
    assert not np.array_equal(a.images, other.images)


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_dtypes_and_ids(size: int) -> None:
    ds = make_synthderm(SynthConfig(n=5, size=size, seed=2, id_prefix="T"))
    assert len(ds) == 5
    assert ds.images.shape == (5, size, size, 3) and ds.images.dtype == np.uint8
    assert ds.masks.shape == (5, size, size) and ds.masks.dtype == np.uint8
    assert ds.attributes.shape == (5, len(ATTRIBUTES), size, size)
    assert ds.attributes.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and set(ds.labels) <= {0, 1, 2}
    assert ds.has_artifact.dtype == bool and not ds.has_artifact.any()
    assert ds.artifact_masks.shape == (5, size, size) and not ds.artifact_masks.any()
    assert ds.ids == tuple(f"T_2_{i:06d}" for i in range(5))
    assert ds.classes == CLASSES == ("NV", "MEL", "BKL")


def test_empty_split() -> None:
    ds = make_synthderm(SynthConfig(n=0, size=32))
    assert len(ds) == 0 and ds.images.shape == (0, 32, 32, 3) and ds.ids == ()


def test_masks_binary_nonempty_and_inside_lesion(split: SynthDataset) -> None:
    for arr in (split.masks, split.attributes, split.artifact_masks, split.lesion_masks):
        assert set(np.unique(arr)) <= {0, 1}
    np.testing.assert_array_equal(split.masks, split.attributes.max(axis=1))
    area = split.masks.sum(axis=(1, 2))
    lesion = split.lesion_masks.sum(axis=(1, 2))
    assert (area > 0).all()
    assert not (split.masks & (1 - split.lesion_masks)).any()
    # A region, not scattered pixels: the union covers a real share of the lesion.
    share = area / lesion
    assert 0.2 <= np.median(share) <= 0.6
    assert share.min() > 0.1 and share.max() < 0.75


def test_lesion_covers_plausible_share_of_image(split: SynthDataset) -> None:
    share = split.lesion_masks.mean(axis=(1, 2))
    assert share.min() > 0.12 and share.max() < 0.45
    assert 0.18 < share.mean() < 0.32


@pytest.mark.parametrize("kind", ["patch", "ruler"])
def test_artifact_never_touches_lesion(kind: str) -> None:
    ds = make_synthderm(SynthConfig(n=40, size=48, seed=5, confounder=kind))
    assert 5 < ds.has_artifact.sum() < 35
    has_pixels = ds.artifact_masks.any(axis=(1, 2))
    np.testing.assert_array_equal(has_pixels, ds.has_artifact)
    assert not (ds.artifact_masks & ds.lesion_masks).any()
    assert not (ds.artifact_masks & ds.masks).any()


@pytest.mark.parametrize("kind", ["patch", "ruler"])
def test_artifact_is_clipped_when_no_placement_fits(kind: str) -> None:
    from feedbackcam.data.synth_render import _artifact, _canvas

    cv = _canvas(48)
    # A lesion that leaves only the top-left corner free forces the fallback placement.
    lesion = np.hypot(cv.x - 0.25, cv.y - 0.25) < 1.4
    img = np.full((48, 48, 3), 0.5, np.float32)
    mask = _artifact(np.random.default_rng(0), kind, cv, img, lesion)
    assert mask.any() and not (mask & lesion).any()
    assert ((img != 0.5).any(-1) <= mask).all()


def test_confounder_changes_only_artifact_pixels() -> None:
    plain = make_synthderm(SynthConfig(n=20, size=48, seed=8))
    marked = make_synthderm(SynthConfig(n=20, size=48, seed=8, confounder="patch"))
    np.testing.assert_array_equal(plain.labels, marked.labels)
    np.testing.assert_array_equal(plain.attributes, marked.attributes)
    changed = (plain.images != marked.images).any(axis=-1)
    assert not (changed & ~marked.artifact_masks.astype(bool)).any()
    # The artifact is visible: most of its pixels change.
    art = marked.artifact_masks.astype(bool)
    assert changed[art].mean() > 0.5


def test_render_sample_consumes_rng_independently_of_artifact() -> None:
    outs, nexts = [], []
    for artifact in (None, "ruler"):
        rng = np.random.default_rng(123)
        outs.append(render_sample(rng, MEL, 40, artifact))
        nexts.append(rng.random())
    (img0, att0, art0), (img1, att1, art1) = outs
    assert nexts[0] == nexts[1]
    assert img0.shape == (40, 40, 3) and att0.shape == (5, 40, 40) and art0.shape == (40, 40)
    np.testing.assert_array_equal(att0, att1)
    assert not art0.any() and art1.any()
    assert not ((img0 != img1).any(-1) & ~art1.astype(bool)).any()


@pytest.mark.parametrize("kind", ["patch", "ruler"])
def test_confounder_rate_strong(kind: str) -> None:
    ds = make_synthderm(SynthConfig(n=400, size=32, seed=1, confounder=kind, confounder_rate=0.95))
    for c in range(3):
        freq = ds.has_artifact[ds.labels == c].mean()
        expected = 0.95 if CLASSES[c] == "MEL" else 0.05
        assert abs(freq - expected) < 0.06, (CLASSES[c], freq)


def test_confounder_rate_half_is_class_independent() -> None:
    ds = make_synthderm(
        SynthConfig(n=400, size=32, seed=2, confounder="patch", confounder_class="NV")
    )
    freqs = [ds.has_artifact[ds.labels == c].mean() for c in range(3)]
    assert all(abs(f - 0.5) < 0.12 for f in freqs), freqs


def test_confounder_class_is_respected() -> None:
    ds = make_synthderm(
        SynthConfig(
            n=300, size=32, seed=3, confounder="patch", confounder_class="BKL", confounder_rate=1.0
        )
    )
    np.testing.assert_array_equal(ds.has_artifact, ds.labels == BKL)


def test_labels_follow_class_probs() -> None:
    ds = make_synthderm(SynthConfig(n=400, size=32, seed=4, class_probs=(0.6, 0.3, 0.1)))
    freq = np.bincount(ds.labels, minlength=3) / len(ds)
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.07)


def test_structures_follow_class_rule() -> None:
    ds = make_synthderm(SynthConfig(n=150, size=32, seed=6))
    present = ds.attributes.any(axis=(2, 3))
    nv, mel, bkl = (present[ds.labels == c] for c in range(3))
    net, neg, streaks = ATTR["pigment_network"], ATTR["negative_network"], ATTR["streaks"]
    assert nv[:, net].all() and not nv[:, [neg, streaks]].any()
    assert (mel[:, neg] | mel[:, streaks]).all()
    assert bkl[:, ATTR["milia_like_cyst"]].all()
    assert not bkl[:, [net, neg, streaks, ATTR["globules"]]].any()


def test_class_lives_inside_the_mask_not_in_lesion_size_or_colour() -> None:
    from sklearn.linear_model import LogisticRegression

    ds = make_synthderm(SynthConfig(n=400, size=40, seed=9))
    img = ds.images / 255.0
    lesion, mask = ds.lesion_masks.astype(bool), ds.masks.astype(bool)

    def mean_rgb(sel: np.ndarray) -> np.ndarray:
        return (img * sel[..., None]).sum((1, 2)) / np.maximum(sel.sum((1, 2)), 1)[:, None]

    area = lesion.mean(axis=(1, 2))
    per_class_area = [area[ds.labels == c].mean() for c in range(3)]
    assert max(per_class_area) - min(per_class_area) < 0.03, per_class_area
    gray = img.mean(-1)
    n_in = mask.sum((1, 2))
    outside = np.c_[area, mean_rgb(lesion & ~mask)]
    inside = np.c_[
        mean_rgb(mask),
        ((gray > 0.8) & mask).sum((1, 2)) / n_in,
        ((gray < 0.25) & mask).sum((1, 2)) / n_in,
    ]
    y, half = ds.labels, len(ds) // 2
    scores = {}
    for name, x in (("outside", outside), ("inside", inside)):
        x = (x - x[:half].mean(0)) / x[:half].std(0)
        clf = LogisticRegression(max_iter=1000).fit(x[:half], y[:half])
        scores[name] = clf.score(x[half:], y[half:])
    assert scores["outside"] < 0.5 and scores["inside"] > 0.8, scores


def test_size_227() -> None:
    ds = make_synthderm(SynthConfig(n=3, size=227, seed=0, confounder="patch"))
    assert ds.images.shape == (3, 227, 227, 3)
    assert ds.masks.any(axis=(1, 2)).all()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", 16),
        ("n", -1),
        ("seed", -3),
        ("class_probs", (0.5, 0.4, 0.3)),
        ("class_probs", (1.2, -0.2, 0.0)),
        ("confounder", "sticker"),
        ("confounder_class", "SCC"),
        ("confounder_rate", 1.5),
        ("confounder_rate", -0.1),
    ],
)
def test_bad_config_raises(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SynthConfig(**{field: value})


def test_bad_render_arguments_raise() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="label"):
        render_sample(rng, 3, 64, None)
    with pytest.raises(ValueError, match="size"):
        render_sample(rng, 0, 31, None)
    with pytest.raises(ValueError, match="band-aid"):
        render_sample(rng, 0, 64, "band-aid")
    with pytest.raises(TypeError):
        make_synthderm({"n": 3})  # type: ignore[arg-type]


def test_subset_keeps_samples_aligned(split: SynthDataset) -> None:
    idx = np.flatnonzero(split.labels == BKL)[:4]
    sub = split.subset(idx)
    assert len(sub) == len(idx) and (sub.labels == BKL).all()
    np.testing.assert_array_equal(sub.images, split.images[idx])
    np.testing.assert_array_equal(sub.artifact_masks, split.artifact_masks[idx])
    assert sub.ids == tuple(split.ids[i] for i in idx)


def test_save_sample_grid(split: SynthDataset, tmp_path) -> None:
    out = save_sample_grid(split, tmp_path / "nested" / "grid.png", n_per_class=3)
    wide = save_sample_grid(split, tmp_path / "wide.png", n_per_class=5)
    with Image.open(out) as im, Image.open(wide) as im_wide:
        assert im.format == "PNG" and im.height > 3 * 150
        assert im_wide.width > im.width and im_wide.height == im.height
        rgb = np.asarray(im.convert("RGB")).astype(int)
    # Mask contours are drawn in lime and artifact contours in magenta.
    lime = (rgb[..., 1] > 200) & (rgb[..., 0] < 80) & (rgb[..., 2] < 80)
    magenta = (rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] > 200)
    assert lime.sum() > 100 and magenta.sum() > 10
    with pytest.raises(ValueError, match="n_per_class"):
        save_sample_grid(split, tmp_path / "x.png", n_per_class=0)


def test_a_subset_of_a_split_is_drawn_exactly_as_the_whole_split_draws_it():
    cfg = SynthConfig(n=12, size=32, seed=5, confounder="patch")
    whole = make_synthderm(cfg)
    idx = [7, 2, 11]
    part = make_synthderm(cfg, indices=idx)
    assert part.ids == tuple(whole.ids[i] for i in idx)
    assert np.array_equal(part.images, whole.images[idx])
    assert np.array_equal(part.labels, whole.labels[idx])
    assert np.array_equal(part.artifact_masks, whole.artifact_masks[idx])
    with pytest.raises(ValueError, match="indices"):
        make_synthderm(cfg, indices=[12])


@pytest.mark.parametrize("workers", [False, True])
def test_versions_drawn_together_equal_each_rate_drawn_alone(workers, monkeypatch):
    """make_synthderm_versions renders each image once for all rates (in forked workers above
    _PARALLEL_FROM images); every version must equal make_synthderm at that rate, bit for bit."""
    from feedbackcam.data import synth

    if not workers:
        monkeypatch.setattr(synth, "_PARALLEL_FROM", 10**9)
    else:
        monkeypatch.setattr(synth, "_PARALLEL_FROM", 2)
    cfg = SynthConfig(n=10, size=32, seed=3, confounder="patch", confounder_rate=0.9)
    rates = (0.9, 0.5, None)
    versions = synth.make_synthderm_versions(cfg, rates)
    for rate, got in zip(rates, versions, strict=True):
        alone = dataclasses.replace(cfg, confounder_rate=0.5 if rate is None else rate)
        if rate is None:
            alone = dataclasses.replace(alone, confounder=None)
        want = make_synthderm(alone)
        for name in ("images", "labels", "has_artifact", "artifact_masks", "masks", "ids"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), (rate, name)


def test_clean_and_patched_images_are_every_sample_without_and_with_its_artifact():
    from feedbackcam.data.synth import make_synthderm_versions

    cfg = SynthConfig(n=16, size=32, seed=4, confounder="patch", confounder_rate=0.5)
    (ds,) = make_synthderm_versions(cfg, (0.5,), clean=True)
    has = ds.has_artifact
    assert has.any() and (~has).any()
    assert np.array_equal(ds.patched_images[has], ds.images[has])  # drawn with it: as shown
    assert np.array_equal(ds.clean_images[~has], ds.images[~has])  # drawn without: as shown
    assert np.array_equal(
        ds.clean_images[has], make_synthderm(dataclasses.replace(cfg, confounder=None)).images[has]
    )
    changed = (ds.patched_images != ds.clean_images).any(axis=(1, 2, 3))
    assert changed.all()  # every sample has its artifact in the patched version
    sub = ds.subset([1, 3])
    assert np.array_equal(sub.patched_images, ds.patched_images[[1, 3]])
    (plain,) = make_synthderm_versions(
        dataclasses.replace(cfg, confounder=None), (0.5,), clean=True
    )
    assert plain.patched_images is None  # no confounder, nothing to paste
