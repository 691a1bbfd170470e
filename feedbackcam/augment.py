"""Batched flip-and-rotate augmentation, the same transform on images and their masks.

The thesis trains its base model with horizontal flips and 24 rotations over 360 degrees
(multiples of 15 degrees, Table 3.1). Here both are one affine resampling of the whole batch
(``F.affine_grid`` + ``F.grid_sample``), with per-sample parameters drawn on the device, so
augmentation runs on the GPU next to the data with no Python loop and no host sync.

Conventions:
    - A positive angle rotates the picture counter-clockwise as displayed (row 0 at the top), so
      90 degrees equals ``torch.rot90(x, 1, dims=(-2, -1))``.
    - A sample that is flipped is flipped first (``torch.flip(x, dims=(-1,))``), then rotated.
    - Rotation is about the image centre, in pixel units, so non-square images rotate rigidly
      (no shear); corners rotated in from outside the image are filled with 0 (``"zeros"``) or
      mirrored from the inside (``"reflection"``), the same way for images and masks.
    - Images are resampled bilinearly; masks with nearest neighbour, so binary masks stay
      binary and aligned with their images. A sample with no flip and a multiple of 360 degrees
      is returned bit-exact.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

PaddingMode = Literal["zeros", "reflection"]
PADDING_MODES: tuple[str, ...] = ("zeros", "reflection")


def flip_rotate(
    images: Tensor,
    masks: Tensor,
    flips: Tensor,
    angles_deg: Tensor,
    *,
    padding_mode: PaddingMode = "zeros",
) -> tuple[Tensor, Tensor]:
    """Flip and rotate each sample of a batch by its own parameters.

    Args:
        images: (N, C, H, W) floating tensor.
        masks: (N, H, W) tensor of any dtype (bool, integer or float) on the same device.
        flips: (N,) bool tensor: flip sample n horizontally before rotating it.
        angles_deg: (N,) rotation angles in degrees, counter-clockwise.
        padding_mode: ``"zeros"`` fills pixels rotated in from outside with 0;
            ``"reflection"`` mirrors the image at its border.

    Returns:
        ``(images, masks)`` transformed, with the input shapes, dtypes and device; the inputs are
        not modified.

    Example:
        >>> x, m = torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8) > 0.5
        >>> y, n = flip_rotate(x, m, torch.tensor([False, True]), torch.tensor([90.0, 0.0]))
        >>> torch.allclose(y[0], torch.rot90(x[0], 1, (-2, -1)), atol=1e-5)
        True
        >>> torch.equal(n[1], m[1].flip(-1))
        True
    """
    _check_batch(images, masks)
    n = images.shape[0]
    if not isinstance(flips, Tensor) or flips.dtype != torch.bool or flips.shape != (n,):
        raise ValueError(f"flips: expected a bool tensor of shape ({n},), got {_describe(flips)}")
    if (
        not isinstance(angles_deg, Tensor)
        or angles_deg.dtype == torch.bool
        or angles_deg.is_complex()
        or angles_deg.shape != (n,)
    ):
        raise ValueError(
            f"angles_deg: expected a real tensor of shape ({n},), got {_describe(angles_deg)}"
        )
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode: expected one of {PADDING_MODES}, got {padding_mode!r}")

    device = images.device
    flips = flips.to(device)
    angles_deg = angles_deg.to(device)
    # Half-precision sampling coordinates are off by up to half a pixel at 227 px: resample in
    # float32 and cast back.
    work = torch.float32 if images.dtype in (torch.float16, torch.bfloat16) else images.dtype
    h, w = images.shape[-2:]
    theta = _theta(flips, angles_deg, h, w, work)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    out_images = F.grid_sample(
        images.to(work), grid, mode="bilinear", padding_mode=padding_mode, align_corners=False
    ).to(images.dtype)
    out_masks = F.grid_sample(
        masks[:, None].to(work),
        grid,
        mode="nearest",
        padding_mode=padding_mode,
        align_corners=False,
    )[:, 0].to(masks.dtype)
    # The sampling grid is exact only to rounding, and bilinear weights of 1 - 1e-7 would blur an
    # untouched sample: keep identities bit-exact instead.
    keep = ~flips & (torch.remainder(angles_deg, 360) == 0)
    out_images = torch.where(keep[:, None, None, None], images, out_images)
    out_masks = torch.where(keep[:, None, None], masks, out_masks)
    return out_images, out_masks


def sample_flip_rotate(
    n: int,
    generator: torch.Generator | None = None,
    *,
    p_flip: float = 0.5,
    steps: int = 24,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw per-sample augmentation parameters: flips with probability ``p_flip``, and angles
    uniform over ``steps`` equal steps of 360 degrees (the thesis: 24 steps of 15 degrees).

    Args:
        n: batch size.
        generator: random source; the numbers are drawn on its device (CPU if None).
        p_flip: probability of a horizontal flip, in [0, 1].
        steps: number of rotation angles, ``k * 360 / steps`` for k in 0..steps-1; 1 disables
            rotation.
        device: where to return the parameters (default: the generator's device).

    Returns:
        ``(flips, angles_deg)``: a (n,) bool tensor and a (n,) float32 tensor.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    _check_params(p_flip, steps)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator)}")
    source = generator.device if generator is not None else torch.device("cpu")
    flips = torch.rand(n, generator=generator, device=source) < p_flip
    k = torch.randint(0, steps, (n,), generator=generator, device=source)
    angles = k.to(torch.float32) * (360.0 / steps)
    target = source if device is None else torch.device(device)
    return flips.to(target), angles.to(target)


def random_flip_rotate(
    images: Tensor,
    masks: Tensor,
    generator: torch.Generator | None = None,
    *,
    p_flip: float = 0.5,
    steps: int = 24,
    padding_mode: PaddingMode = "zeros",
) -> tuple[Tensor, Tensor]:
    """The thesis' base-model augmentation: a random horizontal flip and one of ``steps``
    rotations over 360 degrees, drawn per sample and applied alike to images and masks.

    Args:
        images: (N, C, H, W) floating tensor.
        masks: (N, H, W) tensor on the same device.
        generator: random source for reproducible draws. A CUDA generator keeps the draw on the
            GPU; a CPU generator with CUDA images costs one small host-to-device copy.
        p_flip: probability of a horizontal flip.
        steps: number of equally spaced angles (24: multiples of 15 degrees).
        padding_mode: fill for rotated-in corners, see :func:`flip_rotate`.

    Returns:
        ``(images, masks)`` augmented.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, m = random_flip_rotate(torch.rand(4, 3, 16, 16), torch.zeros(4, 16, 16), g)
        >>> x.shape, m.shape
        (torch.Size([4, 3, 16, 16]), torch.Size([4, 16, 16]))
    """
    _check_batch(images, masks)
    flips, angles = sample_flip_rotate(
        images.shape[0], generator, p_flip=p_flip, steps=steps, device=images.device
    )
    return flip_rotate(images, masks, flips, angles, padding_mode=padding_mode)


def _theta(flips: Tensor, angles_deg: Tensor, h: int, w: int, dtype: torch.dtype) -> Tensor:
    """(N, 2, 3) affine_grid matrices mapping output to input coordinates."""
    rad = torch.deg2rad(angles_deg.to(torch.float64))
    cos, sin = torch.cos(rad), torch.sin(rad)
    # cos(90 deg) is 6e-17, not 0, in floating point: snap so quarter turns sample pixel centres.
    cos = torch.where((cos - cos.round()).abs() < 1e-9, cos.round(), cos)
    sin = torch.where((sin - sin.round()).abs() < 1e-9, sin.round(), sin)
    # In centred pixel units (x right, y down) an output pixel p samples the input at
    # Flip @ R @ p, with R = [[cos, -sin], [sin, cos]] and Flip = diag(-1 if flipped, 1).
    # affine_grid works in coordinates normalised per axis (x * 2 / W, y * 2 / H), which turns
    # the off-diagonal terms into -sin * H / W and sin * W / H.
    sign = 1.0 - 2.0 * flips.to(torch.float64)
    zero = torch.zeros_like(cos)
    row0 = torch.stack([sign * cos, sign * -sin * (h / w), zero], dim=-1)
    row1 = torch.stack([sin * (w / h), cos, zero], dim=-1)
    return torch.stack([row0, row1], dim=-2).to(dtype)


def _check_batch(images: Tensor, masks: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"images: expected a floating tensor of shape (N, C, H, W), got {_describe(images)}"
        )
    n, _, h, w = images.shape
    if not isinstance(masks, Tensor) or masks.shape != (n, h, w):
        raise ValueError(f"masks: expected shape ({n}, {h}, {w}), got {_describe(masks)}")
    if masks.device != images.device:
        raise ValueError(
            f"masks: on {masks.device}, images on {images.device}: expected one device"
        )


def _check_params(p_flip: float, steps: int) -> None:
    if not isinstance(p_flip, int | float) or isinstance(p_flip, bool) or not 0 <= p_flip <= 1:
        raise ValueError(f"p_flip: expected a probability in [0, 1], got {p_flip!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return repr(type(x))
