import copy
import gc
import urllib.error
import weakref

import pytest
import timm
import torch
import torchvision

from feedbackcam.cam import grad_cam
from feedbackcam.models import (
    VGG16_EXPLANATION_LAYER,
    SelfExplaining,
    build_model,
    skincare_vgg16,
    small_cnn,
)


def test_skincare_vgg16_has_the_thesis_parameter_count_and_explanation_layer():
    model = skincare_vgg16()
    assert sum(p.numel() for p in model.parameters()) == 70_309_704
    assert model.layers == (VGG16_EXPLANATION_LAYER,)
    # block5_conv3 is the conv just before the explanation layer (its ReLU)
    modules = dict(model.model.named_modules())
    assert isinstance(modules["features.28"], torch.nn.Conv2d)
    assert modules["features.28"].out_channels == 512
    with torch.no_grad():
        out = model(torch.rand(1, 3, 227, 227))
    assert out.logits.shape == (1, 8)
    assert out.activations[0].shape == (1, 512, 14, 14)
    assert (out.activations[0] >= 0).all()  # after the ReLU


def test_imagenet_weights_offline_fail_with_a_message_naming_the_local_alternative(monkeypatch):
    from torchvision.models import VGG16_Weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(VGG16_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="local path") as err:
        skincare_vgg16(weights="imagenet")
    assert "vgg16" in str(err.value)


def test_weights_from_a_local_torchvision_vgg16_file(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save({k: v for k, v in source.state_dict().items() if k.startswith("features.")}, path)
    model = skincare_vgg16(weights=path)
    theirs_all = source.features.state_dict().values()
    for (name, ours), theirs in zip(model.model.features.state_dict().items(), theirs_all):
        assert torch.equal(ours, theirs), name


def test_weights_from_a_skincare_state_dict_load_the_head_too(tmp_path):
    torch.manual_seed(2)
    trained = skincare_vgg16(num_classes=3)
    path = tmp_path / "skincare.pth"
    torch.save(trained.model.state_dict(), path)
    loaded = skincare_vgg16(num_classes=3, weights=path)
    assert torch.equal(loaded.model.classifier[-1].weight, trained.model.classifier[-1].weight)


def test_bad_weight_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        skincare_vgg16(weights=tmp_path / "nowhere.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        skincare_vgg16(weights=junk)


@pytest.mark.parametrize(
    ("make", "layer", "channels"),
    [
        (lambda: torchvision.models.resnet18(num_classes=3), "layer4", 512),
        (lambda: timm.create_model("resnet10t", pretrained=False, num_classes=3), "layer4", 512),
        (lambda: torchvision.models.mobilenet_v3_small(num_classes=3), "features.12", 576),
    ],
)
def test_wrapper_returns_logits_and_activations_in_the_graph(make, layer, channels):
    model = SelfExplaining(make(), layer).eval()
    out = model(torch.rand(2, 3, 64, 64))
    assert out.logits.shape == (2, 3)
    (acts,) = out.activations
    assert acts.shape[:2] == (2, channels)
    assert acts.requires_grad and acts.grad_fn is not None
    cam = grad_cam(out.logits, acts, torch.tensor([0, 1]))
    cam.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_unknown_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="layer5"):
        SelfExplaining(torchvision.models.resnet18(), "layer5")


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_are_released_after_each_call_even_when_the_forward_fails():
    model = small_cnn()
    model(torch.rand(1, 3, 32, 32))
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError):
        model(torch.rand(1, 5, 32, 32))  # wrong channel count fails inside the forward
    assert _hook_count(model) == 0


def test_repeated_calls_keep_nothing_alive():
    model = small_cnn()
    refs = []
    for _ in range(20):
        out = model(torch.rand(4, 3, 32, 32))
        cam = grad_cam(out.logits, out.activations[0], second_order="full")
        cam.sum().backward()
        refs.append(weakref.ref(out.activations[0]))
        del out, cam
    gc.collect()
    assert all(r() is None for r in refs), "activations (and their graphs) outlived the call"
    assert _hook_count(model) == 0


def test_inplace_activations_are_switched_off():
    model = SelfExplaining(torchvision.models.vgg16(weights=None), "features.29")
    assert not any(getattr(m, "inplace", False) for m in model.modules())


@pytest.mark.parametrize("arch", ["small_cnn", "decoy_cnn"])
def test_models_are_built_channels_last_and_give_the_same_values(arch, tmp_path):
    """Channels-last weights (oneDNN's fast layout) change nothing but the speed: the logits,
    the explanation and the gradients equal those of the same weights in the default layout,
    and a checkpoint loads back into the same layout."""
    from feedbackcam.checkpoint import ModelSpec, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = build_model(arch, 3)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)  # the layout really changed
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    size = 28 if arch == "decoy_cnn" else 32
    x = torch.rand(4, 3, size, size)
    a, b = model(x), plain(x)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.activations[0], b.activations[0], rtol=1e-4, atol=1e-5)
    a.logits.sum().backward()
    b.logits.sum().backward()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    spec = ModelSpec(arch, ("a", "b", "c"), tuple(model.layers), size)
    save_checkpoint(tmp_path / "m.pt", model, spec)
    loaded, _, _ = load_checkpoint(tmp_path / "m.pt")
    w = next(m.weight for m in loaded.modules() if isinstance(m, torch.nn.Conv2d))
    assert w.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(loaded(x).logits, a.logits)
