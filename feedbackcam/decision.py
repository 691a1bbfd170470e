"""The decision's per-class offsets, re-fit after feedback.

Invariance losses ask predictions not to change when a marked artifact is filled, moved or
pasted. When the artifact stood for one class, every such comparison says "less of that class",
and a network can answer it for every image at once by lowering that class's offset (the last
layer's bias) instead of, or besides, unlearning the artifact: the ranking of images survives,
the decision does not (docs/shortcuts.md: melanomas ranked right and never chosen). A bias is a
constant, so it can tell no image from another; re-fitting it by cross-entropy on the
fine-tuning images with their marked regions filled (the artifact gone, what the model must
decide from) restores the operating point a model trained without the artifact would have, and
changes no ranking of images within a class's score.

:func:`refit_bias` does it in place: the head's input features are computed once (no gradient
through the network), and only the bias of the last linear layer is optimised.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .counterfactual import fill_region
from .data.dataset import ArrayDataset, FeedbackBatch, TensorData
from .self_explaining import SelfExplaining


def head(model: SelfExplaining) -> nn.Linear:
    """The last linear layer of the wrapped network (whose bias is the decision's offsets).

    Raises:
        ValueError: the network has no linear layer with a bias.
    """
    linear = [m for m in model.model.modules() if isinstance(m, nn.Linear) and m.bias is not None]
    if not linear:
        raise ValueError(f"{type(model.model).__name__}: no linear layer with a bias to re-fit")
    return linear[-1]


def head_inputs(
    model: SelfExplaining,
    data: ArrayDataset | TensorData,
    *,
    index: np.ndarray | None = None,
    fill: bool = True,
    batch_size: int = 64,
) -> Tensor:
    """(N, F) the inputs of :func:`head` for ``data``'s images (those of ``index``, default
    all), in eval mode and without gradients; with ``fill``, each image's ignore region filled
    with its median colour."""
    rows = np.arange(len(data.labels)) if index is None else np.asarray(index)
    chunks = (_chunk(data, rows[k : k + batch_size]) for k in range(0, len(rows), batch_size))
    return _head_inputs(model, chunks, fill)


def _chunk(data: ArrayDataset | TensorData, idx: np.ndarray) -> tuple[Tensor, Tensor | None]:
    """Images (B, 3, H, W) in [0, 1] and their given ignore masks (or None) of rows ``idx``."""
    x = torch.as_tensor(data.images[idx]).permute(0, 3, 1, 2).float() / 255
    if data.ignore is None:
        return x, None
    given = torch.as_tensor(data.ignore[idx]).float()
    if data.has_ignore is not None:
        given = given * torch.as_tensor(data.has_ignore[idx])[:, None, None]
    return x, given


def _head_inputs(model: SelfExplaining, chunks, fill: bool) -> Tensor:
    layer = head(model)
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for x, given in chunks:
                x = x.to(device)
                if fill and given is not None:
                    x = fill_region(x, given.to(device))
                model(x)
    finally:
        handle.remove()
        model.train(was)
    return torch.cat([c.flatten(1).float() for c in captured])


def refit_bias(
    model: SelfExplaining,
    data: ArrayDataset | TensorData,
    *,
    index: np.ndarray | None = None,
    class_weights: Sequence[float] | None = None,
    steps: int = 300,
    lr: float = 0.1,
) -> Tensor:
    """Re-fit the last layer's bias by (``class_weights``-weighted) cross-entropy on ``data``
    (the images of ``index``, default all) with its marked regions filled; the rest of the
    network is fixed. Returns the change (new bias minus old). A data set with a single class
    leaves the bias as it is."""
    labels = torch.as_tensor(data.labels).long()
    if index is not None:
        labels = labels[torch.as_tensor(np.asarray(index), device=labels.device)]
    if len(torch.unique(labels)) < 2:
        return torch.zeros_like(head(model).bias)
    features = head_inputs(model, data, index=index)
    return _fit_bias(head(model), features, labels, class_weights, steps, lr)


def refit_bias_on_batches(
    model: SelfExplaining,
    batches: Iterable[FeedbackBatch],
    *,
    class_weights: Sequence[float] | None = None,
    steps: int = 300,
    lr: float = 0.1,
) -> Tensor:
    """:func:`refit_bias` on the images of ``batches`` (as a training loop draws them: an image
    drawn twice counts twice)."""
    batches = list(batches)
    labels = torch.cat([b.labels for b in batches]).long() if batches else torch.zeros(0)
    if len(torch.unique(labels)) < 2:
        return torch.zeros_like(head(model).bias)
    chunks = (
        (b.images, None if b.ignore is None else b.ignore * b.has_ignore[:, None, None])
        for b in batches
    )
    features = _head_inputs(model, chunks, fill=True)
    return _fit_bias(head(model), features, labels, class_weights, steps, lr)


def _fit_bias(layer: nn.Linear, features, labels, class_weights, steps: int, lr: float) -> Tensor:
    """Fit ``layer``'s bias by cross-entropy on its fixed ``features``; return the change."""
    features, labels = features.to(layer.weight.device), labels.to(layer.weight.device)
    with torch.no_grad():
        fixed = features @ layer.weight.float().T
    bias = layer.bias.detach().float().clone().requires_grad_(True)
    weight = None if class_weights is None else torch.as_tensor(class_weights).to(fixed)
    opt = torch.optim.Adam([bias], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(fixed + bias, labels, weight=weight).backward()
        opt.step()
    change = bias.detach() - layer.bias.detach().float()
    with torch.no_grad():
        layer.bias.copy_(bias.detach().to(layer.bias.dtype))
    return change
