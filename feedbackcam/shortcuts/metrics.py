"""Shortcut metrics: does the model still use the confounder the user marked?

- accuracy on the confounded test set, on its unconfounded (counterfactual) version, and where
  the confounder points at a wrong class;
- the counterfactual flip rate: the share of test predictions that change when the confounder is
  removed (the same image rendered without it; :func:`feedbackcam.evaluate.flip_rate`);
- the wrong-reason score WR of the typology (Friedrich et al. 2023) for Grad-CAM and for input
  gradients;
- the mean Jaccard of the thresholded Grad-CAM against a keep mask where there is one;
- per-class sensitivity and AUC, with and without the confounder;
- where the confounder stands for one class (isic-real's patch → NV): the share of other
  classes' images it turns into that class, and how far it pushes them towards it in log-odds
  (independent of the class's offset); and the same flip with the confounder's region filled
  with the image's median colour instead: what any change there does, no object in it (a
  model near its decision boundary flips for that too; docs/real-artifacts.md).

Predictions come from :func:`feedbackcam.evaluate.predict_probs`, as everywhere else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import cam as cams
from ..counterfactual import fill_region
from ..evaluate import flip_rate, predict_probs
from ..metrics import classification_metrics, jaccard_per_image
from ..self_explaining import SelfExplaining
from .data import ShortcutEval

# Images per forward pass of the metrics (CPU-friendly; the numbers do not depend on it).
BATCH = 64


def wrong_reason_score(attributions, confounder_masks, threshold: float | None = None) -> float:
    """The typology's WR in percent: how much of the confounder the attribution lights up.

    Each attribution's positive part is scaled to [0, 1] by its own maximum; the threshold is the
    mean of those maps over all images and pixels (the test set's mean attribution) unless given;
    per image WR is the share of the confounder mask's pixels above the threshold; the result is
    the mean over the images with a non-empty mask, x 100. Lower is better: 100 for attribution
    that lives only on the confounder, 0 for attribution that never touches it.

    Args:
        attributions: (N, H, W) array or tensor, any sign (only the positive part counts).
        confounder_masks: (N, H, W), > 0 on the confounder.
        threshold: fixed threshold in [0, 1] instead of the mean attribution.
    """
    a = torch.as_tensor(np.asarray(attributions, dtype=np.float32))
    m = torch.as_tensor(np.asarray(confounder_masks)) > 0
    if a.ndim != 3 or a.shape != m.shape:
        raise ValueError(
            f"attributions and confounder_masks: expected one (N, H, W) shape, got "
            f"{tuple(a.shape)} and {tuple(m.shape)}"
        )
    scaled = cams.scale_by_max(a.clamp_min(0))
    t = float(scaled.mean()) if threshold is None else float(threshold)
    above = ((scaled > t) & m).flatten(1).sum(1).float()
    size = m.flatten(1).sum(1).float()
    has = size > 0
    if not has.any():
        return math.nan
    return float((above[has] / size[has]).mean() * 100)


def gradcam_attribution(
    model: SelfExplaining, images: Tensor, targets: Tensor | None = None, batch_size: int = 64
) -> Tensor:
    """Grad-CAM (N, H, W) in [0, 1] of the predicted class (or ``targets``), no graph kept."""
    model.eval()
    maps = []
    for i in range(0, len(images), batch_size):
        with torch.enable_grad():
            out = model(images[i : i + batch_size])
            t = None if targets is None else targets[i : i + batch_size]
            s = cams.saliency_maps(
                out.logits, out.activations, t, images.shape[-2:], retain_graph=False
            )
        maps.append(s.detach())
    return torch.cat(maps)


def input_gradient_attribution(
    model: SelfExplaining, images: Tensor, batch_size: int = 64
) -> Tensor:
    """|d log p_pred / dx| summed over channels, (N, H, W): the input-gradient explanation."""
    model.eval()
    maps = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].detach().requires_grad_(True)
        with torch.enable_grad():
            logp = F.log_softmax(model(x).logits.float(), 1)
            score = logp.gather(1, logp.argmax(1, keepdim=True)).sum()
            (g,) = torch.autograd.grad(score, x)
        maps.append(g.abs().sum(1))
    return torch.cat(maps)


@dataclass(frozen=True)
class ShortcutScores:
    acc: float
    acc_clean: float
    acc_misleads: float
    flip_rate: float
    wr_gradcam: float
    wr_inputgrad: float
    jaccard: float
    avg_sens: float = math.nan
    sens: tuple[float, ...] = ()
    sens_clean: tuple[float, ...] = ()
    auc_clean: tuple[float, ...] = ()
    avg_sens_clean: float = math.nan
    flip_to_target: float = math.nan
    target_shift: float = math.nan
    flip_to_target_filled: float = math.nan
    by_artifact: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        for k in ("sens", "sens_clean", "auc_clean"):
            out[k] = list(getattr(self, k))
        return out


def flip_to(pred: Tensor, pred_clean: Tensor, labels: Tensor, has: Tensor, target: int) -> float:
    """Share of the images of other classes than ``target`` that carry the confounder and are
    called ``target`` with it but not without it (e.g. melanomas called "NV" once a patch is
    pasted beside them)."""
    rows = has & (labels != target)
    if not rows.any():
        return math.nan
    return float(((pred[rows] == target) & (pred_clean[rows] != target)).float().mean())


def target_shift(
    probs: Tensor, probs_clean: Tensor, labels: Tensor, has: Tensor, target: int
) -> float:
    """How far the confounder pushes the images of other classes than ``target`` towards it:
    the mean change of the target's log-odds, log p_t - log(1 - p_t), from the clean image to
    the one with the confounder (0: no push; positive: towards ``target``).

    Unlike :func:`flip_to` it does not depend on where the decision lies: adding a constant to
    the target's logit (a model that calls the class more or less often) leaves it unchanged,
    so a fine-tune that only lowers NV's offset does not look like one that stopped reading
    the patch."""
    rows = has & (labels != target)
    if not rows.any():
        return math.nan

    def log_odds(p: Tensor) -> Tensor:
        pt = p[rows, target].double().clamp(1e-12, 1 - 1e-12)
        return pt.log() - (1 - pt).log()

    return float((log_odds(probs) - log_odds(probs_clean)).mean())


def artifact_accuracy(correct: np.ndarray, flags: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Per annotated artifact: [accuracy on the images with it, on those without, how many
    have it] (NaN where a group is empty)."""
    out = {}
    for name, has in flags.items():
        has = np.asarray(has, bool)
        with_it = float(correct[has].mean()) if has.any() else math.nan
        without = float(correct[~has].mean()) if (~has).any() else math.nan
        out[name] = [with_it, without, int(has.sum())]
    return out


def shortcut_scores(model: SelfExplaining, data: ShortcutEval) -> ShortcutScores:
    """Every shortcut metric of ``model`` on one test set (see the module docstring).

    WR is computed over the test images that carry a confounder, with the threshold at the mean
    attribution over those images.
    """
    images, labels, confounder = data.images, data.labels, data.confounder
    probs = predict_probs(model, images, batch_size=BATCH)
    pred = probs.argmax(1)
    probs_clean = predict_probs(model, data.clean_images, batch_size=BATCH)
    pred_clean = probs_clean.argmax(1)
    correct = pred == labels
    names = [str(k) for k in range(probs.shape[1])]
    scores = classification_metrics(labels.numpy(), probs.numpy(), names)
    clean = classification_metrics(labels.numpy(), probs_clean.numpy(), names)
    has = confounder.flatten(1).amax(1) > 0
    cam = gradcam_attribution(model, images)
    grads = input_gradient_attribution(model, images)
    jac = jaccard_per_image(cams.hard_threshold(cam).numpy(), data.data.masks).mean
    mis = torch.from_numpy(np.asarray(data.misleads, bool))
    return ShortcutScores(
        acc=float(correct.float().mean()),
        acc_clean=float((pred_clean == labels).float().mean()),
        acc_misleads=float(correct[mis].float().mean()) if mis.any() else math.nan,
        flip_rate=flip_rate(pred[has], pred_clean[has]),
        wr_gradcam=wrong_reason_score(cam[has], confounder[has]),
        wr_inputgrad=wrong_reason_score(grads[has], confounder[has]),
        jaccard=float(jac),
        avg_sens=scores.avg_sensitivity,
        sens=tuple(scores.sensitivity().values()),
        sens_clean=tuple(clean.sensitivity().values()),
        auc_clean=tuple(m.auc for m in clean.per_class.values()),
        avg_sens_clean=clean.avg_sensitivity,
        flip_to_target=math.nan
        if data.target is None
        else flip_to(pred, pred_clean, labels, has, data.target),
        target_shift=math.nan
        if data.target is None
        else target_shift(probs, probs_clean, labels, has, data.target),
        flip_to_target_filled=math.nan
        if data.target is None
        else flip_to(
            filled_pred(model, data.clean_images, data.confounder),
            pred_clean,
            labels,
            has,
            data.target,
        ),
        by_artifact=artifact_accuracy((pred_clean == labels).numpy(), data.flags),
    )


def filled_pred(model: SelfExplaining, images: Tensor, region: Tensor) -> Tensor:
    """Predictions on ``images`` with ``region`` filled by each image's median colour outside
    it (:func:`~feedbackcam.counterfactual.fill_region`): the region changed, nothing in it."""
    return predict_probs(model, fill_region(images, region), batch_size=BATCH).argmax(1)


def val_scores(model: SelfExplaining, val: ShortcutEval) -> dict[str, float]:
    """What a user can see on confounded validation data whose confounders they marked:
    accuracy, and, with each marked region filled by its image's median colour
    (:func:`~feedbackcam.counterfactual.fill_region`, no oracle render), the average and
    per-class sensitivity and specificity and the share of predictions that change (the
    validation flip rate; NaN where no validation image carries a marked confounder) and, where
    the confounder stands for a class (``val.target``), the share of the other classes' images
    called that class with it and not with it filled (``val_flip_to_target``: the direction of
    the flips, which the flip rate does not read)."""
    images, labels, confounder = val.images, val.labels, val.confounder
    probs = predict_probs(model, images, batch_size=BATCH)
    pred = probs.argmax(1)
    filled = filled_pred(model, images, confounder)
    has = confounder.flatten(1).amax(1) > 0
    names = [str(k) for k in range(probs.shape[1])]
    on_filled = classification_metrics(
        labels.numpy(), F.one_hot(filled, probs.shape[1]).numpy(), names
    )
    return {
        "val_acc": float((pred == labels).float().mean()),
        "val_flip": flip_rate(pred[has], filled[has]),
        "val_flip_to_target": math.nan
        if val.target is None
        else flip_to(pred, filled, labels, has, val.target),
        "val_avg_sens_filled": on_filled.avg_sensitivity,
        "val_sens_filled": list(on_filled.sensitivity().values()),
        "val_spec_filled": [m.specificity for m in on_filled.per_class.values()],
        "val_counts": np.bincount(labels.numpy(), minlength=probs.shape[1]).tolist(),
    }
