"""Counterfactual images from feedback masks, as batched tensor functions.

A user who marks a region as "must not matter" (an ignore mask) tells us how to build images
whose class is the same but whose marked content differs: the region filled with the image's
median colour, filled with noise (the typology's counterexamples, CE), or the artifact moved onto
another image of the batch. A user who marks the region that matters (a keep mask: the lesion)
tells us more: everything *outside* it may change, so the lesion can be given another image's
surroundings (:func:`swap_surroundings`). The invariance losses in :mod:`feedbackcam.losses` ask
the prediction not to change between an image and these versions of it.

One rule holds for every function here: nothing is ever painted over a region the user marked
as keep on the image that receives it (``protect``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _check(images: Tensor, masks: Tensor) -> Tensor:
    if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(
            f"expected images (N, C, H, W) and masks (N, H, W), got {tuple(images.shape)} and "
            f"{tuple(masks.shape)}"
        )
    return masks.to(images.dtype)[:, None]


def counterfactual_rows(
    marked: Tensor, batch_size: int, share: float | None, per_row: int
) -> tuple[Tensor, float]:
    """The marked rows whose counterfactuals a term forwards this step, and the weight of each.

    ``marked``: (K,) indices of the rows that carry the term's mask. With ``share``
    (``FeedbackConfig.counterfactual_share``) a term that forwards ``per_row`` counterfactual
    images per marked row takes at most ``max(1, floor(share * batch_size / per_row))`` of them,
    drawn uniformly at random, each weighted ``K / chosen`` so that the mean over the marked
    rows is unbiased: the same loss in expectation, at a bounded cost per step. None: all rows,
    weight 1 (the random draw is skipped, so results do not change).
    """
    k = len(marked)
    if share is None or k == 0:
        return marked, 1.0
    limit = _limit(batch_size, share, per_row)
    if k <= limit:
        return marked, 1.0
    chosen = marked[torch.randperm(k)[:limit].to(marked.device)]
    return chosen, k / limit


def fixed_shapes(device: torch.device) -> bool:
    """Whether the counterfactual terms pick their rows with fixed shapes (no ``nonzero``, so no
    host synchronisation): on accelerators, where a synchronisation stalls the queue; on the
    CPU the marked rows alone are forwarded (a synchronisation costs nothing there)."""
    return device.type != "cpu"


def _marked_first(present: Tensor) -> Tensor:
    """(N,) row order: the marked rows first, in random order, then the others."""
    key = torch.rand(present.shape[0], device=present.device) + 2 * (~present).to(torch.float32)
    return key.argsort()


def _limit(n: int, share: float | None, per_row: int) -> int:
    return n if share is None else max(1, min(n, int(share * n / per_row)))


def _fixed(
    present: Tensor, share: float | None, per_row: int, count: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(the marked-first order, its first L rows, their weights). ``count``: at least the
    number of marked rows, known on the host (``FeedbackBatch.counts``): L is at most it."""
    limit = _limit(present.shape[0], share, per_row)
    if count is not None:
        limit = min(limit, count)
    order = _marked_first(present)
    rows, k = order[:limit], present.sum()
    return order, rows, present[rows].to(torch.float32) * (k / k.clamp(max=limit).clamp(min=1))


