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

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .counterfactual import fill_region
from .data.dataset import ArrayDataset
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
    model: SelfExplaining, data: ArrayDataset, *, fill: bool = True, batch_size: int = 64
) -> Tensor:
    """(N, F) the inputs of :func:`head` for ``data``'s images, in eval mode and without
    gradients; with ``fill``, each image's ignore region filled with its median colour."""
    layer = head(model)
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                idx = np.arange(start, min(start + batch_size, len(data)))
                x = torch.from_numpy(np.ascontiguousarray(data.images[idx]))
                x = x.to(device).permute(0, 3, 1, 2).float() / 255
                if fill and data.ignore is not None:
                    given = data.ignore[idx] * (
                        data.has_ignore[idx, None, None] if data.has_ignore is not None else 1
                    )
                    x = fill_region(x, torch.from_numpy(given).to(device).float())
                model(x)
    finally:
        handle.remove()
        model.train(was)
    return torch.cat([c.flatten(1).float() for c in captured])


def refit_bias(
    model: SelfExplaining,
    data: ArrayDataset,
    *,
    class_weights: Sequence[float] | None = None,
    steps: int = 300,
    lr: float = 0.1,
) -> Tensor:
    """Re-fit the last layer's bias by (``class_weights``-weighted) cross-entropy on ``data``
    with its marked regions filled; the rest of the network is fixed. Returns the change
    (new bias minus old). A data set with a single class leaves the bias as it is."""
    layer = head(model)
    labels = torch.as_tensor(np.asarray(data.labels), dtype=torch.long)
    if len(torch.unique(labels)) < 2:
        return torch.zeros_like(layer.bias)
    features = head_inputs(model, data).to(layer.weight.device)
    labels = labels.to(layer.weight.device)
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
