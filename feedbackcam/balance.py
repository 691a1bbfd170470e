"""Loss-scale balancing: lambda as the explanation term's share of the gradient.

Raw explanation losses differ by orders of magnitude (squared input gradients are ~1e-4 of a
cross-entropy, a KL term is of its size), so a fixed lambda means different things for each, and
the thesis-era fix was a hand-tuned constant (``rrr_scale`` = 1000). Ross et al. found the best
lambda where the two terms are about equal at the start of training; :func:`calibrate_loss_scale`
measures that on a few batches and returns the ``FeedbackConfig.loss_scale`` that makes it so.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from dataclasses import replace

import numpy as np
import torch

from .batchnorm_fold import folded_batchnorm
from .data.dataset import FeedbackBatch, TensorData
from .objective import ADDED_TERMS, FeedbackConfig
from .self_explaining import SelfExplaining
from .train import epoch_batches, feedback_step


def calibrate_loss_scale(
    model: SelfExplaining,
    batches: list[FeedbackBatch],
    cfg: FeedbackConfig,
    class_norms: dict[int, float] | None = None,
) -> float:
    """The explanation loss's scale that makes its gradient as large as the class loss's at the
    start (Ross et al.: the best lambda is where the two terms are about equal at the start),
    so that lambda is the explanation term's share of the gradient, whatever the loss's units.

    Gradient norms are measured on the parameters, each term alone (lambda 0 and 1 with scale
    1), over ``batches``, on a copy of the model (nothing is stepped). ``class_norms``: the
    class loss's gradient norm per batch (keyed by ``id``), measured here when absent and kept
    there, so that calibrating several terms on the same batches measures it once.
    """
    probe = copy.deepcopy(model)
    params = [p for p in probe.parameters() if p.requires_grad]

    class _Null(torch.optim.Optimizer):
        def __init__(self):
            super().__init__(params, {})

        def step(self, closure=None):
            return None

    known = {} if class_norms is None else class_norms
    norms = {0.0: [], 1.0: []}
    with contextlib.ExitStack() as folded:
        if cfg.freeze_batchnorm and batches:  # as run_steps steps: BatchNorm folded
            folded.enter_context(folded_batchnorm(probe, batches[0].images))
        for lam in norms:
            for b in batches:
                if lam == 0.0 and id(b) in known:
                    norms[lam].append(known[id(b)])
                    continue
                feedback_step(probe, b, _Null(), replace(cfg, lam=lam, loss_scale=1.0))
                sq = sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None)
                norms[lam].append(math.sqrt(sq))
                if lam == 0.0:
                    known[id(b)] = norms[lam][-1]
    cls, exp = float(np.mean(norms[0.0])), float(np.mean(norms[1.0]))
    return cls / exp if exp > 0 else 1.0


def feeding(batches: list[FeedbackBatch], kind: str) -> list[FeedbackBatch]:
    """The batches that carry masks of ``kind`` ("keep" or "ignore"): what a term that learns
    from them can be calibrated on."""
    if kind == "ignore":
        return [b for b in batches if b.ignore is not None and bool(b.has_ignore.any())]
    return [b for b in batches if bool(b.has_mask.any() and b.masks.flatten(1).amax(1).gt(0).any())]


def probe_batches(
    data: TensorData,
    indices,
    batch_size: int,
    n: int,
    *,
    generator: torch.Generator,
) -> list[FeedbackBatch]:
    """The batches a fine-tuning calibrates its scales on (:func:`auto_scaled`): ``n`` shuffled
    batches of ``indices`` and, for each kind of mask (keep, ignore) that rows of ``indices``
    carry and none of those batches holds, one more batch of such rows. Five ignore strokes
    among 1,800 images are rarely in the first batches; without this, their term kept scale 1,
    7-30 times its calibrated size (docs/real-artifacts.md, the held-out workflow)."""
    indices = np.asarray(indices)
    shuffled = epoch_batches(data, indices, batch_size, generator=generator)
    probe = list(itertools.islice(shuffled, n))
    for column, kind in ((0, "keep"), (1, "ignore")):
        if feeding(probe, kind):
            continue
        rows = indices[_carries(data, column)[indices]]
        if len(rows):
            pick = torch.as_tensor(rows[torch.randperm(len(rows), generator=generator).numpy()])
            host = pick[:batch_size]
            probe.append(data.batch(host.to(data.labels.device), host))
    return probe


def _carries(data: TensorData, column: int) -> np.ndarray:
    """(N,) bool: the rows with keep (column 0) or ignore (1) feedback, read on the host."""
    if data.present is not None:
        return data.present[:, column].cpu().numpy()
    flags = data.has_mask if column == 0 else data.has_ignore
    return np.zeros(len(data), bool) if flags is None else flags.cpu().numpy().astype(bool)


def measured_scales(cfg: FeedbackConfig) -> list[str]:
    """The scales :func:`auto_scaled` measures for ``cfg`` (given batches that feed them):
    ``loss_scale`` with ``auto_scale``, and each added term's scale that is None and whose loss
    is added to the explanation loss. A scale set by hand is never measured; at lambda 0
    nothing is."""
    from .losses import get_loss

    if cfg.lam == 0:
        return []
    main_kind = get_loss(cfg.explanation_loss).needs
    out = ["loss_scale"] if cfg.auto_scale else []
    for field, scale_field, kind in ADDED_TERMS:
        name = getattr(cfg, field)
        added = name is not None and name != cfg.explanation_loss
        added = added and not (kind == "ignore" and main_kind == "ignore")
        if added and getattr(cfg, scale_field) is None:
            out.append(scale_field)
    return out


def auto_scaled(
    model: SelfExplaining, batches: list[FeedbackBatch], cfg: FeedbackConfig
) -> FeedbackConfig:
    """``cfg`` with its scales calibrated on ``batches`` by :func:`calibrate_loss_scale`: those
    :func:`measured_scales` names, each measured alone on the batches that feed it
    (:func:`feeding`). Nothing happens at lambda 0. A term that no batch can feed (no masks of
    its kind) keeps its scale (None becomes 1).
    """
    from .losses import get_loss

    unset = {scale: 1.0 for _, scale, _ in ADDED_TERMS if getattr(cfg, scale) is None}
    if cfg.lam == 0 or not batches:
        return replace(cfg, **unset)
    measured = measured_scales(cfg)
    class_norms: dict[int, float] = {}  # the class loss's, measured once per batch
    alone = {field: None for field, _, _ in ADDED_TERMS}
    plain = replace(cfg, loss_scale=1.0, **alone, **{s: 1.0 for _, s, _ in ADDED_TERMS})
    out = cfg
    main = feeding(batches, get_loss(cfg.explanation_loss).needs)
    if "loss_scale" in measured and main:
        out = replace(out, loss_scale=calibrate_loss_scale(model, main, plain, class_norms))
    for field, scale_field, kind in ADDED_TERMS:
        if getattr(out, scale_field) is not None:
            continue
        scale, fed = 1.0, feeding(batches, kind)
        if scale_field in measured and fed:
            only = replace(plain, explanation_loss=getattr(cfg, field))
            scale = calibrate_loss_scale(model, fed, only, class_norms)
        out = replace(out, **{scale_field: scale})
    return out
