"""Classification and explanation-feedback losses (thesis section 3.6 and eq. 4.1).

Explanation losses are per-sample: each returns an (N,) tensor, and :func:`masked_mean` averages
it over the samples that carry explanation feedback. A sample with no feedback mask (``has_mask``
False) or an empty mask adds no explanation loss: an empty mask says "nothing here", which no
saliency can match, so it is treated as missing rather than as a target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

EXPLANATION_LOSSES: tuple[str, ...] = ("jaccard", "dice", "energy", "rrr", "mse")


def classification_loss(
    logits: Tensor, labels: Tensor, class_weights: Sequence[float] | Tensor | None = None
) -> Tensor:
    """Cross-entropy (eq. 3.3), optionally class-weighted, averaged over the batch."""
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
        if weight.shape != (logits.shape[1],):
            raise ValueError(
                f"class_weights: expected {logits.shape[1]} values, got {tuple(weight.shape)}"
            )
    return F.cross_entropy(logits, labels, weight=weight)


def _check_maps(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"expected explanation map and mask of one (N, H, W) shape, got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )


def soft_jaccard(pred: Tensor, mask: Tensor) -> Tensor:
    """Continuous Jaccard index per sample (eq. 3.5): J = sum(y m) / sum(y + m - y m).

    Two empty maps score 1 (they agree).
    """
    _check_maps(pred, mask)
    mask = mask.to(pred.dtype)
    inter = (pred * mask).sum(dim=(1, 2))
    union = (pred + mask - pred * mask).sum(dim=(1, 2))
    return torch.where(union > 0, inter / torch.where(union > 0, union, 1.0), 1.0)


def jaccard_loss(pred: Tensor, mask: Tensor) -> Tensor:
    """The thesis' squared continuous Jaccard loss per sample (eq. 3.6): (1 - J)^2."""
    return (1 - soft_jaccard(pred, mask)).pow(2)


def dice_loss(pred: Tensor, mask: Tensor) -> Tensor:
    """Soft Dice loss per sample: 1 - 2 sum(y m) / (sum y + sum m)."""
    _check_maps(pred, mask)
    mask = mask.to(pred.dtype)
    inter = (pred * mask).sum(dim=(1, 2))
    total = pred.sum(dim=(1, 2)) + mask.sum(dim=(1, 2))
    return 1 - torch.where(total > 0, 2 * inter / torch.where(total > 0, total, 1.0), 1.0)


def outside_energy_loss(saliency: Tensor, mask: Tensor) -> Tensor:
    """Share of the saliency's energy outside the mask, per sample: sum(s (1-m)) / sum(s).

    Unlike the Jaccard loss it asks nothing of the map's shape inside the mask; it only pushes
    saliency off the regions the user marked as irrelevant. A zero map scores 0.
    """
    _check_maps(saliency, mask)
    total = saliency.sum(dim=(1, 2))
    outside = (saliency * (1 - mask.to(saliency.dtype))).sum(dim=(1, 2))
    return torch.where(total > 0, outside / torch.where(total > 0, total, 1.0), 0.0)


def map_mse_loss(saliency: Tensor, target: Tensor) -> Tensor:
    """Mean squared error to a non-binary feedback map in [0, 1], per sample (thesis ch. 6)."""
    _check_maps(saliency, target)
    return (saliency - target.to(saliency.dtype)).pow(2).mean(dim=(1, 2))


def input_gradients(logits: Tensor, images: Tensor) -> Tensor:
    """d/dx of sum_k log p_k per sample (Ross et al. 2017), kept in the graph (create_graph)."""
    if not images.requires_grad:
        raise ValueError("images must require grad for the input-gradient (RRR) loss")
    log_probs = F.log_softmax(logits, dim=1)
    (grads,) = torch.autograd.grad(log_probs.sum(), images, create_graph=True)
    return grads


def rrr_loss(input_grads: Tensor, mask: Tensor) -> Tensor:
    """Right-for-the-right-reasons penalty per sample (Ross et al. 2017, eq. 1, second term).

    Squared input gradients of the log-probabilities outside the relevant region, summed over
    channels and averaged over the image's pixels (so the scale does not grow with resolution).

    Args:
        input_grads: (N, 3, H, W) from :func:`input_gradients`.
        mask: (N, H, W) relevant region (1 = matters). Ross' annotation A is its complement.
    """
    if input_grads.ndim != 4 or input_grads.shape[0] != mask.shape[0]:
        raise ValueError(
            f"expected input gradients (N, 3, H, W) and mask (N, H, W), got "
            f"{tuple(input_grads.shape)} and {tuple(mask.shape)}"
        )
    outside = 1 - mask.to(input_grads.dtype)
    return (input_grads.pow(2).sum(dim=1) * outside).mean(dim=(1, 2))


def feedback_present(masks: Tensor, has_mask: Tensor | None = None) -> Tensor:
    """Boolean (N,): the sample carries explanation feedback (a given, non-empty mask)."""
    present = masks.flatten(1).amax(dim=1) > 0
    if has_mask is not None:
        present = present & has_mask.to(device=masks.device, dtype=torch.bool)
    return present


def masked_mean(per_sample: Tensor, present: Tensor) -> Tensor:
    """Mean of ``per_sample`` over samples where ``present``; 0 (in the graph) if there are none."""
    weights = present.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp_min(1)


def combined_loss(cls_loss: Tensor, exp_loss: Tensor, lam: float) -> Tensor:
    """L = (1 - lambda) L_cls + lambda L_exp (eq. 4.1).

    lambda = 0 is class feedback only, lambda = 1 explanation feedback only.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda: expected a value in [0, 1], got {lam!r}")
    return (1 - lam) * cls_loss + lam * exp_loss
