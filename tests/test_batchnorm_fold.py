"""BatchNorm folded into the convolution before it (feedbackcam.batchnorm_fold): the same outputs,
losses and gradients as the unfolded network, the model's modules back in place afterwards, and
nothing folded where folding would change what a caller sees. Speed is measured in
docs/benchmarks.md (the app's update), never here."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from feedbackcam import batchnorm_fold, evaluate, train
from feedbackcam.batchnorm_fold import FoldedConv, folded_batchnorm, folded_weights
from feedbackcam.data.dataset import FeedbackBatch
from feedbackcam.models import build_model
from feedbackcam.objective import FeedbackConfig, feedback_loss
from feedbackcam.self_explaining import SelfExplaining, set_batchnorm_eval


@pytest.fixture(autouse=True)
def _fold_small_inputs(monkeypatch, request):
    """The tests' images are small: fold every foldable pair whatever the work it saves (the
    thresholds are tested on their own, with the library's values)."""
    if "thresholds" not in request.node.name:
        monkeypatch.setattr(batchnorm_fold, "MIN_ACTIVATIONS", 0)
        monkeypatch.setattr(batchnorm_fold, "ACTIVATIONS_PER_WEIGHT", 0)


def _moved_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters (a fresh BatchNorm folds to 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def _lite0() -> SelfExplaining:
    torch.manual_seed(0)
    return _moved_statistics(build_model("efficientnet_lite0", 3))  # explanation layer: bn2


def _resnet() -> SelfExplaining:
    torch.manual_seed(0)
    return _moved_statistics(build_model("torchvision:resnet18", 3, layers="layer4"))


def _batch(n=6, size=64, seed=0) -> FeedbackBatch:
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(n, size, size)
    keep[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    ignore = torch.zeros(n, size, size)
    ignore[:, :10, :10] = 1
    return FeedbackBatch(
        torch.rand(n, 3, size, size, generator=g),
        torch.arange(n) % 3,
        keep,
        torch.arange(n) % 2 == 0,
        ignore,
        torch.arange(n) % 3 == 0,
    )


def test_folded_weights_are_the_convolution_then_the_batchnorm():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, padding=1, bias=True)
    norm = _moved_statistics(nn.BatchNorm2d(5)).eval()
    x = torch.rand(2, 4, 8, 8)
    w, b = folded_weights(
        conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
        norm.weight, norm.bias,
    )  # fmt: skip
    torch.testing.assert_close(nn.functional.conv2d(x, w, b, padding=1), norm(conv(x)))


@pytest.mark.parametrize("make", [_lite0, _resnet], ids=["lite0", "resnet18"])
def test_outputs_are_the_unfolded_models_and_the_modules_come_back(make):
    model = make().eval()
    x = torch.rand(3, 3, 64, 64)
    names = [n for n, _ in model.named_modules()]
    keys = list(model.state_dict())
    with torch.no_grad():
        plain = model(x)
        with folded_batchnorm(model, x) as n:
            folded = model(x)
            inside = {type(m) for m in model.modules()}
    assert n > 10  # Lite0: every pair but its explanation layer's; ResNet: each conv's BN
    assert FoldedConv in inside
    torch.testing.assert_close(folded.logits, plain.logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(folded.activations, plain.activations, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert [n for n, _ in model.named_modules()] == names
    assert list(model.state_dict()) == keys


def test_the_explanation_layer_is_never_folded_away():
    """Lite0 explains at ``bn2``, the BatchNorm after its head convolution: folding that pair
    would leave the hook on a module that no longer runs."""
    model = _lite0()
    with folded_batchnorm(model, torch.rand(1, 3, 64, 64)):
        assert isinstance(model.model.bn2, nn.BatchNorm2d)
        assert not isinstance(model.model.conv_head, FoldedConv)
        assert isinstance(model.model.conv_stem, FoldedConv)
        out = model(torch.rand(2, 3, 64, 64))
    assert out.activations[0].shape[1] == model.model.bn2.num_features


def test_modules_come_back_after_an_error():
    model = _resnet()
    before = dict(model.named_modules())
    x = torch.rand(1, 3, 64, 64)
    with pytest.raises(RuntimeError, match="boom"), folded_batchnorm(model, x):
        raise RuntimeError("boom")
    after = dict(model.named_modules())
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


class _Shared(nn.Module):
    """A convolution whose output feeds its BatchNorm and, unnormalised, the logits too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        c = self.conv(x)
        h = self.head(torch.relu(self.bn(c)) + c)
        return self.fc(h.mean((2, 3)))


def test_nothing_is_folded_where_a_convolutions_output_is_also_used_elsewhere():
    model = SelfExplaining(_moved_statistics(_Shared()), "head").eval()
    x = torch.rand(2, 3, 16, 16)
    plain = model(x).logits
    with folded_batchnorm(model, x) as n:
        assert n == 0
        assert isinstance(model.model.bn, nn.BatchNorm2d)
        torch.testing.assert_close(model(x).logits, plain)


def test_a_convolution_that_transforms_its_weight_is_not_folded():
    """timm's StdConv2d standardises its weight in every forward, which would undo a scaled
    kernel: its pair stays as it is, the plain pair after it is folded."""
    from timm.layers import StdConv2d

    torch.manual_seed(0)
    net = nn.Sequential(
        StdConv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    model = SelfExplaining(_moved_statistics(net), "6").eval()
    x = torch.rand(2, 3, 16, 16)
    plain = model(x).logits
    with folded_batchnorm(model, x) as n:
        assert n == 1
        assert isinstance(model.model[1], nn.BatchNorm2d)
        assert isinstance(model.model[3], FoldedConv)
        torch.testing.assert_close(model(x).logits, plain, rtol=1e-4, atol=1e-5)


def test_a_module_with_a_hook_of_its_own_is_not_folded():
    model = _resnet()
    seen = []
    handle = model.model.bn1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        with folded_batchnorm(model, torch.rand(1, 3, 64, 64)):
            assert isinstance(model.model.bn1, nn.BatchNorm2d)
            model(torch.rand(2, 3, 64, 64))
    finally:
        handle.remove()
    assert seen[-1][0] == 2


def test_anything_but_a_self_explaining_model_on_a_cpu_is_left_alone():
    net = _moved_statistics(_Shared())
    with folded_batchnorm(net, torch.rand(1, 3, 16, 16)) as n:
        assert n == 0
    model = _resnet()
    with folded_batchnorm(model, torch.empty(1, 3, 64, 64, device="meta")) as n:
        assert n == 0  # not traced: a meta input would have failed on the CPU model
        assert isinstance(model.model.bn1, nn.BatchNorm2d)


def _gradients(model, batch, cfg, fold: bool) -> tuple[float, dict]:
    model.train()
    set_batchnorm_eval(model)
    with folded_batchnorm(model, batch.images) if fold else contextlib.nullcontext(0) as n:
        assert (n > 0) == fold
        torch.manual_seed(3)
        loss = feedback_loss(model, batch, cfg)[0]
        loss.backward()
    return float(loss.detach()), {k: p.grad for k, p in model.named_parameters()}


def test_feedback_loss_and_gradients_are_the_unfolded_ones():
    """The default objective (Jaccard and surroundings on keep masks: a Grad-CAM differentiated
    through the folded convolutions, and the invariance term's counterfactual rows) with
    frozen statistics: the same loss and parameter gradients, to float rounding."""
    model = _resnet()
    batch, cfg = _batch(), FeedbackConfig()
    l0, g0 = _gradients(copy.deepcopy(model), batch, cfg, fold=False)
    l1, g1 = _gradients(model, batch, cfg, fold=True)
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert g0.keys() == g1.keys()
    for k in g0:
        scale = float(g0[k].abs().max()) + 1e-8
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-4 * scale, msg=k)


def test_lite0s_gradient_is_the_unfolded_one_to_float_rounding():
    """In float64 the folded and unfolded gradients agree to 1e-12 (the fold is exact); in
    float32 the fold's gamma gradient is a difference of two sums (the scaled kernel's and the
    shifted mean's), so its rounding error is larger than the unfolded network's: 0.1-0.5 %
    against 0.03-0.3 % of a float64 reference for ImageNet Lite0 on dermoscopy images
    (docs/benchmarks.md); bounded here on the whole gradient."""
    model = _lite0()
    batch, cfg = _batch(), FeedbackConfig()
    wide = batch._replace(images=batch.images.double())
    _, g64 = _gradients(copy.deepcopy(model).double(), wide, cfg, fold=False)
    _, f64 = _gradients(copy.deepcopy(model).double(), wide, cfg, fold=True)
    for k in g64:
        torch.testing.assert_close(f64[k], g64[k], rtol=1e-9, atol=1e-12, msg=k)
    _, g32 = _gradients(model, batch, cfg, fold=True)
    flat = torch.cat([g64[k].flatten() for k in g64])
    err = torch.cat([(g32[k].double() - g64[k]).flatten() for k in g64])
    assert float(err.norm() / flat.norm()) < 0.01


def test_batchnorm_in_train_mode_runs_unfolded():
    """Batch statistics (a baseline's training, or recalibrate_batchnorm) are not foldable:
    inside the context they are used and updated as without it."""
    model = _resnet()
    twin = copy.deepcopy(model)
    x = torch.rand(4, 3, 64, 64)
    with folded_batchnorm(twin, x):
        twin.train()
        out_folded = twin(x).logits
    model.train()
    out = model(x).logits
    torch.testing.assert_close(out_folded, out)
    torch.testing.assert_close(twin.model.bn1.running_mean, model.model.bn1.running_mean)


def _unfolded(monkeypatch):
    """Turn the fold off where the library uses it (to compare with it on)."""

    def off(model, example):
        return contextlib.nullcontext(0)

    for module in (train, evaluate):
        monkeypatch.setattr(module, "folded_batchnorm", off)


def test_run_steps_folds_and_moves_the_weights_as_unfolded(monkeypatch):
    """Optimizer steps with frozen statistics: the same weights after them, folded or not, and the
    fold was used (the batchnorm layers' own forward never ran)."""
    cfg = FeedbackConfig()
    batches = [_batch(seed=s) for s in range(3)]
    results, norm_calls = [], []
    for fold in (True, False):
        model = _resnet()
        calls = []  # counted by patching forward: a hook would stop the fold
        original = nn.BatchNorm2d.forward

        def counting(self, x, original=original, calls=calls):
            calls.append(1)
            return original(self, x)

        monkeypatch.setattr(nn.BatchNorm2d, "forward", counting)
        if not fold:
            _unfolded(monkeypatch)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        start = model.model.layer1[0].conv1.weight.detach().clone()
        torch.manual_seed(5)
        stats = train.run_steps(model, iter(batches), opt, cfg)
        assert stats["skipped_steps"] == 0
        assert not torch.equal(model.model.layer1[0].conv1.weight, start)  # it learned
        monkeypatch.undo()
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        norm_calls.append(len(calls))
    folded, plain = results
    assert folded.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(folded[k].float(), plain[k].float(), rtol=1e-4, atol=1e-5)
    assert norm_calls[0] < norm_calls[1] / 3  # only the trace and its check ran them


def test_a_validation_pass_is_the_unfolded_one(monkeypatch):
    model = _lite0()
    images = (torch.rand(evaluate.FOLD_FROM, 64, 64, 3) * 255).to(torch.uint8).numpy()
    folded = evaluate.predict_features(model, images, batch_size=16, pooled=True)
    _unfolded(monkeypatch)
    plain = evaluate.predict_features(model, images, batch_size=16, pooled=True)
    torch.testing.assert_close(folded[0], plain[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded[1], plain[1], rtol=1e-4, atol=1e-4)


def test_an_evaluation_is_the_unfolded_one(monkeypatch):
    """Grad-CAM maps and probabilities of a set of FOLD_FROM images: the same, folded or not."""
    from feedbackcam.data.dataset import ArrayDataset

    model = _lite0()
    n = evaluate.FOLD_FROM
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(n, 64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    masks = torch.zeros(n, 64, 64)
    masks[:, 16:48, 16:48] = 1
    labels = (torch.arange(n) % 3).numpy()
    ids = tuple(f"i{i}" for i in range(n))
    data = ArrayDataset(images, masks.numpy(), labels, labels >= 0, ids, ("a", "b", "c"))
    calls = []
    real = evaluate.folded_batchnorm

    def spy(model, example):
        calls.append(1)
        return real(model, example)

    monkeypatch.setattr(evaluate, "folded_batchnorm", spy)
    folded = evaluate.evaluate(model, data, batch_size=16, keep_saliency=True)
    assert calls
    _unfolded(monkeypatch)
    plain = evaluate.evaluate(model, data, batch_size=16, keep_saliency=True)
    assert abs(folded.probs - plain.probs).max() < 1e-4
    assert abs(folded.saliency.astype(int) - plain.saliency.astype(int)).max() <= 1


def test_the_fold_finds_lite0s_pairs():
    """Every convolution of EfficientNet-Lite0 is followed by a BatchNorm: all but the
    explanation layer's are folded."""
    model = _lite0()
    pairs = batchnorm_fold.foldable_pairs(
        model, torch.rand(1, 3, 64, 64), keep=("model." + model.layers[0],)
    )
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(pairs) == len(convs) - 1


def test_the_thresholds_fold_where_activations_outweigh_kernels():
    """Folding scales a kernel in every forward: a pair is folded only where the batch's
    activations are at least ACTIVATIONS_PER_WEIGHT times its kernel (and MIN_ACTIVATIONS):
    Lite0 at 224 px on the app's 13 images folds its stem, not its last projection (320 x 1152
    weights for 7 x 7 x 320 activations an image); one small image folds nothing."""
    model = build_model("efficientnet_lite0", 3)
    keep = ("model." + model.layers[0],)
    image = torch.rand(1, 3, 224, 224)
    pairs = batchnorm_fold.foldable_pairs(model, image, keep=keep, rows=13)
    assert ("model.conv_stem", "model.bn1") in pairs
    assert ("model.blocks.6.0.conv_pwl", "model.blocks.6.0.bn3") not in pairs
    more = batchnorm_fold.foldable_pairs(model, image, keep=keep, rows=32)
    assert set(pairs) < set(more)
    small = batchnorm_fold.foldable_pairs(model, torch.rand(1, 3, 32, 32), keep=keep)
    assert small == []
