"""One feedback training step, the thesis' reference step, and the loops around them.

:func:`feedback_step` is one optimizer step on a batch of (images, labels, keep masks, ignore
masks): the objective of :mod:`feedbackcam.objective` (one forward pass, the CAM through
``torch.autograd.grad``, the combined loss of eq. 4.1), backward, step. No copy of the model is
made. Batch size 1 (online learning, as the thesis) and mini-batches both work.
:func:`reference_step` follows the thesis' Algorithm 2 literally (a deep-copied "gradient
instance" per sample) and exists as a speed baseline and a correctness check. :func:`run_steps`
(the steps), :func:`train_one_epoch` (one shuffled pass) and :func:`train_epochs` (the epochs)
are the one training loop that base training, the simulations, the shortcut benchmark and the
app's updates share; :class:`BestEpoch` keeps the best model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import cam as cams
from . import losses
from .batchnorm_fold import folded_batchnorm
from .data.dataset import FeedbackBatch, TensorData
from .distributed import SINGLE, Dist, local_batch_size, shard_order, sum_across, unwrap
from .objective import FeedbackConfig, feedback_loss, loss_terms
from .self_explaining import SelfExplaining, set_batchnorm_eval

log = logging.getLogger(__name__)


class _GivenSaliency:
    """Loss inputs for a saliency computed elsewhere (the reference step's gradient instance);
    enough for the losses registered as ``saliency_only``."""

    def __init__(self, saliency: Tensor, keep: Tensor) -> None:
        self.keep, self._saliency = keep, saliency

    def saliencies(self) -> list[Tensor]:
        return [self._saliency]


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
    loss, loss_cls, loss_exp, n_exp, _ = feedback_loss(model, batch, cfg)
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
    entry = losses.get_loss(cfg.explanation_loss)
    if not entry.saliency_only:
        raise ValueError(
            f"reference_step implements Algorithm 2 (a CAM vs the keep mask); "
            f"{cfg.explanation_loss!r} is not such a loss"
        )
    terms = loss_terms(cfg, batch)
    if len(terms) > 1:
        added = ", ".join(t.name for t in terms[1:])
        raise ValueError(
            "reference_step implements Algorithm 2, one loss (a CAM vs the keep mask); this "
            f"config and batch add {added}: set surroundings_loss=None and ignore_loss=None"
        )
    _prepare(model, cfg)
    totals: dict[str, float] = {}
    n = batch.images.shape[0]
    for i in range(n):
        sample = batch.index(slice(i, i + 1))
        present = losses.feedback_present(sample.masks, sample.has_mask)
        weights = None
        if cfg.lam > 0 and bool(present.any()):
            instance = copy.deepcopy(model)  # the "gradient instance" m_g
            g_out = instance(sample.images)
            score = g_out.logits[0, sample.labels[0]]
            grads = torch.autograd.grad(score, g_out.activations)
            weights = [
                cams.cam_weights(g, a.detach(), cfg.cam)
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
            per_sample = entry.fn(_GivenSaliency(saliency, sample.masks), cfg)
            loss_exp = cfg.loss_scale * losses.masked_mean(per_sample, present)
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


# --------------------------------------------------------------------------- the loop


def class_weights(labels: np.ndarray, n_classes: int) -> tuple[float, ...]:
    """Inverse-frequency cross-entropy weights, normalised so a balanced set gets all ones."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes).astype(float)
    return tuple(float(w) for w in counts.sum() / np.maximum(counts, 1) / n_classes)


def run_steps(
    model: nn.Module,
    batches: Iterable[FeedbackBatch],
    optimizer: torch.optim.Optimizer,
    cfg: FeedbackConfig,
    *,
    device: torch.device | str = "cpu",
    augment: Callable[[FeedbackBatch], FeedbackBatch] | None = None,
    should_stop: Callable[[], bool] | None = None,
    ctx: Dist = SINGLE,
) -> dict[str, float]:
    """:func:`feedback_step` on each batch in turn; the mean loss and the skipped-step count.

    Statistics are summed on the device and read once at the end, so on a GPU with a fused
    optimizer the steps run without host synchronisation. Distributed (``ctx``), the sums are
    reduced across ranks. ``should_stop`` is asked before every step; when it says so the loop
    raises :class:`StopTraining` (the app's updater stops this way). With
    ``cfg.freeze_batchnorm`` the steps run each convolution and the BatchNorm after it as one
    convolution (:func:`feedbackcam.batchnorm_fold.folded_batchnorm`: the same loss and
    gradients, to float rounding, without BatchNorm's own passes).
    """
    total = torch.zeros((), device=device)
    weight = torch.zeros((), device=device)
    skipped = torch.zeros((), device=device)
    steps = 0
    with contextlib.ExitStack() as folded:
        for batch in batches:
            if should_stop is not None and should_stop():
                raise StopTraining("stopped between two steps")
            batch = batch.to(device)
            if augment is not None:
                batch = augment(batch)
            # channels-last inputs for channels-last weights (place_model): no layout change
            images = batch.images.contiguous(memory_format=torch.channels_last)
            batch = batch._replace(images=images)
            if steps == 0 and cfg.freeze_batchnorm:  # frozen statistics: one conv per pair
                folded.enter_context(folded_batchnorm(model, images))
            stats = feedback_step(model, batch, optimizer, cfg, sync=False)
            loss = stats["loss"].to(device)
            finite = torch.isfinite(loss)
            n = batch.labels.shape[0]
            skipped += stats["skipped"].to(device)
            total += torch.where(finite, loss, 0.0) * n
            weight += finite.float() * n
            steps += 1
    totals = sum_across(torch.stack([total, weight, skipped]), ctx)
    n_skipped = int(totals[2]) // (ctx.world_size if ctx.enabled else 1)  # a step skips on all
    if n_skipped and ctx.is_main:
        log.warning("%d step(s) skipped for a non-finite loss or gradient", n_skipped)
    return {
        "train_loss": float(totals[0] / totals[1].clamp_min(1)),
        "skipped_steps": n_skipped,
        "steps": steps,
    }


class StopTraining(Exception):
    """Raised by :func:`run_steps` when its ``should_stop`` callback asks to stop."""


def epoch_batches(
    data: TensorData,
    indices: np.ndarray,
    batch_size: int,
    *,
    generator: torch.Generator,
    ctx: Dist = SINGLE,
    epoch: int = 0,
    seed: int = 0,
    progress: bool | str = False,
) -> Iterable[FeedbackBatch]:
    """The shuffled mini-batches of one epoch over ``indices`` of ``data``.

    Distributed (``ctx``), each rank takes its DistributedSampler share of the epoch and
    ``batch_size / world_size`` per step. ``progress`` (True or a label) shows a bar per batch.
    """
    if ctx.enabled:
        perm = shard_order(len(indices), epoch=epoch, seed=seed, ctx=ctx)
        batch_size = local_batch_size(batch_size, ctx)
    else:
        perm = torch.randperm(len(indices), generator=generator)
    host = torch.as_tensor(np.asarray(indices))[perm]  # kept: the batches' feedback counts
    order = host.to(data.labels.device)
    starts = range(0, len(order), batch_size)
    label = progress if isinstance(progress, str) else "steps"
    for start in progress_bar(starts, enabled=bool(progress), desc=label):
        stop = start + batch_size
        yield data.batch(order[start:stop], host[start:stop])


def train_one_epoch(
    model: nn.Module,
    data: TensorData,
    indices: np.ndarray,
    optimizer: torch.optim.Optimizer,
    cfg: FeedbackConfig,
    *,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    augment: Callable[[FeedbackBatch], FeedbackBatch] | None = None,
    progress: bool | str = False,
    ctx: Dist = SINGLE,
    epoch: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """One pass over ``indices`` of ``data`` in shuffled mini-batches (see :func:`run_steps`).

    The data may live on the GPU already (``data`` built on ``device``).
    """
    batches = epoch_batches(
        data,
        indices,
        batch_size,
        generator=generator,
        ctx=ctx,
        epoch=epoch,
        seed=seed,
        progress=progress,
    )
    return run_steps(model, batches, optimizer, cfg, device=device, augment=augment, ctx=ctx)


@dataclass(frozen=True)
class Batching:
    """How a training loop cuts its epochs into steps: the batch size, the device, the seed of
    the distributed shuffles, the process group (``ctx``) and an optional augmentation of each
    batch (applied on the device)."""

    batch_size: int
    device: torch.device | str = "cpu"
    seed: int = 0
    ctx: Dist = SINGLE
    augment: Callable[[FeedbackBatch], FeedbackBatch] | None = None


def train_epochs(
    model: nn.Module,
    data: TensorData,
    indices: np.ndarray,
    optimizer: torch.optim.Optimizer,
    cfg: FeedbackConfig,
    batching: Batching,
    *,
    epochs: int,
    generator: torch.Generator,
    first: int = 1,
    progress: str | None = None,
    batch_progress: bool = False,
    after_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """The epoch loop every training shares: ``epochs`` passes of :func:`train_one_epoch`,
    numbered from ``first`` (distributed shuffles depend on the number), each followed by
    ``after_epoch(epoch, stats)`` (validation, model selection). ``progress`` labels a bar over
    the epochs, ``batch_progress`` a bar over each epoch's batches. Returns each epoch's stats.
    """
    history = []
    numbers = range(first, first + epochs)
    for epoch in progress_bar(numbers, enabled=progress is not None, desc=progress or ""):
        stats = train_one_epoch(
            model,
            data,
            indices,
            optimizer,
            cfg,
            batch_size=batching.batch_size,
            generator=generator,
            device=batching.device,
            augment=batching.augment,
            progress=f"epoch {epoch}/{first + epochs - 1}" if batch_progress else False,
            ctx=batching.ctx,
            epoch=epoch,
            seed=batching.seed,
        )
        if cfg.recalibrates_batchnorm:
            images = image_batches(data, indices, batching.batch_size, batching.device)
            recalibrate_batchnorm(model, images)
        if after_epoch is not None:
            after_epoch(epoch, stats)
        history.append(stats)
    return history


def recalibrate_batchnorm(model: nn.Module, images: Iterable[Tensor]) -> bool:
    """Re-estimate every BatchNorm layer's running statistics on ``images`` (batches of model
    inputs on the model's device): a no-grad pass in train mode with a cumulative average
    (``torch.optim.swa_utils.update_bn``), every module's mode restored. Returns False, touching
    nothing, for a model without BatchNorm.

    Why: feedback steps run with BatchNorm frozen (per-sample CAMs), so its statistics stay
    those of the incoming weights while the steps move the weights; a fine-tune whose
    statistics go stale moves the boundaries between classes by large steps from epoch to epoch
    (docs/real-artifacts.md). Every rank of a distributed run passes over the same images with
    the same weights and so gets the same statistics."""
    net = unwrap(model)
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return False
    modes = {m: m.training for m in net.modules()}
    torch.optim.swa_utils.update_bn(images, net)
    for m, training in modes.items():
        m.training = training
    return True


def image_batches(data: TensorData, indices: np.ndarray, batch_size: int, device="cpu"):
    """``data[indices]``'s images in order, ``batch_size`` at a time, on ``device``."""
    for start in range(0, len(indices), batch_size):
        chunk = torch.from_numpy(np.asarray(indices[start : start + batch_size]))
        yield data.batch(chunk).images.to(device)


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float = 0.0, wd: float = 0.0):
    """Adam or SGD; fused on a GPU, which also lets a non-finite step be skipped without a
    host synchronisation (see :func:`feedback_step`)."""
    if name not in ("adam", "sgd"):
        raise ValueError(f"optimizer: expected 'adam' or 'sgd', got {name!r}")
    fused = any(p.device.type == "cuda" for p in model.parameters()) or None
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd, fused=fused)
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=wd, fused=fused
    )


