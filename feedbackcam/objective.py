"""The feedback objective in one place: what a step minimises, and from what.

L = (1 - lambda) L_cls + lambda L_exp (eq. 4.1), where L_exp is a list of *loss terms*, each a
registered explanation loss (:data:`feedbackcam.losses.EXPLANATION_LOSSES`) averaged over the
samples that carry the kind of mask it learns from and multiplied by its scale:

- the explanation loss (``FeedbackConfig.explanation_loss``, scale ``loss_scale``): the thesis'
  Jaccard loss on keep masks by default: what the explanation should look like;
- the surroundings loss (``surroundings_loss``, scale ``surroundings_scale``), added where the
  batch carries keep masks: "decide from the lesion", the answer may not depend on what lies
  outside the region that matters;
- the ignore loss (``ignore_loss``, scale ``ignore_scale``), added where the batch carries ignore
  masks: the answer may not depend on the marked region.

The last two are *added terms* (:data:`ADDED_TERMS`): each is left out when the explanation loss
already learns from its kind of mask, and each scale is calibrated by the loops that own a
fine-tuning when it is None.

:class:`FeedbackConfig` says how feedback becomes a loss, :class:`LossInputs` is what a loss may
use of one forward pass (the :class:`feedbackcam.losses.LossContext` it is typed against), and
:func:`feedback_loss` computes every term of one batch. :func:`feedbackcam.train.feedback_step`
is that loss, backward and an optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import cam as cams
from . import counterfactual, losses
from .data.dataset import FeedbackBatch
from .self_explaining import SelfExplaining

# The terms added to the explanation loss: (loss field, scale field, the masks it learns from).
ADDED_TERMS = (
    ("surroundings_loss", "surroundings_scale", "keep"),
    ("ignore_loss", "ignore_scale", "ignore"),
)

EXPLAIN_CLASSES = ("label", "predicted", "all")


def check_counterfactual_share(share: float | None) -> None:
    """``FeedbackConfig.counterfactual_share``'s range, (0, 1] or None: a ValueError naming it
    otherwise (the benchmark's config and the command line check theirs with it)."""
    if share is not None and not (0 < share <= 1):
        raise ValueError(f"counterfactual_share: expected a value in (0, 1] or None, got {share!r}")


@dataclass(frozen=True)
class FeedbackConfig:
    """How feedback becomes a loss. Defaults reproduce the thesis' combined runs.

    Attributes:
        lam: lambda of eq. 4.1; 0 = class feedback only, 1 = explanation feedback only.
        explanation_loss: a key of ``losses.EXPLANATION_LOSSES``: "jaccard" (eq. 3.6), "dice",
            "energy" (saliency share outside the mask), "rrr" (input-gradient penalty), "mse"
            (to a non-binary feedback map), and the losses that learn from ignore masks.
        cam: a key of ``cam.CAM_METHODS`` ("gradcam", "gradcam++"); training, model selection
            and evaluation all use it.
        second_order: "detached" (thesis: CAM weights are constants) or "full" (create_graph).
        threshold: explanation map = saliency >= threshold * max (thesis: 0.5).
        temperature: of the soft threshold used inside the loss.
        class_weights: optional cross-entropy weights, one per class.
        clip_grad_norm: clip the global gradient norm to this value (None: no clipping).
        freeze_batchnorm: BatchNorm in eval mode during steps (per-sample CAMs; see cam.py).
        recalibrate_batchnorm: with ``freeze_batchnorm``, re-estimate BatchNorm's running
            statistics on the training images after each epoch (and after an app update), so
            that they describe the weights the steps moved (:func:`feedbackcam.train.
            recalibrate_batchnorm`). A model without BatchNorm (the thesis' VGG16) is unchanged.
        surroundings_loss: a loss that learns from keep masks what must *not* decide (default
            "surroundings": the lesion on other images' surroundings, labels kept), added for
            the samples that carry a keep mask; None: keep masks feed the explanation loss
            alone (the thesis' runs: ``--surroundings-loss none``).
        surroundings_scale: multiplies it; None: calibrated like ``ignore_scale``.
        ignore_loss: a loss that learns from ignore masks ("this must not matter"), added to
            the explanation loss for the samples that carry one; None: ignore masks are unused
            (unless ``explanation_loss`` itself learns from them). Without ignore feedback in
            the data it adds nothing, so the thesis' runs are unchanged.
        ignore_scale: multiplies the ignore loss; None (the default): the loops that own a
            fine-tuning (``simulate``, the app's updates) calibrate it before their first step
            so that its gradient equals the class loss's at the start
            (:func:`feedbackcam.balance.auto_scaled`); a bare :func:`feedback_step` uses 1.
        explain_classes: whose CAM the explanation loss shapes: "label" (the thesis: the
            feedback class), "predicted" (the class the model currently gives), or "all" (every
            class's CAM, losses averaged): the user's region is where the evidence for *any*
            class should come from, so a shortcut feeding a wrong class is penalised too.
        precision: "fp32", or "bf16" (autocast for the forward pass and the CAM; losses and
            the optimizer stay in float32).
        rrr_scale: multiplies the "rrr" penalty, whose raw size (squared input gradients per
            pixel) is orders of magnitude below the other losses; Ross et al. weighted it by
            1000 against cross-entropy for the same reason.
        loss_scale: multiplies the explanation loss (every one), so that lambda can mean the
            explanation term's share of the gradient rather than of raw loss sizes; set it with
            :func:`feedbackcam.balance.calibrate_loss_scale` (the two terms' gradients equal
            at the start, as Ross et al. advise) instead of hand-tuned constants.
        counterfactual_share: the most counterfactual rows a term that builds them (the
            surroundings loss, the invariance losses) forwards per step, as a share of the
            batch; when more rows are marked, that many are drawn at random and weighted so
            that the mean stays unbiased (:func:`feedbackcam.counterfactual.counterfactual_rows`):
            the same loss in expectation at a bounded cost. None: every marked row. The default,
            0.5, keeps an ignore-feedback step at about 1.5x a classification-only one on a CPU
            (docs/benchmarks.md); at batch 1 nothing is sampled.
        counterfactual_symmetries: the regions the counterfactual terms move between images
            (a marked artifact onto another image, another image's surroundings around a
            lesion) are turned or mirrored first, by one of the square's eight symmetries
            drawn at random each step (:func:`feedbackcam.counterfactual.turned`): an artifact
            must not matter wherever and however it lies, not only where it lay on the marked
            images.
        auto_scale: let the training loops that own a whole fine-tuning (``simulate``, the
            app's updates) set ``loss_scale`` before their first step with
            :func:`feedbackcam.balance.auto_scaled`: the explanation term's gradient then
            equals the class loss's at the start, and lambda is the explanation share of the
            gradient (the shortcut benchmark's protocol, docs/shortcuts.md). Off by default:
            the thesis weighted raw losses.
        refit_bias: where the feedback marks ignore regions and lambda > 0, the loops that own
            a fine-tuning re-fit the last layer's bias on the images they trained on, those
            regions filled (:func:`feedbackcam.decision.refit_bias`, with ``class_weights``):
            ``simulate`` judges (and keeps) each epoch with re-fit offsets and trains on from
            its own; the app re-fits after an update's steps. Invariance to an artifact that
            stood for one class lowers that class's offset for every image; the re-fit gives
            that class back, but moves the operating point, and the artifact then flips more
            predictions (docs/offsets.md: the demo's combined mode 0.09 -> 0.19). Off by
            default; no effect without ignore masks.
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
    recalibrate_batchnorm: bool = True
    precision: str = "fp32"
    rrr_scale: float = 1000.0
    explain_classes: str = "label"
    loss_scale: float = 1.0
    surroundings_loss: str | None = losses.DEFAULT_SURROUNDINGS_LOSS
    surroundings_scale: float | None = None
    ignore_loss: str | None = losses.DEFAULT_IGNORE_LOSS
    ignore_scale: float | None = None
    counterfactual_share: float | None = 0.5
    counterfactual_symmetries: bool = False
    auto_scale: bool = False
    refit_bias: bool = False

    @classmethod
    def thesis(cls, **overrides) -> FeedbackConfig:
        """The thesis' objective: the explanation loss alone, no added terms (no surroundings
        or ignore loss); ``overrides`` set any other field."""
        return cls(**({"surroundings_loss": None, "ignore_loss": None} | overrides))

    @property
    def recalibrates_batchnorm(self) -> bool:
        """Whether training re-estimates BatchNorm's statistics after its steps: they were
        frozen during them (``freeze_batchnorm``) and ``recalibrate_batchnorm`` is on."""
        return self.freeze_batchnorm and self.recalibrate_batchnorm

    @property
    def refits_offsets(self) -> bool:
        """Whether a fine-tuning with this objective re-fits the decision's offsets where the
        feedback marks ignore regions (``refit_bias``, an ignore loss, lambda > 0)."""
        return self.refit_bias and self.lam > 0 and self.ignore_loss is not None

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam: expected a value in [0, 1], got {self.lam!r}")
        losses.get_loss(self.explanation_loss)  # unknown or unwired: ValueError
        cams.check_method(self.cam)
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
        check_counterfactual_share(self.counterfactual_share)
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm: expected > 0 or None, got {self.clip_grad_norm!r}")
        for name in ("loss_scale", *(scale for _, scale, _ in ADDED_TERMS)):
            value = getattr(self, name)
            if value is None and name != "loss_scale":
                continue
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: expected a finite value > 0, got {value!r}")
        for field, _, kind in ADDED_TERMS:
            name = getattr(self, field)
            if name is not None and losses.get_loss(name).needs != kind:
                raise ValueError(
                    f"{field}: expected a loss that learns from {kind} masks, got {name!r} "
                    f"(needs {losses.get_loss(name).needs} masks)"
                )


def _given(masks: Tensor, flags: Tensor | None) -> Tensor:
    """``masks`` with the rows whose flag is off zeroed."""
    if flags is None:
        return masks
    return masks * flags.to(device=masks.device, dtype=masks.dtype)[:, None, None]


class LossInputs:
    """What an explanation loss may use, computed lazily from one forward pass.

    Attributes:
        model, images, logits (float), activations, labels, cfg: the step's forward pass.
        keep: (N, H, W) keep masks (the region that matters; zeros where there is none or its
            flag ``has_mask`` is off).
        ignore: (N, H, W) ignore masks (a region that must not matter; zeros where its flag
            ``has_ignore`` is off), or None.
    """

    def __init__(self, model, out, images: Tensor, batch: FeedbackBatch, cfg: FeedbackConfig):
        self.model, self.images, self.cfg = model, images, cfg
        self._logits: Tensor | None = None
        if out is not None:
            self.set_forward(out)
        self.labels = batch.labels
        self.counts = batch.counts  # host counts of the rows with feedback (or None)
        # A mask whose flag is off is not feedback: it is neither learnt from nor protected,
        # and no counterfactual is built from it (the flags decide, not the arrays).
        self.keep = _given(batch.masks, batch.has_mask)
        self.ignore = None if batch.ignore is None else _given(batch.ignore, batch.has_ignore)
        self._input_grads: Tensor | None = None

    def set_forward(self, out) -> None:
        """The step's forward pass; its first ``len(images)`` rows are the batch's (the rest,
        counterfactual rows that rode along, are the terms' own)."""
        n = self.images.shape[0]
        self._logits = out.logits[:n].float()
        self.activations = out.activations  # all rows: the CAM's gradient flows through them
        self._rows = n

    @property
    def logits(self) -> Tensor:
        if self._logits is None:
            raise RuntimeError(
                "the step's logits are not computed yet: a counterfactual loss must yield its "
                "rows before it reads them"
            )
        return self._logits

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def targets(self) -> list[Tensor]:
        """The classes whose CAM the loss shapes (``cfg.explain_classes``)."""
        if self.cfg.explain_classes == "label":
            return [self.labels]  # in training the CAM explains the feedback class
        if self.cfg.explain_classes == "predicted":
            return [self.logits.detach().argmax(dim=1)]
        return [torch.full_like(self.labels, c) for c in range(self.logits.shape[1])]

    def saliency(self, targets: Tensor | None = None) -> Tensor:
        """Input-sized CAM in [0, 1] of ``targets`` (default: the labels), differentiable."""
        return cams.saliency_maps(
            self.logits,
            self.activations,
            self.labels if targets is None else targets,
            self.size,
            method=self.cfg.cam,
            second_order=self.cfg.second_order,
        )[: self._rows]

    def saliencies(self) -> list[Tensor]:
        """The saliency of every class in :meth:`targets`."""
        return [self.saliency(t) for t in self.targets()]

    def raw_cams(self, targets: Tensor) -> list[Tensor]:
        """Signed class evidence ``sum_k w_k A_k`` per layer (N, h, w), before the ReLU."""
        maps = cams.layer_cams(
            self.logits,
            self.activations,
            targets,
            method=self.cfg.cam,
            second_order=self.cfg.second_order,
            rectify=False,
        )
        return [m[: self._rows] for m in maps]

    def input_gradients(self) -> Tensor:
        """d/dx sum_k log p_k (N, 3, H, W), in the graph; computed once per step."""
        if self._input_grads is None:
            self._input_grads = losses.input_gradients(self.logits, self.images)
        return self._input_grads

    def forward(self, images: Tensor) -> Tensor:
        """Logits (float) of a second forward pass, e.g. on counterfactual images."""
        if images.shape[0] == 0:
            return self.logits.new_zeros((0, self.logits.shape[1]))
        return self.model(images).logits.float()


def present_mask(batch: FeedbackBatch, needs: str) -> Tensor:
    """Boolean (N,): the sample carries the kind of mask a loss ``needs`` ("keep"/"ignore")."""
    if needs == "keep":
        return losses.feedback_present(batch.masks, batch.has_mask)
    if batch.ignore is None:
        return torch.zeros_like(batch.has_mask, dtype=torch.bool)
    return losses.feedback_present(batch.ignore, batch.has_ignore)


def check_feedback_kind(cfg: FeedbackConfig, has_keep: bool, has_ignore: bool) -> None:
    """Refuse a loss that cannot learn from the feedback at hand (``ValueError`` naming what it
    needs): e.g. an ignore-mask loss on data with only keep masks."""
    if cfg.lam == 0:
        return
    needs = losses.get_loss(cfg.explanation_loss).needs
    if not {"keep": has_keep, "ignore": has_ignore}[needs]:
        have = [k for k, v in (("keep", has_keep), ("ignore", has_ignore)) if v] or ["no"]
        raise ValueError(
            f"explanation_loss {cfg.explanation_loss!r} needs {needs} masks, but the feedback "
            f"has {' and '.join(have)} masks"
        )


@dataclass(frozen=True)
class LossTerm:
    """One term of the explanation loss: a registered loss, its name, and its scale."""

    name: str
    loss: losses.ExplanationLoss
    scale: float

    @property
    def needs(self) -> str:
        return self.loss.needs


def loss_terms(cfg: FeedbackConfig, batch: FeedbackBatch) -> list[LossTerm]:
    """The terms of L_exp for ``batch``: the explanation loss, then each added term
    (:data:`ADDED_TERMS`) the config names: the surroundings loss (rows without a keep mask add
    nothing), and the ignore loss where the batch carries ignore masks and the explanation loss
    does not learn from them itself. A term that is the explanation loss is not added twice.

    Raises:
        ValueError: lambda > 0 and the explanation loss needs ignore masks the batch lacks.
    """
    main = losses.get_loss(cfg.explanation_loss)
    if cfg.lam > 0 and main.needs == "ignore" and batch.ignore is None:
        raise ValueError(
            f"explanation_loss {cfg.explanation_loss!r} needs ignore masks; the batch has none"
        )
    terms = [LossTerm(cfg.explanation_loss, main, cfg.loss_scale)]
    for field, scale_field, kind in ADDED_TERMS:
        name, scale = getattr(cfg, field), getattr(cfg, scale_field)
        if name is None or name == cfg.explanation_loss:
            continue
        if kind == "ignore" and (batch.ignore is None or main.needs == "ignore"):
            continue  # no ignore masks, or the explanation loss learns from them itself
        terms.append(LossTerm(name, losses.get_loss(name), 1.0 if scale is None else scale))
    return terms


class FeedbackLoss(NamedTuple):
    """The objective of one batch (0-d tensors in the graph where they can be).

    Attributes:
        loss: (1 - lambda) ``loss_cls`` + lambda ``loss_exp``.
        loss_cls: the (class-weighted) cross-entropy.
        loss_exp: the sum of the scaled terms; 0 at lambda 0 (no term is computed).
        n_exp: samples that carry a mask some term learns from.
        terms: each term's scaled value by name (empty at lambda 0).
    """

    loss: Tensor
    loss_cls: Tensor
    loss_exp: Tensor
    n_exp: Tensor
    terms: dict[str, Tensor]


def _unused(where: Tensor, count: int | None = None) -> bool:
    """True when no row needs a term and knowing so costs no host synchronisation: the flags
    are on the CPU, or the batch's rows with feedback were counted on the host before it went
    to the device (``count``, ``FeedbackBatch.counts``). Otherwise (a GPU-resident batch of
    unknown counts) every term runs and is masked instead (no data-dependent branch); a term no
    row needs costs a whole explanation pass for nothing (docs/benchmarks.md)."""
    if count is not None:
        return count == 0
    return not counterfactual.fixed_shapes(where.device) and not bool(where.any())


def rows_ride_along(model: nn.Module, device: torch.device) -> bool:
    """Whether the counterfactual terms' rows share the batch's forward pass.

    On an accelerator, yes: one larger forward instead of one per term (fewer kernel launches,
    a fuller device). On a CPU, no: a forward per term measured as fast or faster there
    (docs/benchmarks.md: together was 1.03-1.21x slower for the demo's small CNN, 1.00-1.04x
    for EfficientNet-Lite0 at 224 px). Never where a layer mixes a batch's rows (BatchNorm in
    training mode): the rows would change the batch's statistics.
    """
    if device.type == "cpu":
        return False
    return not any(isinstance(m, _BatchNorm) and m.training for m in model.modules())


def feedback_loss(model: SelfExplaining, batch: FeedbackBatch, cfg: FeedbackConfig) -> FeedbackLoss:
    """The combined loss of eq. 4.1 on ``batch``: one forward pass (under bf16 autocast if
    ``cfg.precision`` says so), the cross-entropy, and every :func:`loss_terms` term averaged
    over the samples that carry its kind of mask (:func:`feedbackcam.losses.masked_mean`).

    The counterfactual terms (``ExplanationLoss.counterfactual``) build their rows first; on an
    accelerator those rows ride in the same forward as the batch, concatenated after it (one
    pass, no host synchronisation added), on a CPU each term's rows get a forward of their own
    (:func:`rows_ride_along` says why). Both give the same loss and gradients.

    The model is used as it is (train or eval mode): :func:`feedbackcam.train.feedback_step`
    prepares it.
    """
    terms = loss_terms(cfg, batch)
    images = batch.images
    if cfg.lam > 0 and any(t.loss.input_gradients for t in terms):
        images = images.detach().requires_grad_(True)
    bf16 = cfg.precision == "bf16"
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        present = [present_mask(batch, t.needs) for t in terms]
        n_exp = present[0]
        for p in present[1:]:
            n_exp = n_exp | p
        n_exp = n_exp.sum()
        inputs = LossInputs(model, None, images, batch, cfg)
        unused = [_unused(w, losses.host_count(batch, t.needs)) for t, w in zip(terms, present)]
        # The counterfactual terms build their rows first, so that they can ride in the
        # batch's forward (rows_ride_along decides).
        pending: dict[int, tuple] = {}
        if cfg.lam > 0:
            for k, term in enumerate(terms):
                if term.loss.counterfactual and not unused[k]:
                    rows_loss = term.loss.fn(inputs, cfg)
                    pending[k] = (rows_loss, next(rows_loss))
        together = bool(pending) and rows_ride_along(model, images.device)
        rows = [r for _, r in pending.values()] if together else []
        out = model(torch.cat([images, *rows]) if rows else images)
        inputs.set_forward(out)
        logits = inputs.logits
        loss_cls = losses.classification_loss(logits, batch.labels, cfg.class_weights)
        values: dict[str, Tensor] = {}
        if cfg.lam > 0:
            ridden = iter(out.logits[images.shape[0] :].float().split([len(r) for r in rows]))
            loss_exp = None
            for k, (term, where) in enumerate(zip(terms, present, strict=True)):
                if unused[k]:
                    value = loss_cls.new_zeros(())  # what masked_mean gives, at no cost
                else:
                    if k in pending:
                        rows_loss, own = pending[k]
                        theirs = next(ridden) if together else inputs.forward(own)
                        per_sample = losses.finish(rows_loss, theirs).float()
                    else:
                        per_sample = term.loss.fn(inputs, cfg).float()
                    value = term.scale * losses.masked_mean(per_sample, where)
                values[term.name] = value
                loss_exp = value if loss_exp is None else loss_exp + value
        else:
            loss_exp = loss_cls.new_zeros(())
    loss = losses.combined_loss(loss_cls, loss_exp, cfg.lam)
    return FeedbackLoss(loss, loss_cls, loss_exp, n_exp, values)
