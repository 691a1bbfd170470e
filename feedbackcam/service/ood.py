"""Is this answer to be trusted? Low confidence and unfamiliar input, as warnings.

* Low confidence: the top class probability is below ``Settings.low_confidence``.
* Unfamiliar input: the image's energy score ``E(x) = -log sum_k exp(logit_k(x))`` (Liu et al.,
  "Energy-based out-of-distribution detection", NeurIPS 2020) is above the
  ``Settings.unfamiliar_quantile`` quantile of the energies of the validation set under the
  same model version. Images like those the model knows get low (very negative) energy; the
  score costs one forward pass and needs no training. Without a validation set it is off. The
  quantile is measured once per version on at most ``SAMPLE`` validation images (evenly spaced),
  so the first prediction after a promotion waits at most that many forward passes.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..data.dataset import ArrayDataset
from .registry import Served

SAMPLE = 256


def energies(served: Served, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Energy scores of (N, S, S, 3) uint8 images under the served model."""
    out = []
    with served.lock, torch.no_grad():
        device = next(served.model.parameters()).device
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.array(images[start : start + batch], copy=True))
            x = x.permute(0, 3, 1, 2).float().div(255).to(device)
            logits = served.model(x).logits.float()
            out.append((-torch.logsumexp(logits, dim=1)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


class Familiarity:
    """The energy threshold per model version, measured on the validation set once."""

    def __init__(self, validation: ArrayDataset | None, quantile: float) -> None:
        self.validation, self.quantile = validation, quantile
        self._thresholds: dict[int, float] = {}
        self._lock = threading.Lock()

    def threshold(self, served: Served) -> float | None:
        if self.validation is None or not len(self.validation):
            return None
        with self._lock:
            if served.version_id not in self._thresholds:
                images = self.validation.images
                if len(images) > SAMPLE:
                    images = images[np.linspace(0, len(images) - 1, SAMPLE).round().astype(int)]
                scores = energies(served, images)
                self._thresholds[served.version_id] = float(np.quantile(scores, self.quantile))
            return self._thresholds[served.version_id]

    def warnings(
        self, served: Served, rgb: np.ndarray, top: float, low_confidence: float
    ) -> tuple[float, float | None, list[str]]:
        """The image's energy, the threshold, and the warnings in words."""
        energy = float(energies(served, rgb[None])[0])
        threshold = self.threshold(served)
        said = []
        if top < low_confidence:
            said.append(
                f"low confidence: the top class has {100 * top:.0f} % "
                f"(below {100 * low_confidence:.0f} %); judge this one yourself"
            )
        if threshold is not None and energy > threshold:
            said.append(
                "unfamiliar image: it looks unlike the images this model was checked on "
                f"(energy {energy:.2f} above {threshold:.2f}, the validation set's "
                f"{100 * self.quantile:g}th percentile); the answer may be meaningless"
            )
        return energy, threshold, said