def place_model(model: SelfExplaining, device: str) -> SelfExplaining:
    """Move to ``device``, channels-last memory (faster convolutions on a CPU through oneDNN and
    on a GPU in bf16; :func:`feedbackcam.models.build_model` builds them so)."""
    model.to(device)
    model.to(memory_format=torch.channels_last)
    return model


class BestEpoch:
    """Keeps the weights of the best epoch so far (a copy of the state dict).

    Epoch 0 is the incoming model: a run in which no epoch improves on it keeps it, and
    :attr:`improved` says so. ``eligible=False`` epochs (e.g. a collapsed classifier) are
    never kept, whatever their score. A tie keeps the earlier epoch, or with ``later_ties`` the
    later one.
    """

    def __init__(
        self, model: nn.Module, score: float, info: Any = None, *, later_ties: bool = False
    ) -> None:
        self.score = score if math.isfinite(score) else -math.inf
        self.epoch = 0
        self.info = info
        self.later_ties = later_ties
        self.state = copy.deepcopy(model.state_dict())

    @property
    def improved(self) -> bool:
        return self.epoch > 0

    def offer(
        self, model: nn.Module, epoch: int, score: float, info: Any = None, eligible: bool = True
    ) -> bool:
        """Keep ``model`` if it is eligible and scores higher; return whether it was kept."""
        better = score >= self.score if self.later_ties else score > self.score
        if not (eligible and math.isfinite(score) and better):
            return False
        self.score, self.epoch, self.info = score, epoch, info
        self.state = copy.deepcopy(model.state_dict())
        return True

    def restore(self, model: nn.Module) -> nn.Module:
        model.load_state_dict(self.state)
        return model


def progress_bar(iterable, *, enabled: bool = True, desc: str = "", every: float = 30.0, **kw):
    """A tqdm bar on a terminal; elsewhere (a log file) a plain line at most every ``every``
    seconds and one at the end, instead of carriage-return noise."""
    if not enabled:
        return iterable
    if sys.stderr.isatty():
        return tqdm(iterable, leave=False, desc=desc, **kw)
    return _plain_progress(iterable, desc, every)


def _plain_progress(iterable, desc: str, every: float):
    total = len(iterable) if hasattr(iterable, "__len__") else None
    started = last = time.monotonic()
    for done, item in enumerate(iterable, 1):
        yield item
        now = time.monotonic()
        if now - last >= every or done == total:
            of = f"/{total}" if total is not None else ""
            print(f"{desc}: {done}{of} ({now - started:.0f} s)", file=sys.stderr, flush=True)
            last = now
