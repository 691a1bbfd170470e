"""Class Artifact Compensation (ClArC; Anders et al. 2022, as Reveal2Revise uses it): an artifact
as a direction in the explanation layer's activations, found from a few marked images, then
projected out at inference (P-ClArC) or added to every training image so the model stops
telling images apart by it (A-ClArC).

The direction is the difference of the mean activation of images with the artifact and without
it (the "pattern" concept activation vector: the direction along which the artifact varies the
activations, not the one a classifier would use to detect it), unit length, per channel of the
explanation layer; it applies at every spatial location. Both are a forward hook on the layer
the self-explaining wrapper explains, registered for a block (``with``) and removed after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .self_explaining import SelfExplaining, layer_activations


@dataclass(frozen=True)
class ArtifactDirection:
    """An artifact's direction ``v`` (K,) in layer ``layer``'s channels, and the mean projection
    of the activations on it without the artifact (``clean``) and with it (``artifact``)."""

    layer: str
    v: Tensor
    clean: float
    artifact: float


def artifact_direction(
    model: SelfExplaining, images, has_artifact, *, batch_size: int = 64
) -> ArtifactDirection:
    """The direction of an artifact in ``model``'s explanation layer, from ``images`` (uint8
    (N, H, W, 3) or float (N, 3, H, W)) of which ``has_artifact`` (bool (N,)) carry it.

    Raises:
        ValueError: no image with the artifact, or none without it.
    """
    has = torch.as_tensor(np.asarray(has_artifact, bool))
    if not has.any() or has.all():
        raise ValueError("artifact_direction: expected images with and without the artifact")
    acts = layer_activations(model, images, batch_size=batch_size).mean(dim=(2, 3))
    diff = acts[has].mean(0) - acts[~has].mean(0)
    v = diff / diff.norm().clamp_min(1e-12)
    proj = acts @ v
    return ArtifactDirection(model.layers[0], v, float(proj[~has].mean()), float(proj[has].mean()))


def attach(model: SelfExplaining, d: ArtifactDirection, level: float):
    """From now on, the layer's activation at every location has its component along ``d.v``
    set to ``level`` (a - v (v.a - level)); returns the hook's handle (``.remove()`` undoes it).
    """
    module = dict(model.model.named_modules())[d.layer]

    def hook(_module, _inputs, output: Tensor) -> Tensor:
        v = d.v.to(output.device, output.dtype)[None, :, None, None]
        along = (output * v).sum(dim=1, keepdim=True)
        return output - v * (along - level)

    return module.register_forward_hook(hook)


@contextmanager
def _shifted(model: SelfExplaining, d: ArtifactDirection, level: float) -> Iterator[None]:
    handle = attach(model, d, level)
    try:
        yield
    finally:
        handle.remove()


def projected(model: SelfExplaining, d: ArtifactDirection):
    """P-ClArC, for a block: the artifact's component replaced by the clean images' mean."""
    return _shifted(model, d, d.clean)


def augmented(model: SelfExplaining, d: ArtifactDirection):
    """A-ClArC, for a block: every image given the artifact's mean component while
    fine-tuning, so the direction no longer tells images apart and the model unlearns it."""
    return _shifted(model, d, d.artifact)
