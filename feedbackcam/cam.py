"""Class activation maps as pure, batched, differentiable tensor functions.

Every function here takes and returns tensors and keeps the autograd graph, so a CAM can sit in a
loss. The CAM weights come from ``torch.autograd.grad`` on forward activations (no backward hooks,
no numpy, no ``no_grad``), and nothing is normalised in place.

Batching: the score summed over the batch, ``sum_n y_n[c_n]``, has gradient ``dy_n/dA_n`` at sample
n as long as samples do not interact after the explanation layer. That holds for every layer that
works per sample (conv, pooling, linear, dropout, LayerNorm/GroupNorm, BatchNorm in eval mode).
BatchNorm in train mode mixes samples through the batch statistics: feedback fine-tuning puts it
in eval mode (:func:`feedbackcam.self_explaining.set_batchnorm_eval`), which keeps a batched CAM
equal to the per-sample CAM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

SecondOrder = Literal["full", "detached"]
CamMethod = str  # a key of CAM_METHODS
SECOND_ORDER: tuple[str, ...] = ("full", "detached")


def target_classes(logits: Tensor, targets: Tensor | int | None = None) -> Tensor:
    """Resolve the class each CAM explains: the prediction if ``targets`` is None.

    In training the target is the ground-truth (feedback) class; at inference the predicted one
    (thesis section 4.2), or any class asked for.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits: expected shape (N, C), got {tuple(logits.shape)}")
    n, c = logits.shape
    if targets is None:
        return logits.detach().argmax(dim=1)
    if isinstance(targets, int):
        targets = torch.full((n,), targets, dtype=torch.long, device=logits.device)
    targets = torch.as_tensor(targets, device=logits.device).long().reshape(-1)
    if targets.numel() != n:
        raise ValueError(f"targets: expected {n} class indices, got {targets.numel()}")
    if targets.device.type == "cpu":
        if n and (targets.min() < 0 or targets.max() >= c):
            raise ValueError(f"targets: class indices must lie in [0, {c}), got {targets.tolist()}")
    elif n:
        # Checked on the device: reading the values back would stall the GPU on every step.
        torch._assert_async(((targets >= 0) & (targets < c)).all())
    return targets


def _gradients(
    logits: Tensor,
    activations: Sequence[Tensor],
    targets: Tensor,
    second_order: SecondOrder,
    retain_graph: bool,
) -> tuple[Tensor, ...]:
    if second_order not in SECOND_ORDER:
        raise ValueError(f"second_order: expected one of {SECOND_ORDER}, got {second_order!r}")
    for a in activations:
        if a.ndim != 4:
            raise ValueError(f"activations: expected (N, K, h, w) tensors, got {tuple(a.shape)}")
        if not a.requires_grad:
            raise ValueError(
                "activations do not require grad: run the forward pass with grad enabled "
                "(not under torch.no_grad) and with trainable parameters or an input that "
                "requires grad"
            )
    score = logits.gather(1, targets[:, None]).sum()
    create_graph = second_order == "full"
    grads = torch.autograd.grad(
        score, tuple(activations), create_graph=create_graph, retain_graph=retain_graph
    )
    # "detached": the thesis' gradient instance gives constant channel weights; only A carries
    # gradient into the explanation loss.
    return grads if create_graph else tuple(g.detach() for g in grads)


def gradcam_weights(grads: Tensor, activations: Tensor) -> Tensor:
    """Grad-CAM channel weights (eq. 3.1): the gradient averaged over the map."""
    return grads.mean(dim=(2, 3), keepdim=True)


def gradcam_pp_weights(grads: Tensor, activations: Tensor) -> Tensor:
    """Grad-CAM++ channel weights (Chattopadhyay et al. 2018, eq. 19 with the
    exponential-score simplification, as in pytorch-grad-cam):
    alpha = g^2 / (2 g^2 + sum(A) g^3), w = sum(alpha ReLU(g))."""
    g2 = grads.pow(2)
    g3 = g2 * grads
    denom = 2 * g2 + activations.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(grads != 0, g2 / torch.where(denom != 0, denom, 1.0), 0.0)
    return (alpha * F.relu(grads)).sum(dim=(2, 3), keepdim=True)


# The CAM methods by name: each maps (dy/dA, A) of one layer to channel weights (N, K, 1, 1).
# Adding a method is one entry here; FeedbackConfig, the CLI, the app and evaluation read it.
CAM_METHODS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gradcam": gradcam_weights,
    "gradcam++": gradcam_pp_weights,
}
METHODS: tuple[str, ...] = tuple(CAM_METHODS)


def check_method(method: str) -> str:
    """Return ``method`` if it names a registered CAM; raise ``ValueError`` otherwise."""
    if method not in CAM_METHODS:
        raise ValueError(f"CAM method: expected one of {METHODS}, got {method!r}")
    return method


def cam_weights(grads: Tensor, activations: Tensor, method: CamMethod) -> Tensor:
    """Channel weights (N, K, 1, 1) of ``method`` from one layer's gradients and activations."""
    return CAM_METHODS[check_method(method)](grads, activations)


