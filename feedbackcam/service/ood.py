"""Is this answer to be trusted? Low confidence and unfamiliar input, as warnings.

* Low confidence: the top class probability is below ``Settings.low_confidence``.
* Unfamiliar input, two checks, either one warns:

  - **features**: the Mahalanobis distance of the image's pooled activations at the model's
    explanation layer from the validation images' (Lee et al., "A simple unified framework for
    detecting out-of-distribution samples", NeurIPS 2018: one Gaussian per class with a shared,
    here Ledoit-Wolf shrunk, covariance; the distance to the nearest class).
  - **image**: the same distance on a dozen image statistics (colour means and spreads,
    saturation, near-white and near-black share, edge strength): the cheap "is this a
    dermoscopic image at all" guard. A plain colour, noise or a page of text is far from every
    lesion photo here whatever the network makes of it; the energy score alone called an
    invoice, plain black, plain blue and noise "familiar".

  Each check's threshold is the ``Settings.unfamiliar_quantile`` quantile of *out-of-fold*
  distances of validation images (fit on one half, measured on the other, both ways), so
  about 1 - quantile of images like the validation set are flagged by each. References and
  thresholds are computed once per model version on at most ``SAMPLE`` validation images
  (evenly spaced); without a validation set there is no check.

The energy score ``-log sum_k exp(logit_k)`` (Liu et al., NeurIPS 2020) is still reported for
the record; it no longer decides. AUROC of each score against a generated out-of-distribution
set: ``bench/ood.py``, docs/benchmarks.md.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import ledoit_wolf_shrinkage

from ..data.dataset import ArrayDataset
from ..evaluate import predict_features
from .registry import Served

SAMPLE = 256


def image_statistics(images: np.ndarray) -> np.ndarray:
    """(N, 12) statistics of (N, S, S, 3) uint8 images: per-channel mean and spread, mean and
    spread of saturation, the share of near-white and near-black pixels, mean edge strength and
    the share of strong edges."""
    x = np.asarray(images, dtype=np.float32) / 255
    flat = x.reshape(len(x), -1, 3)
    top, low = flat.max(axis=2), flat.min(axis=2)
    saturation = (top - low) / np.maximum(top, 1e-3)
    grey = x.mean(axis=3)
    edges = np.concatenate(
        [
            np.abs(np.diff(grey, axis=1)).reshape(len(x), -1),
            np.abs(np.diff(grey, axis=2)).reshape(len(x), -1),
        ],
        axis=1,
    )
    # spreads, edge strengths and shares on a log scale: they are ratios, and a plain colour's
    # zero must be far from a photograph's small value, not just below it
    log = lambda v, eps: np.log(v + eps)  # noqa: E731
    return np.column_stack(
        [
            flat.mean(axis=1),
            log(flat.std(axis=1), 1e-3),
            saturation.mean(axis=1),
            log(saturation.std(axis=1), 1e-3),
            log((low > 0.92).mean(axis=1), 1e-3),
            log((top < 0.08).mean(axis=1), 1e-3),
            log(edges.mean(axis=1), 1e-4),
            log((edges > 0.15).mean(axis=1), 1e-4),
        ]
    ).astype(np.float64)


def energy_score(logits: torch.Tensor) -> np.ndarray:
    """``-log sum_k exp(logit_k)`` per row (Liu et al. 2020), on the CPU."""
    return (-torch.logsumexp(logits.float(), dim=1)).cpu().numpy()


def forward(served: Served, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(energies (N,), pooled explanation-layer activations (N, K)) of uint8 images, in one
    forward pass each, under the served model's lock."""
    if not len(images):
        return np.zeros(0, np.float32), np.zeros((0, 0), np.float32)
    with served.lock:
        device = next(served.model.parameters()).device
        logits, pooled = predict_features(
            served.model, images, batch_size=batch, device=device, pooled=True
        )
    return check_inputs(logits, pooled)


