"""TEMPORARY stand-in for the lead's LossInputs / feedback_step (deleted at the merge)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cam as cams
from .shortcut_losses import STAGED


class FeedbackBatch(NamedTuple):
    images: Tensor
    labels: Tensor
    masks: Tensor
    has_mask: Tensor
    ignore: Tensor | None = None
    has_ignore: Tensor | None = None


@dataclass(frozen=True)
class FeedbackConfig:
    lam: float = 0.5
    explanation_loss: str = "rrr_ignore"
    cam: str = "gradcam"
    second_order: str = "detached"
    loss_scale: float = 1.0


class LossInputs:
    def __init__(self, model, images, out, labels, keep, ignore, cfg):
        self.model, self.images, self.labels = model, images, labels
        self.logits, self.activations = out.logits, out.activations
        self.keep, self.ignore, self.cfg = keep, ignore, cfg

    def saliency(self, targets):
        return cams.saliency_maps(
            self.logits,
            self.activations,
            targets,
            self.images.shape[-2:],
            method=self.cfg.cam,
            second_order=self.cfg.second_order,
        )

    def raw_cams(self, targets):
        score = self.logits.gather(1, targets[:, None]).sum()
        full = self.cfg.second_order == "full"
        grads = torch.autograd.grad(score, self.activations, create_graph=full, retain_graph=True)
        return [
            ((g if full else g.detach()).mean((2, 3), keepdim=True) * a).sum(1)
            for g, a in zip(grads, self.activations)
        ]

    def input_gradients(self):
        logp = F.log_softmax(self.logits.float(), 1)
        (g,) = torch.autograd.grad(logp.sum(), self.images, create_graph=True)
        return g

    def forward(self, images):
        return self.model(images).logits


def feedback_step(model, batch: FeedbackBatch, optimizer, cfg: FeedbackConfig) -> dict:
    model.train()
    fn, needs = STAGED[cfg.explanation_loss]
    images = batch.images
    if cfg.explanation_loss == "rrr_ignore":
        images = images.detach().requires_grad_(True)
    out = model(images)
    loss_cls = F.cross_entropy(out.logits.float(), batch.labels)
    if needs == "ignore":
        present = batch.has_ignore & (batch.ignore.flatten(1).amax(1) > 0)
    else:
        present = batch.has_mask & (batch.masks.flatten(1).amax(1) > 0)
    if cfg.lam > 0 and bool(present.any()):
        x = LossInputs(model, images, out, batch.labels, batch.masks, batch.ignore, cfg)
        per = fn(x, cfg)
        w = present.float()
        loss_exp = cfg.loss_scale * (per * w).sum() / w.sum().clamp_min(1)
    else:
        loss_exp = loss_cls.new_zeros(())
    loss = (1 - cfg.lam) * loss_cls + cfg.lam * loss_exp
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": float(loss), "loss_cls": float(loss_cls), "loss_exp": float(loss_exp)}
