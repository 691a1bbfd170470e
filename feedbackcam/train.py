"""One feedback training step, the thesis' reference step, and the loops around them.

:func:`feedback_step` is one optimizer step on a batch of (images, labels, masks, has_mask): one
forward pass, the CAM through ``torch.autograd.grad``, the combined loss (eq. 4.1), backward,
step. No copy of the model is made. Batch size 1 (online learning, as the thesis) and mini-batches
both work. :func:`reference_step` follows the thesis' Algorithm 2 literally (a deep-copied
"gradient instance" per sample) and exists as a speed baseline and a correctness check.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import cam as cams
from . import losses
from .models import SelfExplaining, set_batchnorm_eval

log = logging.getLogger(__name__)

EXPLAIN_CLASSES = ("label", "predicted", "all")


@dataclass(frozen=True)
class FeedbackConfig:
    """How feedback becomes a loss. Defaults reproduce the thesis' combined runs.

    Attributes:
        lam: lambda of eq. 4.1; 0 = class feedback only, 1 = explanation feedback only.
        explanation_loss: one of ``losses.EXPLANATION_LOSSES``: "jaccard" (eq. 3.6), "dice",
            "energy" (saliency share outside the mask), "rrr" (input-gradient penalty), "mse"
            (to a non-binary feedback map).
        cam: "gradcam" or "gradcam++".
        second_order: "detached" (thesis: CAM weights are constants) or "full" (create_graph).
        threshold: explanation map = saliency >= threshold * max (thesis: 0.5).
        temperature: of the soft threshold used inside the loss.
        class_weights: optional cross-entropy weights, one per class.
        clip_grad_norm: clip the global gradient norm to this value (None: no clipping).
        freeze_batchnorm: BatchNorm in eval mode during steps (per-sample CAMs; see cam.py).
        explain_classes: whose CAM the explanation loss shapes: "label" (the thesis: the
            feedback class), "predicted" (the class the model currently gives), or "all" (every
            class's CAM, losses averaged): the user's region is where the evidence for *any*
            class should come from, so a shortcut feeding a wrong class is penalised too.
        precision: "fp32", or "bf16" (autocast for the forward pass and the CAM; losses and
            the optimizer stay in float32).
        rrr_scale: multiplies the "rrr" penalty, whose raw size (squared input gradients per
            pixel) is orders of magnitude below the other losses; Ross et al. weighted it by
            1000 against cross-entropy for the same reason.
    """

    lam: float = 0.3
    explanation_loss: str = "jaccard"
    cam: str = "gradcam"
    second_order: str = "detached"
    threshold: float = 0.5
    temperature: float = 0.1
    class_weights: tuple[float, ...] | None = None
    clip_grad_norm: float | None = None
    freeze_batchnorm: bool = True
    precision: str = "fp32"
    rrr_scale: float = 1000.0
    explain_classes: str = "label"

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam: expected a value in [0, 1], got {self.lam!r}")
        if self.explanation_loss not in losses.EXPLANATION_LOSSES:
            raise ValueError(
                f"explanation_loss: expected one of {losses.EXPLANATION_LOSSES}, "
                f"got {self.explanation_loss!r}"
            )
        if self.cam not in cams.METHODS:
            raise ValueError(f"cam: expected one of {cams.METHODS}, got {self.cam!r}")
        if self.second_order not in cams.SECOND_ORDER:
            raise ValueError(
                f"second_order: expected one of {cams.SECOND_ORDER}, got {self.second_order!r}"
            )
        if self.explain_classes not in EXPLAIN_CLASSES:
            raise ValueError(
                f"explain_classes: expected one of {EXPLAIN_CLASSES}, got {self.explain_classes!r}"
            )
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision: expected 'fp32' or 'bf16', got {self.precision!r}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm: expected > 0 or None, got {self.clip_grad_norm!r}")


class FeedbackBatch(NamedTuple):
    """A batch of feedback: images (N, 3, H, W) in [0, 1], labels (N,), masks (N, H, W) in
    [0, 1] (binary, or a non-binary map for the "mse" loss), has_mask (N,) bool."""

    images: Tensor
    labels: Tensor
    masks: Tensor
    has_mask: Tensor

    def to(self, device: torch.device | str) -> FeedbackBatch:
        return FeedbackBatch(*(t.to(device, non_blocking=True) for t in self))


def explanation_losses(
    model: SelfExplaining, out, images: Tensor, batch: FeedbackBatch, cfg: FeedbackConfig
) -> Tensor:
    """Per-sample explanation loss (N,) for the forward output ``out`` of ``images``."""
    if cfg.explanation_loss == "rrr":
        grads = losses.input_gradients(out.logits, images)
        return cfg.rrr_scale * losses.rrr_loss(grads, batch.masks)
    if cfg.explain_classes == "label":
        # in training the CAM explains the feedback (ground-truth) class
        targets = [batch.labels]
    elif cfg.explain_classes == "predicted":
        targets = [out.logits.detach().argmax(dim=1)]
    else:
        targets = [torch.full_like(batch.labels, c) for c in range(out.logits.shape[1])]
    per_class = [
        _map_loss(
            cams.saliency_maps(
                out.logits,
                out.activations,
                t,
                images.shape[-2:],
                method=cfg.cam,
                second_order=cfg.second_order,
            ),
            batch.masks,
            cfg,
        )
        for t in targets
    ]
    return torch.stack(per_class).mean(dim=0)


def _map_loss(saliency: Tensor, masks: Tensor, cfg: FeedbackConfig) -> Tensor:
    saliency = saliency.float()
    if cfg.explanation_loss in ("jaccard", "dice"):
        soft = cams.soft_threshold(saliency, cfg.threshold, cfg.temperature)
        fn = losses.jaccard_loss if cfg.explanation_loss == "jaccard" else losses.dice_loss
        return fn(soft, masks)
    if cfg.explanation_loss == "energy":
        return losses.outside_energy_loss(saliency, masks)
    return losses.map_mse_loss(saliency, masks)


def _prepare(model: nn.Module, cfg: FeedbackConfig) -> None:
    model.train()
    if cfg.freeze_batchnorm:
        set_batchnorm_eval(model)


def _finish_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss: Tensor, cfg: FeedbackConfig
) -> tuple[bool, float]:
    """Backward and step unless the loss or gradient is non-finite; return (stepped, grad norm)."""
    optimizer.zero_grad(set_to_none=True)
    distributed = isinstance(model, nn.parallel.DistributedDataParallel)
    if not torch.isfinite(loss) and not distributed:
        return False, math.nan
    # Under DDP every rank must run backward (the gradient all-reduce is collective); a
    # non-finite loss on one rank then makes the averaged norm non-finite on all of them, so
    # they all skip together.
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm is not None else math.inf
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return False, norm
    optimizer.step()
    return True, norm


def _finish_step_on_device(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: Tensor,
    skip: Tensor,
    cfg: FeedbackConfig,
) -> tuple[Tensor, Tensor]:
    """The same without a host synchronisation: a fused optimizer (``fused=True``) is told to
    skip on the device through its ``found_inf`` flag, as torch.amp.GradScaler does."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm is not None else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    skip = skip | ~torch.isfinite(loss) | ~torch.isfinite(norm)
    optimizer.found_inf = skip.float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    return skip, norm


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """True for fused optimizers (``fused=True``), which can skip a step without a sync."""
    return bool(optimizer.defaults.get("fused"))


def feedback_step(
    model: SelfExplaining,
    batch: FeedbackBatch,
    optimizer: torch.optim.Optimizer,
    cfg: FeedbackConfig = FeedbackConfig(),
    *,
    sync: bool = True,
) -> dict[str, float]:
    """One optimizer step on a batch of class and explanation feedback.

    L = (1 - lambda) CE(logits, labels) + lambda mean_{samples with a mask} L_exp (eq. 4.1).
    A non-finite loss or gradient norm skips the step and leaves the weights (and the optimizer
    state) untouched; so does a batch with nothing to learn (lambda = 1 and no mask).

    Args:
        sync: return floats (the default). ``False`` returns 0-d tensors and, with a fused
            optimizer on a GPU, makes the whole step free of host synchronisation.

    Returns:
        ``loss``, ``loss_cls``, ``loss_exp``, ``n_exp`` (samples with a mask), ``grad_norm``,
        ``skipped`` (1 if the step was skipped for a non-finite value), ``empty`` (1 if there
        was nothing to learn).
    """
    _prepare(model, cfg)
    images = batch.images
    if cfg.explanation_loss == "rrr" and cfg.lam > 0:
        images = images.detach().requires_grad_(True)
    bf16 = cfg.precision == "bf16"
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(images)
        logits = out.logits.float()
        loss_cls = losses.classification_loss(logits, batch.labels, cfg.class_weights)
        present = losses.feedback_present(batch.masks, batch.has_mask)
        n_exp = present.sum()
        if cfg.lam > 0:
            per_sample = explanation_losses(model, out, images, batch, cfg)
            loss_exp = losses.masked_mean(per_sample.float(), present)
        else:
            loss_exp = loss_cls.new_zeros(())
    loss = losses.combined_loss(loss_cls, loss_exp, cfg.lam)
    empty = (n_exp == 0) & (cfg.lam == 1.0)
    if not sync and supports_device_skip(optimizer):
        skip, norm = _finish_step_on_device(model, optimizer, loss, empty, cfg)
        skipped = (skip & ~empty).float()
        return {
            "loss": loss.detach(),
            "loss_cls": loss_cls.detach(),
            "loss_exp": loss_exp.detach(),
            "n_exp": n_exp.float(),
            "skipped": skipped,
            "empty": empty.float(),
            "grad_norm": norm.detach(),
        }
    stats = {
        "loss": float(loss.detach()),
        "loss_cls": float(loss_cls.detach()),
        "loss_exp": float(loss_exp.detach()),
        "n_exp": float(n_exp),
        "skipped": 0.0,
        "empty": float(empty),
        "grad_norm": 0.0,
    }
    if stats["empty"] and not isinstance(model, nn.parallel.DistributedDataParallel):
        return stats
    stepped, norm = _finish_step(model, optimizer, loss, cfg)
    stats["grad_norm"] = norm
    stats["skipped"] = 0.0 if stepped else 1.0
    if not sync:
        return {k: torch.tensor(v) for k, v in stats.items()}
    return stats


def reference_step(
    model: SelfExplaining,
    batch: FeedbackBatch,
    optimizer: torch.optim.Optimizer,
    cfg: FeedbackConfig = FeedbackConfig(),
) -> dict[str, float]:
    """The thesis' Algorithm 2, literally: per sample, a deep-copied gradient instance.

    For each sample in turn (batch size 1): deep-copy the model, backpropagate the class score
    through the copy to get the Grad-CAM weights (constants), forward the sample through the real
    model, build the saliency from its activations and those weights, take the combined loss and
    step. ``cfg.second_order`` is ignored: the weights are always detached here. The explanation
    loss must be a map loss (not "rrr"). Returns the per-sample stats averaged over the batch.
    """
    if cfg.explanation_loss == "rrr":
        raise ValueError("reference_step implements Algorithm 2 (Grad-CAM); 'rrr' is not a CAM")
    _prepare(model, cfg)
    totals: dict[str, float] = {}
    n = batch.images.shape[0]
    for i in range(n):
        sample = FeedbackBatch(*(t[i : i + 1] for t in batch))
        present = losses.feedback_present(sample.masks, sample.has_mask)
        weights = None
        if cfg.lam > 0 and bool(present.any()):
            instance = copy.deepcopy(model)  # the "gradient instance" m_g
            g_out = instance(sample.images)
            score = g_out.logits[0, sample.labels[0]]
            grads = torch.autograd.grad(score, g_out.activations)
            weights = [
                cams._weights(g, a.detach(), cfg.cam)
                for g, a in zip(grads, g_out.activations, strict=True)
            ]
            del instance, g_out
        out = model(sample.images)
        loss_cls = losses.classification_loss(out.logits, sample.labels, cfg.class_weights)
        loss_exp = loss_cls.new_zeros(())
        if weights is not None:
            size = sample.images.shape[-2:]
            maps = [
                cams.scale_by_max(cams.upsample(torch.relu((w * a).sum(dim=1)), size))
                for w, a in zip(weights, out.activations, strict=True)
            ]
            saliency = maps[0] if len(maps) == 1 else cams.scale_by_max(torch.stack(maps).mean(0))
            loss_exp = losses.masked_mean(_map_loss(saliency, sample.masks, cfg), present)
        loss = losses.combined_loss(loss_cls, loss_exp, cfg.lam)
        stepped, norm = _finish_step(model, optimizer, loss, cfg)
        step_stats = {
            "loss": float(loss.detach()),
            "loss_cls": float(loss_cls.detach()),
            "loss_exp": float(loss_exp.detach()),
            "n_exp": float(present.sum()),
            "skipped": 0.0 if stepped else 1.0,
            "grad_norm": norm,
        }
        for k, v in step_stats.items():
            totals[k] = totals.get(k, 0.0) + v
    return {k: (v if k in ("n_exp", "skipped") else v / max(n, 1)) for k, v in totals.items()}


def iterate_batches(
    tensors: tuple[Tensor, ...], batch_size: int, *, shuffle: bool, generator=None
) -> Iterator[tuple[Tensor, ...]]:
    """Yield mini-batches of in-memory tensors (faster than a DataLoader for tensor data)."""
    n = tensors[0].shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield tuple(t[idx] for t in tensors)
