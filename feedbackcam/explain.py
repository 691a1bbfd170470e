"""Predict and explain: class probabilities and input-sized saliency maps, for inference."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from . import cam as cams
from .self_explaining import SelfExplaining


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
    return explain_with_features(model, images, targets, method=method)[0]


def pooled_activations(activations) -> Tensor:
    """(N, K) the explanation layer's activations averaged over space, in float32."""
    return activations[0].float().mean(dim=(2, 3))


def explain_with_features(
    model: SelfExplaining,
    images: Tensor,
    targets: Tensor | int | None = None,
    *,
    method: cams.CamMethod = "gradcam",
) -> tuple[Explanation, Tensor, Tensor]:
    """:func:`explain`, and from the same forward pass the logits (N, C) and the explanation
    layer's pooled activations (N, K), detached: what an unfamiliar-input check reads, without
    a second forward."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # an input that requires grad keeps the graph alive even for a frozen model
            x = images.detach().requires_grad_(True)
            out = model(x)
            resolved = cams.target_classes(out.logits, targets)
            pooled = pooled_activations(out.activations).detach()
            saliency = cams.saliency_maps(
                out.logits,
                out.activations,
                resolved,
                images.shape[-2:],
                method=method,
                second_order="detached",
                retain_graph=False,
            )
        logits = out.logits.detach().float()
        probs = torch.softmax(logits, dim=1)
        return Explanation(probs, resolved, saliency.detach()), logits, pooled
    finally:
        model.train(was_training)


FITS = ("squash", "pad")
_DISPLAY = 512  # longest side of the overlay's background image, in pixels


def fit_square(rgb, size: int, fit: str = "squash"):
    """An (H, W, 3) uint8 image as the model's (size, size, 3) input, and where the image lies
    in it, ``(x0, y0, x1, y1)`` in input pixels.

    ``"squash"`` resizes to size x size ignoring the aspect ratio, as `prepare` does, so the
    model sees what it was trained on; ``"pad"`` keeps the aspect ratio, centring the image on
    black before resizing (closer to the lesion's true shape, but unlike the training data).
    Resizing is nearest-neighbour, as in the prepared data.
    """
    import numpy as np
    from PIL import Image

    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    h, w = rgb.shape[:2]
    if fit == "squash" or h == w:
        square, box = rgb, (0, 0, size, size)
    else:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        square = np.zeros((side, side, 3), np.uint8)
        square[top : top + h, left : left + w] = rgb
        scale = size / side
        box = (
            round(left * scale),
            round(top * scale),
            max(round((left + w) * scale), round(left * scale) + 1),
            max(round((top + h) * scale), round(top * scale) + 1),
        )
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(resized), box


def explain_file(
    image_path: str | Path,
    checkpoint: str | Path,
    out: str | Path,
    *,
    method: cams.CamMethod = "gradcam",
    fit: str = "squash",
) -> dict:
    """Predict and explain one image file with a checkpoint; write an overlay PNG to ``out``.

    The model sees the image fitted to its square input by ``fit`` (see `fit_square`; default
    squashed, nearest neighbour, the way its data was prepared); the overlay shows the image
    and its saliency at the image's own aspect ratio. Returns the predicted class, all
    probabilities, and ``input``: a sentence saying how the image was fitted.
    """
    import numpy as np
    from PIL import Image

    from .checkpoint import load_checkpoint
    from .imageio import read_rgb
    from .report import overlay_png

    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    model, spec, _ = load_checkpoint(checkpoint)
    rgb = read_rgb(image_path)
    h, w = rgb.shape[:2]
    square, (x0, y0, x1, y1) = fit_square(rgb, spec.input_size, fit)
    images = torch.from_numpy(np.array(square)).permute(2, 0, 1)[None].float() / 255
    ex = explain(model, images, method=method)
    probs = {c: float(p) for c, p in zip(spec.classes, ex.probs[0].tolist())}
    predicted = spec.classes[int(ex.targets[0])]
    scale = min(1.0, _DISPLAY / max(h, w))
    shown = (max(1, round(w * scale)), max(1, round(h * scale)))
    background = np.asarray(Image.fromarray(rgb).resize(shown, Image.Resampling.BILINEAR))
    region = ex.saliency[0, y0:y1, x0:x1].float().numpy()
    saliency = np.asarray(Image.fromarray(region).resize(shown, Image.Resampling.BILINEAR))
    overlay_png(
        background,
        np.clip(saliency, 0, 1),
        Path(out),
        title=f"{predicted} ({probs[predicted]:.2f})",
    )
    n = spec.input_size
    how = (
        f"squashed from {w}x{h} to {n}x{n} (as prepared data is)"
        if fit == "squash" and w != h
        else f"padded from {w}x{h} to a square, then resized to {n}x{n}"
        if fit == "pad" and w != h
        else f"resized from {w}x{h} to {n}x{n}"
    )
    return {
        "predicted": predicted,
        "probabilities": probs,
        "input": how + f"; overlay at the image's {w}x{h} aspect ratio",
    }
