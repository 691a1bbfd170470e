"""Counterfactual images from "ignore" feedback, as batched tensor functions.

A user who marks a region as "must not matter" tells us how to build images whose class is the
same but whose marked content differs: the region filled with the image's median colour, filled
with noise (the typology's counterexamples, CE), or the artifact moved onto another image of the
batch. The invariance losses in :mod:`feedbackcam.losses` ask the prediction not to change
between an image and these versions of it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(images: Tensor, masks: Tensor) -> Tensor:
    if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(
            f"expected images (N, C, H, W) and masks (N, H, W), got {tuple(images.shape)} and "
            f"{tuple(masks.shape)}"
        )
    return masks.to(images.dtype)[:, None]


def median_colour(images: Tensor, masks: Tensor) -> Tensor:
    """(N, C) median colour of each image outside its mask (the whole image if all masked)."""
    m = _check(images, masks) > 0.5
    n, c = images.shape[:2]
    flat = images.detach().flatten(2)
    outside = (~m).flatten(2).expand(-1, c, -1)
    # NaN-out the masked pixels and take nanmedian: one batched call, no Python loop.
    vals = torch.where(outside, flat, torch.full_like(flat, float("nan")))
    med = vals.nanmedian(dim=2).values
    full = (~outside).all(dim=2).any(dim=1)  # images masked everywhere: the whole image's
    if full.any():
        med[full] = flat[full].median(dim=2).values
    return med


def fill_region(images: Tensor, masks: Tensor) -> Tensor:
    """Images with the masked region replaced by the image's median colour outside it."""
    m = _check(images, masks)
    marked = (m.flatten(1) > 0).any(dim=1)
    colour = torch.zeros(images.shape[:2], dtype=images.dtype, device=images.device)
    if marked.any():  # the others are left as they are: no median to take
        colour[marked] = median_colour(images[marked], masks[marked]).to(images.dtype)
    return images * (1 - m) + colour[:, :, None, None] * m


def randomize_region(images: Tensor, masks: Tensor, generator=None) -> Tensor:
    """Images with the masked region replaced by uniform noise in [0, 1] (counterexamples)."""
    m = _check(images, masks)
    noise = torch.rand(images.shape, generator=generator, device="cpu").to(images)
    return images * (1 - m) + noise * m


def transplant(images: Tensor, masks: Tensor, recipients: Tensor) -> tuple[Tensor, Tensor]:
    """Paste each image's marked artifact onto another image of the batch.

    Row ``i`` is image ``recipients[i]`` carrying image ``i``'s artifact (at the same place).
    The recipient is first cleaned of its own marked region (filled with its median colour), so
    the result carries exactly one known artifact, the donor's, and its class is the recipient's.

    Args:
        images: (N, C, H, W).
        masks: (N, H, W) ignore masks (empty where the image has none).
        recipients: (N,) long, per donor row the index of the image that receives its artifact.

    Returns:
        (pasted, base): the recipients with the donor's artifact, and the same recipients
        without it (both (N, C, H, W)).
    """
    m = _check(images, masks)
    base = fill_region(images, masks)[recipients]
    pasted = base * (1 - m) + images * m
    return pasted, base
