"""Predict and explain: class probabilities and input-sized saliency maps, for inference."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import cam as cams
from .models import SelfExplaining


class Explanation(NamedTuple):
    """probs (N, C); targets (N,) the explained class; saliency (N, H, W) in [0, 1]."""

    probs: Tensor
    targets: Tensor
    saliency: Tensor


def explain(
    model: SelfExplaining,
    images: Tensor,
    targets: Tensor | int | None = None,
    *,
    method: cams.CamMethod = "gradcam",
) -> Explanation:
    """Classify ``images`` (N, 3, H, W) in [0, 1] and explain one class per image.

    The explained class is the prediction unless ``targets`` names one (thesis section 4.2).
    Runs in eval mode with gradients enabled only as far as the CAM needs them; returns detached
    tensors and restores the model's train/eval mode.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # an input that requires grad keeps the graph alive even for a frozen model
            x = images.detach().requires_grad_(True)
            out = model(x)
            resolved = cams.target_classes(out.logits, targets)
            saliency = cams.saliency_maps(
                out.logits,
                out.activations,
                resolved,
                images.shape[-2:],
                method=method,
                second_order="detached",
                retain_graph=False,
            )
        probs = torch.softmax(out.logits.detach().float(), dim=1)
        return Explanation(probs, resolved, saliency.detach())
    finally:
        model.train(was_training)
