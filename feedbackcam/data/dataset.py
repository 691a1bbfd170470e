"""In-memory feedback data: images, masks, labels and ids as uint8/int arrays.

One container for every source (SynthDerm, prepared ISIC data): the simulation and the
benchmarks read this, and convert a batch at a time to float tensors, so a whole data set in
uint8 costs a quarter of its float size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..train import FeedbackBatch


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Images (N, H, W, 3) uint8, masks (N, H, W) uint8 0/1, labels (N,) int64,
    has_mask (N,) bool, ids (N,) str, and the class names the labels index."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    has_mask: np.ndarray
    ids: tuple[str, ...]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images: expected uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}"
            )
        if self.masks.shape != self.images.shape[:3]:
            raise ValueError(
                f"masks: expected shape {self.images.shape[:3]}, got {self.masks.shape}"
            )
        for name in ("images", "masks", "labels", "has_mask"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name}: expected {n} entries (one per id)")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"labels: expected values in [0, {len(self.classes)})")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ArrayDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(
            self.images[idx],
            self.masks[idx],
            self.labels[idx],
            self.has_mask[idx],
            tuple(self.ids[i] for i in idx),
            self.classes,
        )

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, counts)}

    def tensors(self, device: torch.device | str = "cpu") -> TensorData:
        """The arrays as torch tensors (uint8 kept) on ``device``, ready for batching."""
        return TensorData(
            torch.from_numpy(np.ascontiguousarray(self.images)).to(device),
            torch.from_numpy(np.ascontiguousarray(self.masks)).to(device),
            torch.from_numpy(self.labels.astype(np.int64)).to(device),
            torch.from_numpy(self.has_mask.astype(bool)).to(device),
        )


@dataclass(frozen=True, eq=False)
class TensorData:
    images: torch.Tensor  # uint8 (N, H, W, 3)
    masks: torch.Tensor  # uint8 (N, H, W)
    labels: torch.Tensor
    has_mask: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, idx: torch.Tensor) -> FeedbackBatch:
        """Float batch: images (B, 3, H, W) in [0, 1], masks (B, H, W) in {0, 1}."""
        images = self.images[idx].permute(0, 3, 1, 2).float().div_(255)
        return FeedbackBatch(images, self.labels[idx], self.masks[idx].float(), self.has_mask[idx])
