"""The self-explaining wrapper: any CNN whose forward pass also returns the activations of its
explanation layer(s), inside the autograd graph, so that a Grad-CAM computed from them can sit in
a loss (thesis section 4.1: the "activation map" output of SkinCare VGG16).

Every model of the project is one of these (:mod:`feedbackcam.models` builds them by name,
:mod:`feedbackcam.pretrained` loads weights into them); this module depends on neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Explained(NamedTuple):
    """Output of a :class:`SelfExplaining` model.

    Attributes:
        logits: (N, C) class scores, before softmax.
        activations: one (N, K, h, w) tensor per explanation layer, in the order asked for.
    """

    logits: Tensor
    activations: tuple[Tensor, ...]


class SelfExplaining(nn.Module):
    """Wrap any CNN so that its forward pass also returns explanation-layer activations.

    The activations are captured with forward hooks registered for the duration of one call and
    removed in a ``finally`` block, so nothing outlives the call: no handle, no tensor, no graph.
    In-place activations (``nn.ReLU(inplace=True)``) are switched off, because an in-place op
    after the hooked layer would overwrite the tensor that the CAM differentiates through.

    Args:
        model: a classifier mapping (N, 3, H, W) images to (N, C) logits (torchvision, timm, ...).
        layers: module path(s) of the explanation layer(s) as in ``model.named_modules()``,
            e.g. ``"features.29"`` (VGG16 block5_conv3 after ReLU) or ``"layer4"`` (ResNet).
        mean, std: input normalisation the model expects, stored so a checkpoint describes itself.

    Example:
        >>> import torchvision
        >>> net = SelfExplaining(torchvision.models.resnet18(num_classes=3), "layer4")
        >>> out = net(torch.rand(2, 3, 64, 64))
        >>> out.logits.shape, out.activations[0].shape
        (torch.Size([2, 3]), torch.Size([2, 512, 2, 2]))
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str],
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if isinstance(layers, str):
            layers = (layers,)
        layers = tuple(layers)
        if not layers:
            raise ValueError("layers: expected at least one module path, got none")
        modules = dict(model.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(
                f"explanation layer(s) {missing} not found in {type(model).__name__}; "
                f"some valid paths: {[n for n in list(modules)[-8:] if n]}"
            )
        for module in model.modules():
            if hasattr(module, "inplace") and isinstance(module.inplace, bool):
                module.inplace = False
        self.model = model
        self.layers = layers
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, images: Tensor) -> Tensor:
        """Map images in [0, 1] to the model's input normalisation."""
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: Tensor) -> Explained:
        """Classify ``images`` (N, 3, H, W) in [0, 1]; return logits and activations."""
        captured: dict[str, Tensor] = {}
        modules = dict(self.model.named_modules())
        handles = []
        try:
            for name in self.layers:

                def hook(_module, _inputs, output, name=name):
                    captured[name] = output

                handles.append(modules[name].register_forward_hook(hook))
            logits = self.model(self.normalize(images))
        finally:
            for handle in handles:
                handle.remove()
        return Explained(logits, tuple(captured[name] for name in self.layers))


def set_batchnorm_eval(model: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode (running statistics); return how many.

    In train mode BatchNorm normalises with the batch's statistics, so one sample's activations,
    and hence its CAM, depend on the other samples in the batch. Feedback fine-tuning freezes
    the statistics so that a batched CAM equals the per-sample CAM and batch size 1 is stable.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            count += 1
    return count


def layer_activations(
    model: SelfExplaining, images, layer: str | None = None, batch_size: int = 64
) -> Tensor:
    """(N, K, h, w) float32 activations of ``layer`` (a module path in ``model.model``; default
    the model's first explanation layer) on the CPU, for ``images``: uint8 (N, H, W, 3) arrays
    or float (N, 3, H, W) tensors in [0, 1]. Eval mode for the pass, no grad."""
    probe = model
    if layer is not None and layer != model.layers[0]:
        probe = SelfExplaining(
            model.model,
            (layer,),
            mean=model.mean.flatten().tolist(),
            std=model.std.flatten().tolist(),
        )
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                part = images[start : start + batch_size]
                if not isinstance(part, Tensor):
                    part = torch.from_numpy(np.ascontiguousarray(part)).permute(0, 3, 1, 2)
                    part = part.float() / 255
                out.append(probe(part.to(device)).activations[0].float().cpu())
    finally:
        model.train(was)
    return torch.cat(out)
