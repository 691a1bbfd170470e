"""STAGING (moved into losses.py's registry once the lead's LossInputs API is merged)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import counterfactual as cf


def _kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p || q) per sample, from logits."""
    lp, lq = F.log_softmax(logits_p.float(), 1), F.log_softmax(logits_q.float(), 1)
    return (lp.exp() * (lp - lq)).sum(1)


def _cells(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A pixel mask (N, H, W) as the share of each (h, w) CAM cell it covers."""
    return F.adaptive_avg_pool2d(mask[:, None].float(), size)[:, 0]


def rrr_ignore(x, cfg) -> Tensor:
    """Ross et al. 2017 on the ignore region: sum of squared input gradients of sum_k log p_k
    inside the region the user marked as "must not matter"."""
    g = x.input_gradients()
    return (g.pow(2).sum(1) * x.ignore).flatten(1).sum(1)


def rrr_g(x, cfg) -> Tensor:
    """The typology's RRR-G: sum over pixels of (ignore mask x max-scaled Grad-CAM of the
    predicted class)^2, averaged per pixel so the scale does not grow with resolution."""
    pred = x.logits.detach().argmax(1)
    return (x.ignore * x.saliency(pred)).pow(2).flatten(1).mean(1)


def hint(x, cfg) -> Tensor:
    """HINT as in the typology: MSE between the true class's Grad-CAM and the keep mask."""
    return (x.saliency(x.labels) - x.keep).pow(2).flatten(1).mean(1)


def counterexample(x, cfg) -> Tensor:
    """CE (counterexamples): cross-entropy on the image with its ignore region randomised."""
    ce_images = cf.randomize_region(x.images.detach(), x.ignore)
    return F.cross_entropy(x.forward(ce_images).float(), x.labels, reduction="none")


def signed_evidence(x, cfg) -> Tensor:
    """Signed Grad-CAM evidence (sum_k w_k A_k, before the ReLU) inside the ignore region,
    squared: a shortcut must add nothing, for or against any class. A ReLU'd, max-scaled map of
    one class cannot see evidence below 50 % of its peak, nor evidence for another class
    (docs/results.md section 2). Every class counts: each step draws one class per sample
    at random, an unbiased estimate of the mean over classes at the cost of one gradient."""
    targets = torch.randint(0, x.logits.shape[1], x.labels.shape, device=x.labels.device)
    total = 0.0
    for raw in x.raw_cams(targets):
        m = _cells(x.ignore, raw.shape[-2:])
        total = total + (m * raw.float()).pow(2).flatten(1).sum(1)
    return total


def invariance(x, cfg) -> Tensor:
    """Counterfactual invariance: CE on the image with its ignore region filled by the
    image's median colour, plus KL(p(x) || p(x_filled))."""
    filled = cf.fill_region(x.images.detach(), x.ignore)
    lf = x.forward(filled)
    return F.cross_entropy(lf.float(), x.labels, reduction="none") + _kl(x.logits, lf)


def invariance_transplant(x, cfg) -> Tensor:
    """:func:`invariance`, plus each marked artifact moved onto another image of the batch
    (the recipient's own marked region filled first; its label kept): CE on the result and
    KL(p(recipient) || p(recipient + artifact)). Filling alone leaves "a filled rectangle" as a
    cue; moving the artifact makes it appear on every class."""
    images = x.images.detach()
    n = images.shape[0]
    recipients = (torch.arange(n, device=images.device) + torch.randint(1, max(n, 2), ())) % n
    filled = cf.fill_region(images, x.ignore)
    pasted, _ = cf.transplant(images, x.ignore, recipients)
    logits = x.forward(torch.cat([filled, pasted])).float()
    lf, lp = logits[:n], logits[n:]
    y_rec = x.labels[recipients]
    fill_term = F.cross_entropy(lf, x.labels, reduction="none") + _kl(x.logits, lf)
    move_term = F.cross_entropy(lp, y_rec, reduction="none") + _kl(lf[recipients], lp)
    return fill_term + move_term


STAGED = {
    "rrr_ignore": (rrr_ignore, "ignore"),
    "rrr_g": (rrr_g, "ignore"),
    "hint": (hint, "keep"),
    "counterexample": (counterexample, "ignore"),
    "signed_evidence": (signed_evidence, "ignore"),
    "invariance": (invariance, "ignore"),
    "invariance_transplant": (invariance_transplant, "ignore"),
}
