"""Classification and explanation-feedback losses (thesis section 3.6 and eq. 4.1).

Explanation losses are per-sample: each returns an (N,) tensor, and :func:`masked_mean` averages
it over the samples that carry explanation feedback. A sample with no feedback mask (``has_mask``
False) or an empty mask adds no explanation loss: an empty mask says "nothing here", which no
saliency can match, so it is treated as missing rather than as a target.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cam import soft_threshold
from ..data.dataset import feedback_present  # noqa: F401  (losses.feedback_present)

MASK_KINDS = ("keep", "ignore")


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


def host_count(inputs, kind: str) -> int | None:
    """How many of the step's rows carry feedback of ``kind`` ("keep" or "ignore"), counted on
    the host before the batch reached the device (``FeedbackBatch.counts``); None where unknown.
    It sizes the counterfactual rows on an accelerator without a host synchronisation."""
    counts = getattr(inputs, "counts", None)
    return None if counts is None else counts[0 if kind == "keep" else 1]


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


# --------------------------------------------------------------------------- the registry


class LossSettings(Protocol):
    """The settings an explanation loss may read (``feedbackcam.objective.FeedbackConfig``)."""

    @property
    def threshold(self) -> float: ...  # the explanation map: saliency >= threshold * max

    @property
    def temperature(self) -> float: ...  # of the soft threshold inside the loss

    @property
    def rrr_scale(self) -> float: ...

    @property
    def class_weights(self) -> Sequence[float] | None: ...

    @property
    def counterfactual_share(self) -> float | None: ...  # most counterfactual rows per term

    @property
    def counterfactual_symmetries(self) -> bool: ...  # moved regions turned / mirrored at random


class LossContext(Protocol):
    """What an explanation loss may use of one training step; provided lazily by
    :class:`feedbackcam.objective.LossInputs` (a CAM or input gradients cost only when asked).

    Attributes:
        images: (N, 3, H, W) the step's images (requiring grad for input-gradient losses).
        logits: (N, C) float, in the graph.
        labels: (N,) the feedback classes.
        keep: (N, H, W) keep masks (zeros where there is none).
        ignore: (N, H, W) ignore masks (zeros where there is none), or None.
        cfg: the step's :class:`LossSettings`.
    """

    images: Tensor
    logits: Tensor
    labels: Tensor
    keep: Tensor
    ignore: Tensor | None

    @property
    def cfg(self) -> LossSettings: ...

    def saliency(self, targets: Tensor | None = None) -> Tensor:
        """Input-sized CAM in [0, 1] of ``targets`` (default: the labels), differentiable."""
        ...

    def saliencies(self) -> list[Tensor]:
        """The saliency of every class the loss shapes (``cfg.explain_classes``)."""
        ...

    def raw_cams(self, targets: Tensor) -> list[Tensor]:
        """Signed class evidence per explanation layer (N, h, w), before the ReLU."""
        ...

    def input_gradients(self) -> Tensor:
        """d/dx sum_k log p_k (N, 3, H, W), in the graph."""
        ...

    def forward(self, images: Tensor) -> Tensor:
        """Float logits of a second forward pass (e.g. counterfactual images)."""
        ...


# An explanation loss: per-sample values (N,) from one step's context and settings.
LossFn = Callable[[LossContext, LossSettings], Tensor]


@dataclass(frozen=True)
class ExplanationLoss:
    """A registered explanation loss.

    Attributes:
        fn: ``fn(inputs, cfg) -> (N,)`` per-sample loss (a :data:`LossFn`): ``inputs`` is the
            step's :class:`LossContext`, ``cfg`` its :class:`LossSettings`.
        needs: the feedback mask it learns from: "keep" (the region that matters) or "ignore"
            (a region that must not matter). Samples without that mask add no loss.
        input_gradients: the step must make the images require grad (input-gradient losses).
        saliency_only: a function of the explained classes' saliency maps and the mask alone
            (what the thesis' Algorithm 2, ``reference_step``, can compute).
        summary: one line for ``--help`` and the docs.
        counterfactual: ``fn`` is a generator that yields, once, the counterfactual images it
            needs forwarded (built from the images and masks only, before the step's forward:
            it may not read ``inputs.logits`` before its yield), receives their logits (float)
            and returns the per-sample loss. On an accelerator the step forwards those rows
            together with the batch, in one forward, on a CPU on their own
            (:func:`feedbackcam.objective.feedback_loss`); outside a step :func:`run_loss`
            forwards them on their own.
    """

    fn: LossFn | None
    needs: str
    input_gradients: bool = False
    saliency_only: bool = False
    summary: str = ""
    counterfactual: bool = False


# The explanation losses by name. Adding one is one decorated function in this package; the
# FeedbackConfig validates against this table and the CLI and the app list its keys.
EXPLANATION_LOSSES: dict[str, ExplanationLoss] = {}


def register_loss(
    name: str,
    *,
    needs: str,
    input_gradients: bool = False,
    saliency_only: bool = False,
    counterfactual: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Decorator: register ``fn(inputs, cfg) -> (N,)`` as the explanation loss ``name``
    (``counterfactual``: a generator, see :class:`ExplanationLoss`)."""
    if needs not in MASK_KINDS:
        raise ValueError(f"needs: expected one of {MASK_KINDS}, got {needs!r}")

    def add(fn: LossFn) -> LossFn:
        if counterfactual and not inspect.isgeneratorfunction(fn):
            raise TypeError(f"{name}: a counterfactual loss yields its rows (a generator)")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        EXPLANATION_LOSSES[name] = ExplanationLoss(
            fn, needs, input_gradients, saliency_only, summary, counterfactual
        )
        return fn

    return add


def finish(rows_loss: Generator[Tensor, Tensor, Tensor], logits: Tensor) -> Tensor:
    """Send a counterfactual loss (a generator past its one yield) the logits of its rows and
    return its per-sample loss."""
    try:
        rows_loss.send(logits)
    except StopIteration as done:
        return done.value
    raise RuntimeError("a counterfactual loss yields its rows once")


def run_loss(entry: ExplanationLoss, inputs: LossContext, cfg: LossSettings) -> Tensor:
    """``entry``'s per-sample loss outside a training step: a counterfactual loss's rows are
    forwarded on their own (``inputs.forward``)."""
    if not entry.counterfactual:
        return entry.fn(inputs, cfg)
    return drive(entry.fn(inputs, cfg), inputs)


def drive(rows_loss: Generator[Tensor, Tensor, Any], inputs: LossContext) -> Any:
    """Run a generator that yields rows once (a counterfactual loss or one of its parts),
    forwarding its rows on their own; its return value."""
    return finish(rows_loss, inputs.forward(next(rows_loss)))


def get_loss(name: str) -> ExplanationLoss:
    """The registered loss ``name``; ``ValueError`` if it is unknown or has no function."""
    entry = EXPLANATION_LOSSES.get(name)
    if entry is None:
        raise ValueError(
            f"explanation_loss: expected one of {tuple(EXPLANATION_LOSSES)}, got {name!r}"
        )
    if not callable(entry.fn):
        raise ValueError(f"explanation_loss {name!r} is registered but has no loss function")
    if entry.needs not in MASK_KINDS:
        raise ValueError(f"explanation_loss {name!r}: needs {entry.needs!r}, not in {MASK_KINDS}")
    return entry


def _over_targets(inputs: LossContext, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn`` of the saliency of every explained class (``cfg.explain_classes``), averaged."""
    return torch.stack([fn(s.float()) for s in inputs.saliencies()]).mean(dim=0)


@register_loss("jaccard", needs="keep", saliency_only=True)
def _jaccard(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """The thesis' squared soft-Jaccard loss of the soft-thresholded CAM vs the keep mask."""
    return _over_targets(
        inputs,
        lambda s: jaccard_loss(soft_threshold(s, cfg.threshold, cfg.temperature), inputs.keep),
    )


@register_loss("dice", needs="keep", saliency_only=True)
def _dice(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """Soft Dice loss of the soft-thresholded CAM vs the keep mask."""
    return _over_targets(
        inputs,
        lambda s: dice_loss(soft_threshold(s, cfg.threshold, cfg.temperature), inputs.keep),
    )


@register_loss("energy", needs="keep", saliency_only=True)
def _energy(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """Share of the CAM's energy outside the keep mask."""
    return _over_targets(inputs, lambda s: outside_energy_loss(s, inputs.keep))


@register_loss("mse", needs="keep", saliency_only=True)
def _mse(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """Mean squared error of the CAM to a (possibly non-binary) keep map."""
    return _over_targets(inputs, lambda s: map_mse_loss(s, inputs.keep))


@register_loss("rrr", needs="keep", input_gradients=True)
def _rrr(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """Ross et al.'s input-gradient penalty outside the keep mask (times cfg.rrr_scale)."""
    return cfg.rrr_scale * rrr_loss(inputs.input_gradients(), inputs.keep)


# The loss that learns from "ignore" feedback by default (FeedbackConfig.ignore_loss): the
# shortcut benchmark's winner (docs/shortcuts.md).
DEFAULT_IGNORE_LOSS = "invariance_balanced"

# ------------------------------------------ the typology's saliency and gradient losses (issue 11)


def _cells(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A pixel mask (N, H, W) as the share of each (h, w) CAM cell it covers."""
    return F.adaptive_avg_pool2d(mask[:, None].float(), tuple(size))[:, 0]


@register_loss("rrr_ignore", needs="ignore", input_gradients=True)
def _rrr_ignore(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """Ross et al. 2017 on the ignore region: squared input gradients of sum_k log p_k there."""
    g = inputs.input_gradients()
    return (g.pow(2).sum(1) * inputs.ignore).flatten(1).sum(1)


@register_loss("rrr_g", needs="ignore")
def _rrr_g(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """The typology's RRR-G: (ignore mask x max-scaled Grad-CAM of the predicted class)^2."""
    pred = inputs.logits.detach().argmax(1)
    return (inputs.ignore * inputs.saliency(pred)).pow(2).flatten(1).mean(1)


@register_loss("hint", needs="keep")
def _hint(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """HINT as in the typology: MSE between the true class's Grad-CAM and the keep mask."""
    return (inputs.saliency(inputs.labels) - inputs.keep).pow(2).flatten(1).mean(1)


@register_loss("signed_evidence", needs="ignore")
def _signed_evidence(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """Signed Grad-CAM evidence (before the ReLU) of a random class inside the ignore region,
    squared: the shortcut must add nothing, for or against any class.

    A ReLU'd, max-scaled map of one class cannot see evidence below 50 % of its peak, nor
    evidence for another class (docs/results.md section 2). One class per sample per step,
    drawn at random, is an unbiased estimate of the mean over classes at the cost of one
    gradient.
    """
    n_classes = inputs.logits.shape[1]
    targets = torch.randint(0, n_classes, inputs.labels.shape, device=inputs.labels.device)
    total = inputs.logits.new_zeros(inputs.labels.shape)
    for raw in inputs.raw_cams(targets):
        m = _cells(inputs.ignore, raw.shape[-2:])
        total = total + (m * raw.float()).pow(2).flatten(1).sum(1)
    return total


# The losses that learn by counterfactuals (ignore feedback, and "decide from the lesion") live
# in their own module; importing it registers them.
from .invariance import (  # noqa: E402, F401
    DEFAULT_SURROUNDINGS_LOSS,
    SURROUNDINGS_MARGIN,
    label_mass_weights,
)
