import numpy as np
import pytest
import torch
import torchvision

from feedbackcam import cam
from feedbackcam.models import SelfExplaining, set_batchnorm_eval, small_cnn


def _resnet(seed=0):
    torch.manual_seed(seed)
    return SelfExplaining(torchvision.models.resnet18(num_classes=4), "layer4")


def test_grad_cam_is_relu_of_gradient_weighted_activations(tiny_model):
    x = torch.rand(3, 3, 32, 32)
    targets = torch.tensor([0, 2, 1])
    out = tiny_model(x)
    got = cam.grad_cam(out.logits, out.activations[0], targets)
    # eq. 3.1/3.2 by hand, one sample at a time
    for i in range(3):
        o = tiny_model(x[i : i + 1])
        (g,) = torch.autograd.grad(o.logits[0, targets[i]], o.activations[0])
        w = g[0].mean(dim=(1, 2))
        expected = torch.relu((w[:, None, None] * o.activations[0][0]).sum(0))
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-6)


def test_default_target_is_the_predicted_class(tiny_model):
    out = tiny_model(torch.rand(4, 3, 32, 32))
    pred = out.logits.argmax(1)
    torch.testing.assert_close(
        cam.grad_cam(out.logits, out.activations[0]),
        cam.grad_cam(out.logits, out.activations[0], pred),
    )
    with pytest.raises(ValueError, match="class indices"):
        cam.grad_cam(out.logits, out.activations[0], torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("method", cam.METHODS)
@pytest.mark.parametrize("make", [lambda: small_cnn(3, width=8), _resnet])
def test_batched_cam_equals_per_sample_cam(method, make):
    torch.manual_seed(0)
    model = make()
    model.train()
    set_batchnorm_eval(model)  # what feedback fine-tuning does; dropout has no effect on A here
    x = torch.rand(5, 3, 48, 48)
    targets = torch.tensor([0, 1, 2, 0, 1])
    out = model(x)
    batched = cam.saliency_maps(out.logits, out.activations, targets, 48, method=method)
    for i in range(5):
        o = model(x[i : i + 1])
        single = cam.saliency_maps(o.logits, o.activations, targets[i : i + 1], 48, method=method)
        torch.testing.assert_close(batched[i], single[0], rtol=1e-4, atol=1e-5)


def test_batchnorm_in_train_mode_couples_samples_which_is_why_we_freeze_it():
    model = _resnet()
    model.train()
    x = torch.rand(4, 3, 48, 48)
    out = model(x)
    batched = cam.grad_cam(out.logits, out.activations[0], 0)
    o = model(torch.cat([x[:1], torch.rand(3, 3, 48, 48)]))
    other_batch = cam.grad_cam(o.logits, o.activations[0], 0)
    assert not torch.allclose(batched[0], other_batch[0], atol=1e-4)


def test_full_second_order_trains_the_head_through_the_weights_and_detached_does_not(tiny_model):
    x = torch.rand(2, 3, 32, 32)
    fc = tiny_model.model.fc.weight
    conv1 = tiny_model.model.features.conv1.weight
    grads = {}
    for mode in cam.SECOND_ORDER:
        out = tiny_model(x)
        c = cam.grad_cam(out.logits, out.activations[0], torch.tensor([0, 1]), second_order=mode)
        g_fc, g_conv = torch.autograd.grad(c.sum(), (fc, conv1), allow_unused=True)
        grads[mode] = (g_fc, g_conv)
    # the CAM depends on the head only through the Grad-CAM weights (GAP head)
    assert grads["full"][0] is not None and grads["full"][0].abs().sum() > 0
    assert grads["detached"][0] is None or grads["detached"][0].abs().sum() == 0
    for mode in cam.SECOND_ORDER:  # both reach the first conv layer through A
        assert grads[mode][1].abs().sum() > 0


def test_scaling_an_all_zero_map_gives_zeros_and_finite_gradients():
    raw = torch.zeros(2, 4, 4, requires_grad=True)
    scaled = cam.scale_by_max(raw)
    assert torch.equal(scaled, torch.zeros(2, 4, 4))
    scaled.sum().backward()
    assert torch.isfinite(raw.grad).all()
    assert not cam.hard_threshold(scaled).any()


def test_scale_upsample_and_thresholds():
    raw = torch.tensor([[[0.0, 1.0], [3.0, 4.0]]])
    s = cam.scale_by_max(raw)
    assert s.max() == 1 and s.min() == 0
    up = cam.upsample(s, (8, 6))
    assert up.shape == (1, 8, 6) and up.min() >= 0 and up.max() <= 1
    hard = cam.hard_threshold(s, 0.5)
    assert hard.tolist() == [[[False, False], [True, True]]]
    soft_cold = cam.soft_threshold(s, 0.5, temperature=1e-3)
    assert torch.allclose(soft_cold, hard.float(), atol=1e-3)
    soft = cam.soft_threshold(s, 0.5, temperature=0.1)
    assert ((soft > 0) & (soft < 1)).all()
    with pytest.raises(ValueError, match="threshold"):
        cam.hard_threshold(s, 50)
    with pytest.raises(ValueError, match="temperature"):
        cam.soft_threshold(s, 0.5, temperature=0)


def test_fused_multi_layer_cam_combines_layers_and_stays_differentiable():
    torch.manual_seed(0)
    model = SelfExplaining(small_cnn(3, width=8).model, ["features.relu3", "features.relu4"])
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    fused = cam.fused_cam(out.logits, out.activations, torch.tensor([0, 1]), 32)
    assert fused.shape == (2, 32, 32)
    assert torch.allclose(fused.amax(dim=(1, 2)), torch.ones(2))
    deep = cam.saliency_maps(out.logits, out.activations[1:], torch.tensor([0, 1]), 32)
    assert not torch.allclose(fused, deep)
    fused.sum().backward()
    assert model.model.features.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=">= 2 layers"):
        cam.fused_cam(out.logits, out.activations[:1], None, 32)


def test_cam_under_no_grad_is_a_clear_error(tiny_model):
    with torch.no_grad():
        out = tiny_model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no_grad"):
        cam.grad_cam(out.logits, out.activations[0])


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_agrees_with_the_pytorch_grad_cam_package(method):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5).eval()
    ours = SelfExplaining(net, "layer4", mean=(0, 0, 0), std=(1, 1, 1))
    x = torch.rand(3, 3, 96, 96)
    classes = [0, 3, 4]
    out = ours(x)
    mine = cam.saliency_maps(out.logits, out.activations, torch.tensor(classes), 96, method=method)
    oracle_cls = GradCAM if method == "gradcam" else GradCAMPlusPlus
    with oracle_cls(model=net, target_layers=[net.layer4]) as oracle:
        theirs = oracle(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    for i in range(3):
        r = np.corrcoef(mine[i].detach().numpy().ravel(), theirs[i].ravel())[0, 1]
        assert r >= 0.99, f"image {i}: Pearson r = {r:.4f}"