def check_inputs(logits: torch.Tensor, pooled: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """What the check reads from a forward pass: (energies (N,), pooled explanation-layer
    activations (N, K) in float64), from its logits and pooled activations."""
    return energy_score(logits), pooled.numpy().astype(np.float64)


def energies(served: Served, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Energy scores of (N, S, S, 3) uint8 images under the served model."""
    return forward(served, images, batch)[0]


def shrunk_precision(x: np.ndarray) -> np.ndarray:
    """The inverse of the Ledoit-Wolf shrunk covariance of centred rows ``x`` (N, D): what
    ``sklearn.covariance.LedoitWolf(assume_centered=True).fit(x).precision_`` is (a test
    checks), from the N x N Gram matrix's eigenvectors instead of a D x D inverse. The shrunk
    covariance is ``(1 - s) x'x / N + s mu I``: on the span of the rows its eigenvalues are
    ``(1 - s) lambda + s mu``, elsewhere ``s mu``."""
    n, dim = x.shape
    shrinkage = ledoit_wolf_shrinkage(x, assume_centered=True)
    floor = shrinkage * float((x**2).sum()) / n / dim  # s mu
    if floor <= 0:  # no spread at all, or no shrinkage: the plain (pseudo-)inverse
        from scipy.linalg import pinvh

        return pinvh((1 - shrinkage) * (x.T @ x) / n + floor * np.eye(dim))
    lam, u = np.linalg.eigh(x @ x.T / n)
    kept = lam > max(lam.max(), 0.0) * 1e-12
    lam, u = lam[kept], u[:, kept]
    v = x.T @ u / np.sqrt(n * lam)  # (D, r) orthonormal: the rows' span
    return np.eye(dim) / floor + (v * (1 / ((1 - shrinkage) * lam + floor) - 1 / floor)) @ v.T


@dataclass(frozen=True)
class Gaussians:
    """Class means with one shared (shrunk) precision; ``distance`` to the nearest class."""

    means: np.ndarray  # (C, D)
    precision: np.ndarray  # (D, D)
    centre: np.ndarray  # (D,) the feature-wise mean, subtracted before fitting
    scale: np.ndarray  # (D,) the feature-wise spread, divided out (the units differ)

    @classmethod
    def fit(cls, x: np.ndarray, labels: np.ndarray | None = None) -> Gaussians:
        centre = x.mean(axis=0)
        scale = x.std(axis=0) + 1e-6
        z = (x - centre) / scale
        groups = [z] if labels is None else [z[labels == c] for c in np.unique(labels)]
        groups = [g for g in groups if len(g)]
        means = np.stack([g.mean(axis=0) for g in groups])
        residual = np.concatenate([g - g.mean(axis=0) for g in groups])
        precision = shrunk_precision(residual)
        return cls(means, precision, centre, scale)

    def distance(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float64) - self.centre) / self.scale
        d = (z[:, None, :] - self.means[None]).reshape(-1, len(self.centre))  # (N * C, D)
        squared = ((d @ self.precision) * d).sum(axis=1).reshape(len(z), len(self.means))
        return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


def out_of_fold(x: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """Each image's distance under Gaussians fitted on the other half (even/odd split)."""
    index = np.arange(len(x))
    result = np.zeros(len(x))
    for held in (index % 2 == 0, index % 2 == 1):
        fit = Gaussians.fit(x[~held], None if labels is None else labels[~held])
        result[held] = fit.distance(x[held])
    return result


@dataclass(frozen=True)
class Reference:
    """What one model version's images look like: per check, the fit and its threshold."""

    features: Gaussians
    features_threshold: float
    image: Gaussians
    image_threshold: float
    energy_threshold: float


def fit_reference(
    served: Served,
    images: np.ndarray,
    labels: np.ndarray,
    quantile: float,
    *,
    seen: tuple[np.ndarray, np.ndarray] | None = None,
    image: tuple[Gaussians, float] | None = None,
) -> Reference:
    """The reference of ``served`` on ``images``. ``seen``: their (energies, pooled
    activations) under ``served`` from a pass already made (the update's scoring pass); else
    they are forwarded here. ``image``: the image-statistics fit and threshold, which depend on
    the images alone (kept per validation set); else fitted here."""
    energy, pooled = seen if seen is not None else forward(served, images)
    if len(energy) != len(images) or len(pooled) != len(images):
        raise ValueError(f"seen: {len(energy)} energies for {len(images)} images")
    threshold = lambda d: float(np.quantile(d, quantile))  # noqa: E731
    if image is None:
        image = image_reference(images, quantile)
    return Reference(
        features=Gaussians.fit(pooled, labels),
        features_threshold=threshold(out_of_fold(pooled, labels)),
        image=image[0],
        image_threshold=image[1],
        energy_threshold=threshold(energy),
    )


def image_reference(images: np.ndarray, quantile: float) -> tuple[Gaussians, float]:
    """The image-statistics check's fit and threshold: the same for every model version."""
    stats = image_statistics(images)
    return Gaussians.fit(stats), float(np.quantile(out_of_fold(stats, None), quantile))


@dataclass(frozen=True)
class Familiar:
    """One image's scores: each distance with its threshold (the engineer's numbers)."""

    energy: float
    energy_threshold: float | None
    features: float | None = None
    features_threshold: float | None = None
    image: float | None = None
    image_threshold: float | None = None

    @property
    def unfamiliar(self) -> bool:
        return (self.features is not None and self.features > self.features_threshold) or (
            self.image is not None and self.image > self.image_threshold
        )


class Familiarity:
    """The reference per model version, measured on the validation set once (the same
    ``rows`` of it for every version; the image-statistics part once for all versions)."""

    def __init__(self, validation: ArrayDataset | None, quantile: float) -> None:
        self.validation, self.quantile = validation, quantile
        self._references: dict[int, Reference] = {}
        self._image: tuple[Gaussians, float] | None = None
        self._lock = threading.Lock()
        n = 0 if validation is None else len(validation)
        # the validation rows the reference is measured on: all, or SAMPLE evenly spaced
        self.rows = (
            np.linspace(0, n - 1, SAMPLE).round().astype(int) if n > SAMPLE else np.arange(n)
        )

    def reference(
        self, served: Served, seen: tuple[np.ndarray, np.ndarray] | None = None
    ) -> Reference | None:
        """The reference of ``served`` (fitted on first use). ``seen``: the (energies, pooled
        activations) of the validation ``rows`` under ``served``, from a pass already made
        (the updater's scoring pass), so that fitting forwards nothing."""
        if self.validation is None or len(self.validation) < 4:
            return None
        with self._lock:
            if served.version_id not in self._references:
                images = np.asarray(self.validation.images[self.rows])
                labels = np.asarray(self.validation.labels)[self.rows]
                if self._image is None:
                    self._image = image_reference(images, self.quantile)
                self._references[served.version_id] = fit_reference(
                    served, images, labels, self.quantile, seen=seen, image=self._image
                )
            return self._references[served.version_id]

    def score(
        self, served: Served, rgb: np.ndarray, seen: tuple[np.ndarray, np.ndarray] | None = None
    ) -> Familiar:
        """``seen``: the prediction's ``(logits, pooled)`` from its own forward pass (see
        ``Served.explain``); without it the image is forwarded here."""
        if seen is not None:
            energy, pooled = energy_score(torch.as_tensor(seen[0])), seen[1]
        else:
            energy, pooled = forward(served, rgb[None])
        ref = self.reference(served)
        if ref is None:
            return Familiar(float(energy[0]), None)
        return Familiar(
            energy=float(energy[0]),
            energy_threshold=ref.energy_threshold,
            features=float(ref.features.distance(pooled)[0]),
            features_threshold=ref.features_threshold,
            image=float(ref.image.distance(image_statistics(rgb[None]))[0]),
            image_threshold=ref.image_threshold,
        )

    def warnings(
        self,
        served: Served,
        rgb: np.ndarray,
        top: float,
        low_confidence: float,
        seen: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[Familiar, list[str]]:
        """The image's scores and the warnings in a clinician's words (the numbers are in
        the scores, one click away on the page)."""
        familiar = self.score(served, rgb, seen)
        said = []
        if familiar.unfamiliar:
            said.append(
                "This does not look like the skin images this model was checked on "
                "(a photo of something else, a plain colour, noise or a document?). "
                "Its answer may be meaningless: judge the image yourself."
            )
        if top < low_confidence:
            said.append(
                f"The model is unsure: its top class has {100 * top:.0f} %. "
                "Judge this one yourself."
            )
        return familiar, said


def probe_images(size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed set of images that are not skin, at ``size`` x ``size``: what a clinic's
    upload button also receives. Plain colours, noise, and renders of text (an invoice, a
    letter); ``bench/ood.py`` adds natural photographs. Used to measure the unfamiliar-input
    check (tests, benchmarks), never to fit it."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    plain = {
        "black": (0, 0, 0),
        "white": (255, 255, 255),
        "blue": (30, 60, 200),
        "grey": (128, 128, 128),
        "skin": (224, 172, 140),
        "green": (40, 160, 60),
    }
    out = {f"plain {k}": np.full((size, size, 3), v, np.uint8) for k, v in plain.items()}
    out["uniform noise"] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    out["grey noise"] = np.repeat(rng.integers(0, 256, (size, size, 1), dtype=np.uint8), 3, 2)
    gauss = np.clip(rng.normal(128, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    out["gaussian noise"] = gauss
    for name, lines in {
        "invoice": [
            "INVOICE  No. 20931",
            "Qty  Item        Price",
            "2    Gauze      4.20",
            "1    Dermatoscope 899.00",
            "TOTAL          907.40",
        ],
        "letter": ["Dear colleague,", "please find enclosed", "the referral for", "Mr. Smith."],
    }.items():
        page = Image.new("RGB", (256, 256), (250, 250, 245))
        draw = ImageDraw.Draw(page)
        for k, line in enumerate(lines):
            draw.text((12, 16 + 40 * k), line, fill=(20, 20, 20))
        out[name] = np.asarray(page.resize((size, size), Image.Resampling.BILINEAR))
    return out