def layer_cams(
    logits: Tensor,
    activations: Sequence[Tensor],
    targets: Tensor | int | None = None,
    *,
    method: CamMethod = "gradcam",
    second_order: SecondOrder = "full",
    retain_graph: bool = True,
    rectify: bool = True,
) -> list[Tensor]:
    """Raw CAMs, one (N, h, w) map per activation tensor, from one ``autograd.grad`` call.

    ``CAM = ReLU(sum_k w_k A_k)`` (eq. 3.2), with Grad-CAM weights ``w_k = mean_ij dy_c/dA_k,ij``
    (eq. 3.1) or Grad-CAM++ weights.

    Args:
        logits: (N, C) scores from the same forward pass as ``activations``.
        activations: (N, K, h, w) tensors inside the autograd graph.
        targets: class per sample (None: the predicted class).
        method: ``"gradcam"`` or ``"gradcam++"``.
        second_order: ``"full"`` differentiates through the weights too (``create_graph=True``);
            ``"detached"`` treats the weights as constants, as the thesis did.
        retain_graph: keep the forward graph for a later backward of a loss (training).
        rectify: apply the ReLU of eq. 3.2; ``False`` returns the signed class evidence
            ``sum_k w_k A_k`` (negative where a region speaks against the class).
    """
    check_method(method)
    targets = target_classes(logits, targets)
    grads = _gradients(logits, activations, targets, second_order, retain_graph)
    cams = []
    for g, a in zip(grads, activations, strict=True):
        # Grad-CAM++ weights also depend on A itself; "detached" keeps them constant all the same.
        weights = cam_weights(g, a if second_order == "full" else a.detach(), method)
        evidence = (weights * a).sum(dim=1)
        cams.append(F.relu(evidence) if rectify else evidence)
    return cams


def grad_cam(
    logits: Tensor, activations: Tensor, targets: Tensor | int | None = None, **options
) -> Tensor:
    """Grad-CAM (eq. 3.1, 3.2) of one layer: a raw, non-negative (N, h, w) map.
    ``options``: :func:`layer_cams`' ``second_order`` and ``retain_graph``.

    Example:
        >>> from feedbackcam.models import small_cnn
        >>> model = small_cnn(num_classes=3)
        >>> out = model(torch.rand(2, 3, 32, 32))
        >>> grad_cam(out.logits, out.activations[0], targets=torch.tensor([0, 2])).shape
        torch.Size([2, 4, 4])
    """
    return layer_cams(logits, [activations], targets, method="gradcam", **options)[0]


def grad_cam_pp(
    logits: Tensor, activations: Tensor, targets: Tensor | int | None = None, **options
) -> Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018) of one layer: a raw, non-negative (N, h, w) map.
    ``options`` as for :func:`grad_cam`."""
    return layer_cams(logits, [activations], targets, method="gradcam++", **options)[0]


def upsample(cam: Tensor, size: tuple[int, int] | int) -> Tensor:
    """Bilinearly resize (N, h, w) maps to ``size`` (the input's H, W)."""
    if cam.ndim != 3:
        raise ValueError(f"cam: expected shape (N, h, w), got {tuple(cam.shape)}")
    if isinstance(size, int):
        size = (size, size)
    return F.interpolate(cam[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def scale_by_max(cam: Tensor) -> Tensor:
    """Scale each (h, w) map to [0, 1] by its own maximum; an all-zero map stays zero (no NaN)."""
    peak = cam.amax(dim=(-2, -1), keepdim=True)
    return cam / torch.where(peak > 0, peak, torch.ones_like(peak))


def hard_threshold(saliency: Tensor, threshold: float = 0.5) -> Tensor:
    """Binary explanation map: saliency >= threshold (0.5 = 50 % of the max). For metrics/display.

    An all-zero saliency gives an empty map, not a full one.
    """
    _check_threshold(threshold)
    return (saliency >= threshold) & (saliency > 0)


def soft_threshold(saliency: Tensor, threshold: float = 0.5, temperature: float = 0.1) -> Tensor:
    """Differentiable explanation map ``sigmoid((s - t) / temperature)``, for the loss.

    As the temperature goes to 0 it approaches :func:`hard_threshold`; the thesis' th(S, t)
    (Algorithm 2) is the hard version, whose gradient is zero almost everywhere.
    """
    _check_threshold(threshold)
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
    return torch.sigmoid((saliency - threshold) / temperature)


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: expected a fraction of the max in [0, 1], got {threshold!r}")


def saliency_maps(
    logits: Tensor,
    activations: Sequence[Tensor],
    targets: Tensor | int | None,
    size: tuple[int, int] | int,
    *,
    method: CamMethod = "gradcam",
    second_order: SecondOrder = "full",
    combine: Literal["mean", "max"] = "mean",
    retain_graph: bool = True,
) -> Tensor:
    """Input-sized saliency in [0, 1]: each layer's CAM upsampled and scaled, then fused.

    With one layer this is the thesis' saliency S. With several it is a fused multi-layer CAM
    (after Shinde et al., the thesis' future work): each layer's map is upsampled to the input
    and scaled by its max, the maps are combined by their mean (or maximum) and scaled again.
    Deeper layers are class-selective but coarse; shallower ones sharpen the boundary.
    """
    if combine not in ("mean", "max"):
        raise ValueError(f"combine: expected 'mean' or 'max', got {combine!r}")
    cams = layer_cams(
        logits,
        activations,
        targets,
        method=method,
        second_order=second_order,
        retain_graph=retain_graph,
    )
    maps = [scale_by_max(upsample(c, size)) for c in cams]
    if len(maps) == 1:
        return maps[0]
    stacked = torch.stack(maps)
    fused = stacked.mean(0) if combine == "mean" else stacked.amax(0)
    return scale_by_max(fused)


def fused_cam(
    logits: Tensor,
    activations: Sequence[Tensor],
    targets: Tensor | int | None,
    size: tuple[int, int] | int,
    **options,
) -> Tensor:
    """Fused multi-layer CAM in [0, 1] at ``size``: :func:`saliency_maps` (whose keyword
    ``options`` it takes: method, second_order, combine) of two or more layers."""
    if len(activations) < 2:
        raise ValueError(f"fused_cam: expected activations of >= 2 layers, got {len(activations)}")
    return saliency_maps(logits, activations, targets, size, **options)
