"""Classification and explanation-feedback losses (thesis section 3.6 and eq. 4.1).

Explanation losses are per-sample: each returns an (N,) tensor, and :func:`masked_mean` averages
it over the samples that carry explanation feedback. A sample with no feedback mask (``has_mask``
False) or an empty mask adds no explanation loss: an empty mask says "nothing here", which no
saliency can match, so it is treated as missing rather than as a target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .cam import soft_threshold

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
    """

    fn: LossFn | None
    needs: str
    input_gradients: bool = False
    saliency_only: bool = False
    summary: str = ""


# The explanation losses by name. Adding one is one decorated function in this file; the
# FeedbackConfig validates against this table and the CLI and the app list its keys.
EXPLANATION_LOSSES: dict[str, ExplanationLoss] = {}


def register_loss(
    name: str, *, needs: str, input_gradients: bool = False, saliency_only: bool = False
) -> Callable[[LossFn], LossFn]:
    """Decorator: register ``fn(inputs, cfg) -> (N,)`` as the explanation loss ``name``."""
    if needs not in MASK_KINDS:
        raise ValueError(f"needs: expected one of {MASK_KINDS}, got {needs!r}")

    def add(fn: LossFn) -> LossFn:
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        EXPLANATION_LOSSES[name] = ExplanationLoss(
            fn, needs, input_gradients, saliency_only, summary
        )
        return fn

    return add


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

# ------------------------------------------------- losses that learn from "ignore" feedback
# (issue 11; compared in docs/shortcuts.md). Each multiplies its loss by cfg.loss_scale through
# the step, so benchmark and app can set lambda as a share of the gradient.


def _ce(logits: Tensor, labels: Tensor, cfg: LossSettings) -> Tensor:
    """Per-sample cross-entropy of a counterfactual, weighted by ``cfg.class_weights`` (the
    fine-tuning's class weights, when it has them) so that the counterfactual terms see the
    same class balance as the classification term."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    weights = cfg.class_weights
    if weights is None:
        return ce
    w = torch.as_tensor(weights, dtype=ce.dtype, device=ce.device)
    return ce * w[labels]


def _kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p || q) per sample, from logits."""
    lp, lq = F.log_softmax(logits_p.float(), 1), F.log_softmax(logits_q.float(), 1)
    return (lp.exp() * (lp - lq)).sum(1)


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


