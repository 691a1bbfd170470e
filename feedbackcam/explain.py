"""Predict and explain: class probabilities and input-sized saliency maps, for inference."""

from __future__ import annotations

from pathlib import Path
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


def explain_file(
    image_path: str | Path,
    checkpoint: str | Path,
    out: str | Path,
    *,
    method: cams.CamMethod = "gradcam",
) -> dict:
    """Predict and explain one image file with a checkpoint; write an overlay PNG to ``out``.

    The image is resized to the model's input size the way its data was prepared (nearest
    neighbour). Returns the predicted class and all probabilities.
    """
    import numpy as np

    from .checkpoint import load_checkpoint
    from .imageio import read_rgb
    from .report import overlay_png

    model, spec, _ = load_checkpoint(checkpoint)
    rgb = read_rgb(image_path, size=spec.input_size)
    images = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float() / 255
    ex = explain(model, images, method=method)
    probs = {c: float(p) for c, p in zip(spec.classes, ex.probs[0].tolist())}
    predicted = spec.classes[int(ex.targets[0])]
    overlay_png(
        rgb, ex.saliency[0].numpy(), Path(out), title=f"{predicted} ({probs[predicted]:.2f})"
    )
    return {"predicted": predicted, "probabilities": probs}
