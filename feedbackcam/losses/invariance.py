"""Explanation losses that ask the prediction to be invariant: to a region the user marked as
"not this" (the ignore losses, issue 11; compared in docs/shortcuts.md), or to everything outside
the region marked as mattering (``surroundings``: decide from the lesion).

Each registers itself in :data:`feedbackcam.losses.EXPLANATION_LOSSES` on import (the package
imports this module). Each multiplies its loss by cfg.loss_scale through the step, so benchmark
and app can set lambda as a share of the gradient.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..counterfactual import (
    draw_symmetry,
    fill_region,
    marked_rows,
    moved_masks,
    randomize_region,
    surroundings_pairs,
    swap_surroundings,
    transplant,
)
from . import LossContext, LossSettings, feedback_present, host_count, register_loss

# A counterfactual loss: yields the rows it needs forwarded, receives their logits, returns the
# per-sample loss (ExplanationLoss.counterfactual).
Rows = Generator[Tensor, Tensor, Tensor]


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


@register_loss("counterexample", needs="ignore", counterfactual=True)
def _counterexample(inputs: LossContext, cfg: LossSettings) -> Rows:
    """Counterexamples (CE): cross-entropy on the image with its ignore region randomised."""
    logits = yield randomize_region(inputs.images.detach(), inputs.ignore)
    return _ce(logits, inputs.labels, cfg)


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
    images = inputs.images
    targets = torch.randint(0, inputs.logits.shape[1], inputs.labels.shape, device=images.device)
    score = inputs.logits.gather(1, targets[:, None]).sum()
    (grad,) = torch.autograd.grad(score, images, create_graph=True)
    region = _unkept(inputs)
    delta = images.detach() - fill_region(images.detach(), region)
    return (delta * grad * region[:, None]).flatten(1).sum(1).pow(2)


@register_loss("invariance", needs="ignore", counterfactual=True)
def _invariance(inputs: LossContext, cfg: LossSettings) -> Rows:
    """Counterfactual invariance: CE on the image with its ignore region filled by its median
    colour, plus KL(p(x) || p(x_filled))."""
    lf = yield fill_region(inputs.images.detach(), _unkept(inputs))
    return _ce(lf, inputs.labels, cfg) + _kl(inputs.logits, lf)


def _unkept(inputs: LossContext) -> Tensor:
    """The ignore masks less each image's own keep region: what the user marked as mattering is
    never filled, even where the two marks overlap."""
    return inputs.ignore * (inputs.keep <= 0).to(inputs.ignore.dtype)


def _symmetry(inputs: LossContext) -> int:
    """The symmetry code this step's moved regions are placed with: a random one of the square's
    eight with ``cfg.counterfactual_symmetries``, else 0 (where they lay)."""
    if not inputs.cfg.counterfactual_symmetries:
        return 0
    return draw_symmetry(tuple(inputs.images.shape))


class Moved(NamedTuple):
    """Per image: logits ``filled``, ``moved`` (recipient + artifact [, + fill]), and ``weight``
    (what its loss counts; 0 where no counterfactual was formed)."""

    recipients: Tensor
    filled: Tensor
    moved: list[Tensor]
    weight: Tensor


def _moved_logits(
    inputs: LossContext, *, blank: bool, fixed_filled: bool = False
) -> Generator[Tensor, Tensor, Moved]:
    """Logits of each marked artifact moved onto another image of the batch (the recipient's own
    marked region filled first; nothing lands on its keep region). Yields the rows to forward
    (none where nothing is marked) and receives their logits. ``fixed_filled``: the marked
    images filled are forwarded apart, without a graph (a target, not a row that learns): a
    forward and no backward for them."""
    images = inputs.images.detach()
    ignore = _unkept(inputs)
    n = images.shape[0]
    shift = int(torch.randint(1, max(n, 2), ()))
    recipients = (torch.arange(n, device=images.device) + shift) % n
    variants_per_row = 3 if blank else 2
    # Only marked rows get counterfactuals (at most counterfactual_share of the batch's).
    donors, w = marked_rows(
        feedback_present(ignore),
        inputs.cfg.counterfactual_share,
        variants_per_row,
        host_count(inputs, "ignore"),
    )
    weight = torch.zeros(n, device=images.device)
    rows = images[:0]  # none where nothing is marked
    if len(donors):
        weight[donors] = w
        r = recipients[donors]
        code = _symmetry(inputs)
        filled = fill_region(images[donors], ignore[donors])
        pasted, base = transplant(
            images, ignore, r, protect=inputs.keep, donors=donors, symmetry=code
        )
        variants = [pasted] if fixed_filled else [filled, pasted]
        if blank:
            variants.append(fill_region(base, moved_masks(ignore[donors], r, inputs.keep, code)))
        if fixed_filled:  # a target: forwarded here, without a graph
            with torch.no_grad():
                target = inputs.forward(filled)
        rows = torch.cat(variants)
    out = yield rows
    # rows without a counterfactual keep the step's own logits (the image, its recipient)
    same = [inputs.logits, *[inputs.logits[recipients]] * (variants_per_row - 1)]
    if len(donors) == 0:
        return Moved(recipients, same[0], same[1:], weight)
    parts = out.split(len(donors))
    if fixed_filled:
        parts = (target, *parts)
    lf, *moved = [s.index_copy(0, donors, o.to(s.dtype)) for s, o in zip(same, parts, strict=True)]
    return Moved(recipients, lf, moved, weight)


def _moved_artifacts(inputs: LossContext, *, blank: bool) -> Rows:
    """The fill term of "invariance", plus each marked artifact moved onto another image (CE
    with its label and a KL to it) [and, with ``blank``, the recipient with the region filled]."""
    recipients, lf, moved, weight = yield from _moved_logits(inputs, blank=blank)
    loss = _ce(lf, inputs.labels, inputs.cfg) + _kl(inputs.logits, lf)
    for lm in moved:
        loss = loss + _ce(lm, inputs.labels[recipients], inputs.cfg)
        loss = loss + _kl(lf[recipients], lm)
    return weight * loss


@register_loss("invariance_transplant", needs="ignore", counterfactual=True)
def _invariance_transplant(inputs: LossContext, cfg: LossSettings) -> Rows:
    """Invariance to the marked artifact: the fill term of "invariance", plus each artifact
    moved onto another image of the batch (labels unchanged) with CE and a KL to that image.

    The recipient's own marked region is filled first, so it carries one known artifact: the
    donor's. Filling alone can leave "a filled patch" as a cue; moving the artifact onto
    images of every class makes it useless as one.
    """
    return (yield from _moved_artifacts(inputs, blank=False))


def label_mass_weights(labels: Tensor, terms: Tensor, n_classes: int) -> Tensor:
    """Per-class weights that give each class, over the labelled ``terms``, the total weight of
    its share of the batch (``labels``): w_c = p_batch(c) * len(terms) / count_terms(c); 0 for a
    class with no term."""
    mass = torch.bincount(terms, minlength=n_classes).float()
    share = torch.bincount(labels, minlength=n_classes).float() / max(len(labels), 1)
    return torch.where(mass > 0, share * len(terms) / mass.clamp_min(1), torch.zeros_like(mass))


@register_loss("invariance_mass_balanced", needs="ignore", counterfactual=True)
def _invariance_mass_balanced(inputs: LossContext, cfg: LossSettings) -> Rows:
    """``invariance_transplant`` with its labelled terms re-weighted per batch so that each
    class's total weight is its share of the batch.

    The transplant labels the marked images with their artifact removed (on confounded data,
    mostly one class) and the recipients of the moved artifacts (any class), so the confounded
    class gets most of the label mass and the model drifts to it (docs/shortcuts.md). Weighting
    every labelled term by :func:`label_mass_weights` keeps the marked images' label, the signal
    that teaches the class without its artifact, at that class's share.
    """
    recipients, lf, (lm,), weight = yield from _moved_logits(inputs, blank=False)
    y, yr = inputs.labels, inputs.labels[recipients]
    donors = weight > 0
    w = label_mass_weights(y, torch.cat([y[donors], yr[donors]]), lf.shape[1]).to(lf.dtype)
    loss = w[y] * _ce(lf, y, cfg) + _kl(inputs.logits, lf)
    return weight * (loss + w[yr] * _ce(lm, yr, cfg) + _kl(lf[recipients], lm))


@register_loss("invariance_swap", needs="ignore", counterfactual=True)
def _invariance_swap(inputs: LossContext, cfg: LossSettings) -> Rows:
    """``invariance_transplant`` plus, for each recipient, the donor's region filled instead of
    pasted: every class then carries filled patches as often as pasted artifacts, so neither the
    artifact nor the filled rectangle that replaces it can become a cue."""
    return (yield from _moved_artifacts(inputs, blank=True))


@register_loss("invariance_balanced", needs="ignore", counterfactual=True)
def _invariance_balanced(inputs: LossContext, cfg: LossSettings) -> Rows:
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
    return (yield from _balanced(inputs, cfg, fixed_filled=False))


def _balanced(inputs: LossContext, cfg: LossSettings, *, fixed_filled: bool) -> Rows:
    """The terms of ``invariance_balanced`` (``fixed_filled``: those of ``invariance_target``)."""
    recipients, lf, (lp, lb), weight = yield from _moved_logits(
        inputs, blank=True, fixed_filled=fixed_filled
    )
    y = inputs.labels[recipients]
    ce = _ce(lp, y, cfg) + _ce(lb, y, cfg)
    return weight * (_kl(inputs.logits, lf) + ce + _kl(lb, lp))


@register_loss("invariance_target", needs="ignore", counterfactual=True)
def _invariance_target(inputs: LossContext, cfg: LossSettings) -> Rows:
    """``invariance_balanced`` with each marked image's filled version as a fixed target: the
    marked image's prediction is pulled towards what the model says without the artifact, never
    the other way round, and the filled images are forwarded without a graph (a step forwards and
    back-propagates two rows per drawn image instead of three).

    Why: in ``invariance_balanced`` the KL between a marked image and its filled self also
    moves the filled image towards the marked one, i.e. teaches "this filled region looks like
    the class the artifact stood for", the cue the loss exists to avoid (the same reason it puts
    no label on the filled image). A stop-gradient on one side, as in the consistency losses of
    semi-supervised learning, with the view *without* the artifact as the target;
    ``invariance_anchored`` is the opposite choice (the marked image fixed).

    Measured against ``invariance_balanced`` from the same baselines (docs/benchmarks.md, "Two
    more ways to a cheaper ignore step"): as good on Decoy-MNIST, isic-real and the demo's
    combined mode, worse on SynthDerm's validation flips, 3-7 % faster a fine-tune: not the
    default."""
    return (yield from _balanced(inputs, cfg, fixed_filled=True))


@register_loss("invariance_anchored", needs="ignore", counterfactual=True)
def _invariance_anchored(inputs: LossContext, cfg: LossSettings) -> Rows:
    """``invariance_balanced`` with the marked image's own prediction as a fixed anchor: its
    filled version is pulled towards what it says now (a KL with the prediction detached), never
    the other way round.

    Why: in ``invariance_balanced`` the KL between a marked image and its filled self moves
    both; on confounded data the marked images are mostly of the class the artifact stood for,
    and pulling their prediction towards the filled one (where the artifact no longer speaks)
    takes that class away from them, its evidence and its offset alike (experiments/
    bias_terms.py). Anchored, the filled image must find the class without the artifact.
    """
    recipients, lf, (lp, lb), weight = yield from _moved_logits(inputs, blank=True)
    y = inputs.labels[recipients]
    ce = _ce(lp, y, cfg) + _ce(lb, y, cfg)
    return weight * (_kl(inputs.logits.detach(), lf) + ce + _kl(lb, lp))


def _logit_gap(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared difference of two logit vectors, each centred over its classes, per sample.

    A change of a class's offset (the last layer's bias) moves both alike and cancels, and a
    constant added to a row is removed by the centring: the gap's gradient on the offsets is
    exactly zero."""
    a, b = a.float(), b.float()
    return ((a - a.mean(1, keepdim=True)) - (b - b.mean(1, keepdim=True))).pow(2).mean(1)


@register_loss("invariance_offset_free", needs="ignore", counterfactual=True)
def _invariance_offset_free(inputs: LossContext, cfg: LossSettings) -> Rows:
    """Invariance to the marked artifact that cannot move a class's offset: the counterfactuals
    of ``invariance_balanced`` (the marked image filled; its artifact moved onto another image
    and, on the same recipient, its region filled instead), compared by their logits, no label.

    Why: in ``invariance_balanced`` the terms on moved artifacts (the recipient's label on it, a
    KL between probabilities) are cheapest to satisfy by lowering the confounded class's offset
    for every image, which removes that class at the decision while its ranking survives
    (experiments/bias_terms.py, docs/real-artifacts.md). Logit gaps are blind to offsets, so
    only the features can answer them; what each class is stays the class loss's job.
    """
    recipients, lf, (lp, lb), weight = yield from _moved_logits(inputs, blank=True)
    return weight * (_logit_gap(inputs.logits, lf) + _logit_gap(lb, lp))


# ------------------------------------------------- a loss that learns from keep masks alone
# "Decide from the lesion": whatever lies outside the region the user marked as mattering (a
# ruler, ink, a patch, dark corners, gel) may change without changing the answer.

# The keep region is grown by this share of the image side before its surroundings are swapped
# (9 px at 256 px): the lesion's border and the skin right around it stay its own.
SURROUNDINGS_MARGIN = 0.035
# The loss that learns from keep masks this way by default (FeedbackConfig.surroundings_loss).
DEFAULT_SURROUNDINGS_LOSS = "surroundings"


@register_loss("surroundings", needs="keep", counterfactual=True)
def _surroundings(inputs: LossContext, cfg: LossSettings) -> Rows:
    """Decide from the lesion: each marked lesion on another marked image's surroundings (that
    image's lesion filled), its own label kept; CE on it and KL(p(x) || p(swapped)).

    Every lesion keeps its label and its class's share of the batch, so no class gains label
    mass; nothing is painted over a lesion (the receiver's keep region is kept, the donor's is
    filled). Artifacts the user never marked change with the surroundings, so none can decide.
    """
    pairs = surroundings_pairs(
        feedback_present(inputs.keep), inputs.cfg.counterfactual_share, host_count(inputs, "keep")
    )
    if pairs is None:  # no other marked image to borrow surroundings from
        yield inputs.images.detach()[:0]
        return inputs.logits.new_zeros(inputs.labels.shape)
    receivers, donors, w = pairs
    swapped, _ = swap_surroundings(
        inputs.images.detach(),
        inputs.keep,
        donors,
        SURROUNDINGS_MARGIN,
        receivers=receivers,
        symmetry=_symmetry(inputs),
    )
    ls = yield swapped
    loss = inputs.logits.new_zeros(inputs.labels.shape)
    y = inputs.labels[receivers]
    per = w * (_ce(ls, y, cfg) + _kl(inputs.logits[receivers], ls))
    return loss.index_copy(0, receivers, per.to(loss.dtype))