@register_loss("counterexample", needs="ignore")
def _counterexample(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """Counterexamples (CE): cross-entropy on the image with its ignore region randomised."""
    from .counterfactual import randomize_region

    images = randomize_region(inputs.images.detach(), inputs.ignore)
    return _ce(inputs.forward(images), inputs.labels, cfg)


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


@register_loss("region_contribution", needs="ignore", input_gradients=True)
def _region_contribution(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """CDEP-style: the marked region's first-order contribution to a random class's logit,
    sum over the region of (x - x_filled) * d logit / dx, squared.

    Contextual decomposition (Rieger et al. 2020) splits a logit into the part due to a region
    and the rest by propagating both through the network, a pass per layer type; the
    gradient-times-difference above is the first term of the same split's Taylor expansion, at
    the cost of one double backward. One class per sample per step, drawn at random, estimates
    the mean over classes (as ``signed_evidence`` does).
    """
    from .counterfactual import fill_region

    images = inputs.images
    targets = torch.randint(0, inputs.logits.shape[1], inputs.labels.shape, device=images.device)
    score = inputs.logits.gather(1, targets[:, None]).sum()
    (grad,) = torch.autograd.grad(score, images, create_graph=True)
    region = _unkept(inputs)
    delta = images.detach() - fill_region(images.detach(), region)
    return (delta * grad * region[:, None]).flatten(1).sum(1).pow(2)


@register_loss("invariance", needs="ignore")
def _invariance(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """Counterfactual invariance: CE on the image with its ignore region filled by its median
    colour, plus KL(p(x) || p(x_filled))."""
    from .counterfactual import fill_region

    lf = inputs.forward(fill_region(inputs.images.detach(), _unkept(inputs)))
    return _ce(lf, inputs.labels, cfg) + _kl(inputs.logits, lf)


def _unkept(inputs: LossContext) -> Tensor:
    """The ignore masks less each image's own keep region: what the user marked as mattering is
    never filled, even where the two marks overlap."""
    return inputs.ignore * (inputs.keep <= 0).to(inputs.ignore.dtype)


class Moved(NamedTuple):
    """Per image: logits ``filled``, ``moved`` (recipient + artifact [, + fill]), and ``weight``
    (what its loss counts; 0 where no counterfactual was formed)."""

    recipients: Tensor
    filled: Tensor
    moved: list[Tensor]
    weight: Tensor


def _moved_logits(inputs: LossContext, *, blank: bool) -> Moved:
    """Logits of each marked artifact moved onto another image of the batch (the recipient's own
    marked region filled first; nothing lands on its keep region)."""
    from .counterfactual import fill_region, marked_rows, moved_masks, transplant

    images = inputs.images.detach()
    ignore = _unkept(inputs)
    n = images.shape[0]
    shift = int(torch.randint(1, max(n, 2), ()))
    recipients = (torch.arange(n, device=images.device) + shift) % n
    same = [inputs.logits, *[inputs.logits[recipients]] * (2 if blank else 1)]
    # Only marked rows get counterfactuals (at most counterfactual_share of the batch's).
    donors, w = marked_rows(feedback_present(ignore), inputs.cfg.counterfactual_share, len(same))
    weight = inputs.logits.new_zeros(n)
    if len(donors) == 0:
        return Moved(recipients, same[0], same[1:], weight)
    weight[donors] = w
    r = recipients[donors]
    filled = fill_region(images[donors], ignore[donors])
    pasted, base = transplant(images, ignore, r, protect=inputs.keep, donors=donors)
    variants = [filled, pasted]
    if blank:
        variants.append(fill_region(base, moved_masks(ignore[donors], r, inputs.keep)))
    out = inputs.forward(torch.cat(variants)).split(len(donors))
    lf, *moved = [s.index_copy(0, donors, o.to(s.dtype)) for s, o in zip(same, out, strict=True)]
    return Moved(recipients, lf, moved, weight)


def _moved_artifacts(inputs: LossContext, *, blank: bool) -> Tensor:
    """The fill term of "invariance", plus each marked artifact moved onto another image (CE
    with its label and a KL to it) [and, with ``blank``, the recipient with the region filled]."""
    recipients, lf, moved, weight = _moved_logits(inputs, blank=blank)
    loss = _ce(lf, inputs.labels, inputs.cfg) + _kl(inputs.logits, lf)
    for lm in moved:
        loss = loss + _ce(lm, inputs.labels[recipients], inputs.cfg)
        loss = loss + _kl(lf[recipients], lm)
    return weight * loss


@register_loss("invariance_transplant", needs="ignore")
def _invariance_transplant(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """Invariance to the marked artifact: the fill term of "invariance", plus each artifact
    moved onto another image of the batch (labels unchanged) with CE and a KL to that image.

    The recipient's own marked region is filled first, so it carries one known artifact: the
    donor's. Filling alone can leave "a filled patch" as a cue; moving the artifact onto
    images of every class makes it useless as one.
    """
    return _moved_artifacts(inputs, blank=False)


def label_mass_weights(labels: Tensor, terms: Tensor, n_classes: int) -> Tensor:
    """Per-class weights that give each class, over the labelled ``terms``, the total weight of
    its share of the batch (``labels``): w_c = p_batch(c) * len(terms) / count_terms(c); 0 for a
    class with no term."""
    mass = torch.bincount(terms, minlength=n_classes).float()
    share = torch.bincount(labels, minlength=n_classes).float() / max(len(labels), 1)
    return torch.where(mass > 0, share * len(terms) / mass.clamp_min(1), torch.zeros_like(mass))


@register_loss("invariance_mass_balanced", needs="ignore")
def _invariance_mass_balanced(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """``invariance_transplant`` with its labelled terms re-weighted per batch so that each
    class's total weight is its share of the batch.

    The transplant labels the marked images with their artifact removed (on confounded data,
    mostly one class) and the recipients of the moved artifacts (any class), so the confounded
    class gets most of the label mass and the model drifts to it (docs/shortcuts.md). Weighting
    every labelled term by :func:`label_mass_weights` keeps the marked images' label, the signal
    that teaches the class without its artifact, at that class's share.
    """
    recipients, lf, (lm,), weight = _moved_logits(inputs, blank=False)
    y, yr = inputs.labels, inputs.labels[recipients]
    donors = weight > 0
    w = label_mass_weights(y, torch.cat([y[donors], yr[donors]]), lf.shape[1]).to(lf.dtype)
    loss = w[y] * _ce(lf, y, cfg) + _kl(inputs.logits, lf)
    return weight * (loss + w[yr] * _ce(lm, yr, cfg) + _kl(lf[recipients], lm))


@register_loss("invariance_swap", needs="ignore")
def _invariance_swap(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """``invariance_transplant`` plus, for each recipient, the donor's region filled instead of
    pasted: every class then carries filled patches as often as pasted artifacts, so neither the
    artifact nor the filled rectangle that replaces it can become a cue."""
    return _moved_artifacts(inputs, blank=True)


@register_loss("invariance_balanced", needs="ignore")
def _invariance_balanced(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """Invariance from class-free counterfactuals only: each marked artifact is moved onto
    another image of the batch (any class, its own marked region filled first) and, on the same
    recipient, its region is filled instead; cross-entropy on both with the recipient's label and
    a KL between them. The donor's own prediction must not change when its artifact is filled:
    a KL, with no label.

    Why no label on the filled donor: the donors are the images the user marked, and on
    confounded data they are mostly of one class; cross-entropy on them teaches "a filled
    rectangle means that class", a new shortcut (docs/shortcuts.md, SynthDerm). Here the
    artifact and the fill each appear with the labels of random recipients only.
    """
    recipients, lf, (lp, lb), weight = _moved_logits(inputs, blank=True)
    y = inputs.labels[recipients]
    ce = _ce(lp, y, cfg) + _ce(lb, y, cfg)
    return weight * (_kl(inputs.logits, lf) + ce + _kl(lb, lp))


@register_loss("invariance_anchored", needs="ignore")
def _invariance_anchored(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """``invariance_balanced`` with the marked image's own prediction as a fixed anchor: its
    filled version is pulled towards what it says now (a KL with the prediction detached), never
    the other way round.

    Why: in ``invariance_balanced`` the KL between a marked image and its filled self moves
    both; on confounded data the marked images are mostly of the class the artifact stood for,
    and pulling their prediction towards the filled one (where the artifact no longer speaks)
    takes that class away from them, its evidence and its offset alike (experiments/
    bias_terms.py). Anchored, the filled image must find the class without the artifact.
    """
    recipients, lf, (lp, lb), weight = _moved_logits(inputs, blank=True)
    y = inputs.labels[recipients]
    ce = _ce(lp, y, cfg) + _ce(lb, y, cfg)
    return weight * (_kl(inputs.logits.detach(), lf) + ce + _kl(lb, lp))


# ------------------------------------------------- a loss that learns from keep masks alone
# "Decide from the lesion": whatever lies outside the region the user marked as mattering (a
# ruler, ink, a patch, dark corners, gel) may change without changing the answer.

# The keep region is grown by this share of the image side before its surroundings are swapped
# (9 px at 256 px): the lesion's border and the skin right around it stay its own.
SURROUNDINGS_MARGIN = 0.035
# The loss that learns from keep masks this way by default (FeedbackConfig.surroundings_loss).
DEFAULT_SURROUNDINGS_LOSS = "surroundings"


@register_loss("surroundings", needs="keep")
def _surroundings(inputs: LossContext, cfg: LossSettings) -> Tensor:
    """Decide from the lesion: each marked lesion on another marked image's surroundings (that
    image's lesion filled), its own label kept; CE on it and KL(p(x) || p(swapped)).

    Every lesion keeps its label and its class's share of the batch, so no class gains label
    mass; nothing is painted over a lesion (the receiver's keep region is kept, the donor's is
    filled). Artifacts the user never marked change with the surroundings, so none can decide.
    """
    from .counterfactual import surroundings_pairs, swap_surroundings

    loss = inputs.logits.new_zeros(inputs.labels.shape)
    pairs = surroundings_pairs(feedback_present(inputs.keep), inputs.cfg.counterfactual_share)
    if pairs is None:  # no other marked image to borrow surroundings from
        return loss
    receivers, donors, w = pairs
    swapped, _ = swap_surroundings(
        inputs.images.detach(), inputs.keep, donors, SURROUNDINGS_MARGIN, receivers=receivers
    )
    ls = inputs.forward(swapped)
    y = inputs.labels[receivers]
    per = w * (_ce(ls, y, cfg) + _kl(inputs.logits[receivers], ls))
    return loss.index_copy(0, receivers, per.to(loss.dtype))
