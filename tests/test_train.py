import copy

import numpy as np
import pytest
import torch

from feedbackcam import cam
from feedbackcam.data.dataset import FeedbackBatch
from feedbackcam.losses import EXPLANATION_LOSSES
from feedbackcam.models import small_cnn
from feedbackcam.objective import FeedbackConfig
from feedbackcam.train import feedback_step, reference_step


def _batch(n=4, size=32, seed=0, ignore=False):
    """Keep masks on every sample; ignore masks too with ``ignore`` (with them, the default
    FeedbackConfig adds its ignore loss)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, size, size)
    masks[:, 4:20, 8:24] = 1
    out = FeedbackBatch(
        torch.rand(n, 3, size, size, generator=g),
        torch.randint(0, 3, (n,), generator=g),
        masks,
        torch.ones(n, dtype=torch.bool),
    )
    if not ignore:
        return out
    region = torch.zeros(n, size, size)
    region[:, 22:30, 0:8] = 1
    return out._replace(ignore=region, has_ignore=torch.ones(n, dtype=torch.bool))


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("loss", ["jaccard", "dice", "energy", "mse"])
@pytest.mark.parametrize("cam_method", cam.METHODS)
def test_batch_size_one_equals_the_thesis_reference_step(tiny_model, loss, cam_method):
    cfg = FeedbackConfig.thesis(
        lam=0.5, explanation_loss=loss, cam=cam_method, second_order="detached", ignore_loss=None
    )
    other = copy.deepcopy(tiny_model)
    batch = _batch(n=1)
    before = _params(tiny_model)
    ours = feedback_step(tiny_model, batch, torch.optim.SGD(tiny_model.parameters(), lr=0.1), cfg)
    ref = reference_step(other, batch, torch.optim.SGD(other.parameters(), lr=0.1), cfg)
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert ours["loss_exp"] > 0
    for p0, a, b in zip(before, tiny_model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a - p0, b - p0, rtol=1e-4, atol=1e-7)
    assert any(not torch.equal(p0, a) for p0, a in zip(before, tiny_model.parameters()))


def test_reference_step_refuses_ignore_masks_it_would_not_learn_from(tiny_model):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="ignore_loss=None"):
        reference_step(tiny_model, _batch(n=1, ignore=True), opt, FeedbackConfig(lam=0.5))


@pytest.mark.parametrize("loss", EXPLANATION_LOSSES)
@pytest.mark.parametrize("second_order", ["detached", "full"])
def test_explanation_loss_gradients_reach_the_first_conv_layer(tiny_model, loss, second_order):
    cfg = FeedbackConfig.thesis(lam=1.0, explanation_loss=loss, second_order=second_order)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.0)
    batch = _batch(ignore=EXPLANATION_LOSSES[loss].needs == "ignore")
    stats = feedback_step(tiny_model, batch, opt, cfg)
    assert stats["loss_exp"] > 0 and stats["skipped"] == 0
    conv1 = tiny_model.model.features.conv1.weight.grad
    assert conv1 is not None and conv1.abs().sum() > 0


def test_full_second_order_also_trains_the_head_from_the_explanation_loss(tiny_model):
    fc = tiny_model.model.fc.weight
    for mode, expect in [("detached", False), ("full", True)]:
        opt = torch.optim.SGD(tiny_model.parameters(), lr=0.0)
        cfg = FeedbackConfig.thesis(lam=1.0, second_order=mode)
        feedback_step(tiny_model, _batch(), opt, cfg)
        has_grad = fc.grad is not None and bool(fc.grad.abs().sum() > 0)
        assert has_grad is expect, mode


def test_mini_batches_and_batch_size_one_both_step(tiny_model):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.05)
    for n in (1, 8):
        before = _params(tiny_model)
        stats = feedback_step(tiny_model, _batch(n), opt, FeedbackConfig.thesis())
        assert stats["skipped"] == 0 and stats["n_exp"] == n
        assert any(not torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))


def test_non_finite_loss_skips_the_step_and_leaves_weights_and_optimizer_untouched(tiny_model):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1, momentum=0.9)
    bad = _batch()
    bad.images[0, 0, 0, 0] = float("nan")
    before = _params(tiny_model)
    stats = feedback_step(tiny_model, bad, opt, FeedbackConfig.thesis())
    assert stats["skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))
    assert len(opt.state) == 0  # no momentum buffer was created
    assert all(p.grad is None for p in tiny_model.parameters())


def test_non_finite_gradient_skips_the_step(tiny_model):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    tiny_model.model.fc.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = _params(tiny_model)
    stats = feedback_step(tiny_model, _batch(), opt, FeedbackConfig.thesis(lam=0.0))
    assert stats["skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))


def test_gradient_clipping_bounds_the_update(tiny_model):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=1.0)
    before = _params(tiny_model)
    stats = feedback_step(tiny_model, _batch(), opt, FeedbackConfig.thesis(clip_grad_norm=1e-3))
    assert stats["grad_norm"] > 1e-3  # the norm before clipping
    step = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(tiny_model.parameters(), before)))
    assert step <= 1e-3 * 1.001


def test_a_batch_without_masks_takes_no_explanation_only_step(tiny_model):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    batch = _batch()._replace(has_mask=torch.zeros(4, dtype=torch.bool))
    before = _params(tiny_model)
    stats = feedback_step(tiny_model, batch, opt, FeedbackConfig.thesis(lam=1.0))
    assert stats["empty"] == 1 and stats["n_exp"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))


def test_unmasked_samples_do_not_change_the_explanation_gradient(tiny_model):
    other = copy.deepcopy(tiny_model)
    batch = _batch(4)
    mixed = batch._replace(has_mask=torch.tensor([True, True, False, False]))
    only = batch.index(slice(0, 2))
    cfg = FeedbackConfig.thesis(lam=1.0)
    feedback_step(tiny_model, mixed, torch.optim.SGD(tiny_model.parameters(), lr=0.0), cfg)
    feedback_step(other, only, torch.optim.SGD(other.parameters(), lr=0.0), cfg)
    for a, b in zip(tiny_model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_config_validates():
    with pytest.raises(ValueError, match="explanation_loss"):
        FeedbackConfig.thesis(explanation_loss="l2")
    with pytest.raises(ValueError, match="lam"):
        FeedbackConfig.thesis(lam=-0.1)
    with pytest.raises(ValueError, match="second_order"):
        FeedbackConfig.thesis(second_order="both")


def _mean_jaccard(model, batch):
    out = model(batch.images)
    sal = cam.saliency_maps(out.logits, out.activations, batch.labels, 32, retain_graph=False)
    pred = cam.hard_threshold(sal.detach())
    m = batch.masks > 0
    return ((pred & m).sum((1, 2)) / (pred | m).sum((1, 2)).clamp_min(1)).float().mean().item()


@pytest.mark.parametrize("second_order", ["detached", "full"])
def test_explanation_only_training_raises_mean_jaccard_far_above_its_start(toy, second_order):
    torch.manual_seed(0)
    model = small_cnn(num_classes=2, width=16)
    train, test = toy(256), toy(64, seed=1)

    def fit(cfg, epochs, lr):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            perm = torch.randperm(256, generator=gen)
            for i in range(0, 256, 16):
                feedback_step(model, train.index(perm[i : i + 16]), opt, cfg)

    fit(FeedbackConfig.thesis(lam=0.0), 4, 3e-3)  # the baseline: classification only
    start = _mean_jaccard(model, test)
    fit(FeedbackConfig.thesis(lam=1.0, second_order=second_order), 15, 3e-4)
    end = _mean_jaccard(model, test)
    assert end > start + 0.2 and end > 2.5 * start, (start, end)


def test_all_classes_explanation_loss_is_the_mean_over_each_class_cam(tiny_model):
    batch = _batch(4)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.0)
    all_classes = feedback_step(
        tiny_model, batch, opt, FeedbackConfig.thesis(lam=1.0, explain_classes="all")
    )
    per_class = [
        feedback_step(
            tiny_model,
            batch._replace(labels=torch.full((4,), c)),
            opt,
            FeedbackConfig.thesis(lam=1.0),
        )["loss_exp"]
        for c in range(3)
    ]
    assert all_classes["loss_exp"] == pytest.approx(sum(per_class) / 3, rel=1e-5)
    predicted = tiny_model(batch.images).logits.argmax(1)
    by_pred = feedback_step(
        tiny_model, batch, opt, FeedbackConfig.thesis(lam=1.0, explain_classes="predicted")
    )
    by_label = feedback_step(
        tiny_model, batch._replace(labels=predicted), opt, FeedbackConfig.thesis(lam=1.0)
    )
    assert by_pred["loss_exp"] == pytest.approx(by_label["loss_exp"], rel=1e-5)


def test_sync_free_step_with_a_fused_optimizer_matches_and_skips_on_the_device(tiny_model):
    other = copy.deepcopy(tiny_model)
    batch = _batch(4)
    fused = torch.optim.SGD(tiny_model.parameters(), lr=0.1, momentum=0.9, fused=True)
    plain = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    stats = feedback_step(tiny_model, batch, fused, FeedbackConfig.thesis(), sync=False)
    assert isinstance(stats["loss"], torch.Tensor) and stats["skipped"].item() == 0
    feedback_step(other, batch, plain, FeedbackConfig.thesis())
    for a, b in zip(tiny_model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    bad = _batch(4)
    bad.images[0, 0, 0, 0] = float("nan")
    before = _params(tiny_model)
    stats = feedback_step(tiny_model, bad, fused, FeedbackConfig.thesis(), sync=False)
    assert stats["skipped"].item() == 1
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))


class _Normed(torch.nn.Module):
    """One conv, BatchNorm and ReLU, pooled into a linear head: the smallest model whose
    frozen BatchNorm statistics can go stale."""

    def __init__(self) -> None:
        super().__init__()
        from collections import OrderedDict

        nn = torch.nn
        self.features = nn.Sequential(
            OrderedDict(conv1=nn.Conv2d(3, 4, 3, padding=1), bn1=nn.BatchNorm2d(4), relu1=nn.ReLU())
        )
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def _normed_model():
    from feedbackcam.self_explaining import SelfExplaining

    torch.manual_seed(0)
    return SelfExplaining(_Normed(), "features.relu1", mean=(0.5,) * 3, std=(0.25,) * 3)


def _tensor_data(n=12, size=16, seed=0):
    from feedbackcam.data.dataset import TensorData

    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    masks[:, 4:12, 4:12] = 1
    return TensorData(
        torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8),
        masks,
        torch.arange(n) % 3,
        torch.ones(n, dtype=torch.bool),
    )


def _conv_statistics(model, images):
    """Mean and unbiased variance, per channel, of the first conv's output over ``images``."""
    with torch.no_grad():
        out = model.model.features.conv1(model.normalize(images))
    flat = out.transpose(0, 1).flatten(1)
    return flat.mean(1), flat.var(1)