def fixed_rows(
    present: Tensor, share: float | None, per_row: int, count: int | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`counterfactual_rows` without a host synchronisation: ``L`` rows, ``L`` fixed by
    the batch size and ``share`` (the batch size with None), the marked ones first in random
    order, and a weight per row: ``K / min(K, L)`` for a marked row (``K`` marked rows: the
    same unbiased weight), 0 for an unmarked row that fills the fixed shape. ``count`` (the
    batch's marked rows counted on the host, or more) caps ``L``: a batch with few marks
    forwards few rows, none without marks."""
    _, rows, w = _fixed(present, share, per_row, count)
    return rows, w


def marked_rows(
    present: Tensor, share: float | None, per_row: int, count: int | None = None
) -> tuple[Tensor, float | Tensor]:
    """The rows (and weights) whose counterfactuals a term forwards, from the boolean (N,)
    ``present``: :func:`counterfactual_rows` on the CPU, :func:`fixed_rows` (with ``count``)
    elsewhere."""
    if fixed_shapes(present.device):
        return fixed_rows(present, share, per_row, count)
    return counterfactual_rows(present.nonzero().squeeze(1), len(present), share, per_row)


def surroundings_pairs(
    present: Tensor, share: float | None, count: int | None = None
) -> tuple[Tensor, Tensor, float | Tensor] | None:
    """(receivers, donors, weights) for the surroundings term: each chosen marked row gets the
    surroundings of another marked row; None when fewer than two rows are marked (CPU, or a
    ``count`` below two). With fixed shapes a receiver whose donor is itself (fewer than two
    marked) weighs 0, and ``count`` caps the rows as in :func:`fixed_rows`."""
    if count is not None and count < 2:
        return None
    if fixed_shapes(present.device):
        order, rows, w = _fixed(present, share, 1, count)
        # the next marked row in the random order (any marked row, chosen or not)
        step = torch.arange(len(rows), device=order.device) + 1
        donors = order[step % present.sum().clamp(min=1)]
        return rows, donors, w * (donors != rows)
    marked = present.nonzero().squeeze(1)
    k = len(marked)
    if k < 2:  # no other marked image to borrow surroundings from
        return None
    shift = int(torch.randint(1, k, ()))
    chosen, w = counterfactual_rows(torch.arange(k, device=marked.device), len(present), share, 1)
    return marked[chosen], marked[(chosen + shift) % k], w


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
    if fixed_shapes(images.device):  # no host synchronisation: every row's, then chosen
        return torch.where(full[:, None], flat.median(dim=2).values, med)
    if full.any():
        med[full] = flat[full].median(dim=2).values
    return med


def fill_region(images: Tensor, masks: Tensor) -> Tensor:
    """Images with the masked region replaced by the image's median colour outside it."""
    m = _check(images, masks)
    if fixed_shapes(images.device):  # every row's median: no host synchronisation
        colour = median_colour(images, masks).to(images.dtype)
    else:
        marked = (m.flatten(1) > 0).any(dim=1)
        colour = torch.zeros(images.shape[:2], dtype=images.dtype, device=images.device)
        if marked.any():  # the others are left as they are: no median to take
            colour[marked] = median_colour(images[marked], masks[marked]).to(images.dtype)
    return images * (1 - m) + colour[:, :, None, None] * m


def fill_region_uint8(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """:func:`fill_region` on uint8 (N, H, W, 3) ``images`` with (N, H, W) ``masks`` (0/1 or
    boolean), back in uint8 (N, H, W, 3): data-set images with their marked regions filled."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    m = torch.from_numpy(np.ascontiguousarray(masks)).float()
    filled = fill_region(x, m).mul(255).round().clamp(0, 255).to(torch.uint8)
    return filled.permute(0, 2, 3, 1).contiguous().numpy()


# The eight symmetries of a square: ``code // 2`` quarter turns, then mirrored left-right if
# ``code`` is odd; 0 leaves an image as it is.
SYMMETRIES = 8


def draw_symmetry(shape: tuple[int, ...]) -> int:
    """A random symmetry code for images of ``shape`` (..., H, W), drawn from torch's global
    generator on the host (no device synchronisation): any of the eight where H == W, else one
    that keeps the shape (none, mirrored, half turn, half turn mirrored)."""
    code = int(torch.randint(SYMMETRIES, ()))
    return code if shape[-1] == shape[-2] else code % 2 + 4 * (code // 2 % 2)


def turned(x: Tensor, code: int) -> Tensor:
    """``x`` (..., H, W) under the symmetry ``code`` (:data:`SYMMETRIES`)."""
    if not 0 <= code < SYMMETRIES:
        raise ValueError(f"code: expected a value in [0, {SYMMETRIES}), got {code!r}")
    if code // 2 % 2 and x.shape[-1] != x.shape[-2]:
        raise ValueError(f"code {code}: a quarter turn of a {tuple(x.shape[-2:])} image")
    y = torch.rot90(x, code // 2, dims=(-2, -1)) if code // 2 else x
    return y.flip(-1) if code % 2 else y


def randomize_region(images: Tensor, masks: Tensor, generator=None) -> Tensor:
    """Images with the masked region replaced by uniform noise in [0, 1] (counterexamples)."""
    m = _check(images, masks)
    noise = torch.rand(images.shape, generator=generator, device="cpu").to(images)
    return images * (1 - m) + noise * m


def moved_masks(
    masks: Tensor, recipients: Tensor, protect: Tensor | None = None, symmetry: int = 0
) -> Tensor:
    """Each donor's mask as it lands on its recipient: ``masks[i]`` turned by ``symmetry``
    (:func:`turned`; 0: where it lay), less the recipient's ``protect`` (keep) region, so a
    moved region never covers what the recipient's user marked as mattering. Row ``i`` belongs
    to recipient ``recipients[i]``."""
    masks = turned(masks, symmetry)
    if protect is None:
        return masks
    return masks * (1 - (protect[recipients] > 0).to(masks.dtype))


def transplant(
    images: Tensor,
    masks: Tensor,
    recipients: Tensor,
    protect: Tensor | None = None,
    donors: Tensor | None = None,
    symmetry: int = 0,
) -> tuple[Tensor, Tensor]:
    """Paste each image's marked artifact onto another image of the batch.

    Row ``i`` is image ``recipients[i]`` carrying image ``i``'s artifact (at the same place,
    or, with ``symmetry``, where the donor turned or mirrored would have it).
    The recipient is first cleaned of its own marked region (filled with its median colour), so
    the result carries exactly one known artifact, the donor's, and its class is the recipient's.
    Where the artifact would land on the recipient's ``protect`` (keep) region, the recipient's
    own pixels stay: a moved artifact never paints over a lesion someone marked.

    Args:
        images: (N, C, H, W).
        masks: (N, H, W) ignore masks (empty where the image has none).
        recipients: (N,) long, per donor row the index of the image that receives its artifact;
            with ``donors``, (M,): the recipient of each of those donors.
        protect: optional (N, H, W) keep masks (empty where an image has none).
        donors: optional (M,) long: build only these donors' rows (each row exactly as the
            whole batch's would be); None: every image is a donor.
        symmetry: the donors' images and masks are turned by this code first
            (:func:`turned`; 0: as they are): an artifact must not matter wherever and however
            it lies.

    Returns:
        (pasted, base): the recipients with the donor's artifact, and the same recipients
        without it (both (N, C, H, W), or (M, C, H, W) with ``donors``).
    """
    _check(images, masks)
    if donors is None:
        donors = torch.arange(images.shape[0], device=images.device)
    m = moved_masks(masks[donors], recipients, protect, symmetry).to(images.dtype)[:, None]
    base = fill_region(images[recipients], masks[recipients])
    pasted = base * (1 - m) + turned(images[donors], symmetry) * m
    return pasted, base


def dilate(masks: Tensor, radius: int) -> Tensor:
    """Binary (N, H, W) masks grown by ``radius`` pixels (a square max filter)."""
    if radius <= 0:
        return (masks > 0).to(masks.dtype)
    grown = F.max_pool2d((masks > 0).float()[:, None], 2 * radius + 1, stride=1, padding=radius)
    return grown[:, 0].to(masks.dtype)


def swap_surroundings(
    images: Tensor,
    keep: Tensor,
    donors: Tensor,
    margin: float = 0.035,
    receivers: Tensor | None = None,
    symmetry: int = 0,
) -> tuple[Tensor, Tensor]:
    """Each image's keep region (its lesion, grown by ``margin`` of the side) on the
    surroundings of another image of the batch.

    Row ``i`` is image ``i``'s lesion, where it is, on image ``donors[i]``'s skin, the donor's
    own lesion filled with the donor's median colour outside it: one lesion, the receiver's,
    whatever the donor's surroundings hold (a ruler, ink, a patch, dark corners). The receiver's
    keep region is never painted over; its class is the receiver's.

    Args:
        images: (N, C, H, W).
        keep: (N, H, W) keep masks; a row without one gets its donor's surroundings everywhere
            (callers leave such rows out).
        donors: (N,) long, per row the image whose surroundings it receives; with
            ``receivers``, (M,): the donor of each of those receivers.
        margin: the keep region is grown by this share of the image side (the lesion's border
            and the skin right around it stay the receiver's).
        receivers: optional (M,) long: build only these images' rows (each exactly as the whole
            batch's would be); None: every image receives.
        symmetry: the donors' surroundings are turned by this code (:func:`turned`; 0: as
            they are), so a ruler or patch also meets the lesion where it never lay.

    Returns:
        (swapped, region): the counterfactuals and the grown keep regions of their receivers
        ((N, ...) or (M, ...)).
    """
    _check(images, keep)
    if receivers is None:
        receivers = torch.arange(images.shape[0], device=images.device)
    grown = dilate(keep, int(round(margin * images.shape[-1])))
    region = grown[receivers]
    background = turned(fill_region(images[donors], grown[donors]), symmetry)
    r = region.to(images.dtype)[:, None]
    return images[receivers] * r + background * (1 - r), region