def test_recalibrating_batchnorm_sets_the_statistics_of_the_data_and_keeps_the_modes():
    from feedbackcam.self_explaining import set_batchnorm_eval
    from feedbackcam.train import image_batches, recalibrate_batchnorm

    model, data = _normed_model(), _tensor_data()
    bn = model.model.features.bn1
    model.train()
    set_batchnorm_eval(model)  # as a feedback step leaves it
    mean, var = _conv_statistics(model, data.batch(torch.arange(len(data))).images)
    assert not torch.allclose(bn.running_mean, mean, atol=1e-3)
    assert recalibrate_batchnorm(model, image_batches(data, np.arange(len(data)), len(data)))
    torch.testing.assert_close(bn.running_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, var, atol=1e-5, rtol=1e-4)
    assert model.training and not bn.training and bn.momentum == 0.1
    # in two equal batches the mean is the same (the variance is the batches' average)
    recalibrate_batchnorm(model, image_batches(data, np.arange(len(data)), len(data) // 2))
    torch.testing.assert_close(bn.running_mean, mean, atol=1e-5, rtol=1e-5)


def test_a_model_without_batchnorm_is_left_as_it_is(tiny_model):
    from feedbackcam.train import image_batches, recalibrate_batchnorm

    before = copy.deepcopy(tiny_model.state_dict())
    assert not recalibrate_batchnorm(tiny_model, image_batches(_tensor_data(), np.arange(12), 4))
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("recalibrate", [False, True])
def test_training_epochs_recalibrate_frozen_batchnorm_only_when_asked(recalibrate):
    """With frozen BatchNorm the steps never touch its statistics; with
    ``recalibrate_batchnorm`` each epoch ends with those of the data under the moved weights."""
    from feedbackcam.train import Batching, make_optimizer, train_epochs

    model, data = _normed_model(), _tensor_data()
    bn = model.model.features.bn1
    start = bn.running_mean.clone()
    cfg = FeedbackConfig(lam=0.0, recalibrate_batchnorm=recalibrate)
    seen = []
    train_epochs(
        model,
        data,
        np.arange(len(data)),
        make_optimizer(model, "adam", 1e-2),
        cfg,
        Batching(batch_size=len(data)),
        epochs=2,
        generator=torch.Generator().manual_seed(0),
        after_epoch=lambda epoch, stats: seen.append(bn.running_mean.clone()),
    )
    mean, _ = _conv_statistics(model, data.batch(torch.arange(len(data))).images)
    if recalibrate:  # scored after each epoch with its own statistics
        torch.testing.assert_close(seen[-1], mean, atol=1e-5, rtol=1e-5)
        assert not torch.equal(seen[0], start)
    else:
        assert all(torch.equal(s, start) for s in seen)
        assert not torch.allclose(start, mean, atol=1e-3)


def test_an_app_update_recalibrates_batchnorm_on_its_own_batches():
    """The app's update steps with BatchNorm frozen, then re-estimates its statistics on the
    update's first batches (the images it learned from), and says so."""
    from dataclasses import replace

    from feedbackcam.data.synth import SynthConfig, as_array_dataset, make_synthderm
    from feedbackcam.service.update import UpdateConfig, fine_tune, plan_replay, update_batches

    ds = as_array_dataset(make_synthderm(SynthConfig(n=12, size=32, seed=0)))
    cfg = UpdateConfig(
        steps=2, batch_size=4, replay_per_class=0, lr=1e-2, feedback=FeedbackConfig(lam=0.3),
        tolerance=0,
    )  # fmt: skip
    plan = plan_replay(ds.labels, cfg.steps, 0, np.random.default_rng(0))
    model = _normed_model()
    bn = model.model.features.bn1
    assert fine_tune(model, ds, None, plan, cfg)["batchnorm_recalibrated"]
    images = torch.cat([b.images for b in update_batches(ds, None, plan, cfg)])
    mean, _ = _conv_statistics(model, images)
    torch.testing.assert_close(bn.running_mean, mean, atol=1e-5, rtol=1e-5)
    frozen = replace(cfg, feedback=FeedbackConfig(lam=0.3, recalibrate_batchnorm=False))
    model = _normed_model()
    start = model.model.features.bn1.running_mean.clone()
    assert not fine_tune(model, ds, None, plan, frozen)["batchnorm_recalibrated"]
    assert torch.equal(model.model.features.bn1.running_mean, start)
