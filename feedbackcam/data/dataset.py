"""In-memory feedback data: images, masks, labels and ids as uint8/int arrays, and the float
batches the training step takes.

One container for every source (SynthDerm, Decoy-MNIST, prepared ISIC or generic data): the
simulations and the benchmarks read this, and convert a batch at a time to float tensors, so a
whole data set in uint8 costs a quarter of its float size.

Two kinds of explanation feedback travel with an image, either may be missing:
- the *keep* mask (``masks``): the region that matters (the thesis' expert mask);
- the *ignore* mask (``ignore``): a region that must not matter (a ruler, a band-aid, ink).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class FeedbackBatch(NamedTuple):
    """A batch of feedback: images (N, 3, H, W) in [0, 1], labels (N,), keep masks (N, H, W) in
    [0, 1] (binary, or a non-binary map for the "mse" loss), has_mask (N,) bool, and optional
    ignore masks (N, H, W) with has_ignore (N,) bool (None: no image has one).

    ``counts``: how many rows carry keep feedback and how many ignore feedback (a flag on and a
    non-empty mask), as host integers, or None where unknown. They are counted on the CPU before
    a batch goes to an accelerator (:meth:`to`, :meth:`TensorData.batch`), so that the step can
    size its counterfactual rows and skip a term no row needs without reading the device's
    flags back (a host synchronisation)."""

    images: Tensor
    labels: Tensor
    masks: Tensor
    has_mask: Tensor
    ignore: Tensor | None = None
    has_ignore: Tensor | None = None
    counts: tuple[int, int] | None = None

    @property
    def tensors(self) -> tuple[Tensor | None, ...]:
        return tuple(self)[:6]

    def to(self, device: torch.device | str) -> FeedbackBatch:
        counts = self.counts
        if counts is None and torch.device(device).type != "cpu" and self.images.is_cpu:
            counts = self.feedback_counts()
        moved = (None if t is None else t.to(device, non_blocking=True) for t in self.tensors)
        return FeedbackBatch(*moved, counts)

    def feedback_counts(self) -> tuple[int, int]:
        """(rows with keep feedback, rows with ignore feedback); reads the flags (on an
        accelerator, a synchronisation: count before moving)."""
        return (
            int(feedback_present(self.masks, self.has_mask).sum()),
            0 if self.ignore is None else int(feedback_present(self.ignore, self.has_ignore).sum()),
        )

    def index(self, idx) -> FeedbackBatch:
        """The samples at ``idx`` (a slice, index tensor or boolean mask)."""
        return FeedbackBatch(*(None if t is None else t[idx] for t in self.tensors))

    @staticmethod
    def cat(parts: Sequence[FeedbackBatch]) -> FeedbackBatch:
        """Concatenate batches; ignore masks are zeros (and absent) where a part has none."""
        known = [p.counts for p in parts]
        counts = None if None in known else tuple(int(sum(c)) for c in zip(*known))
        if not any(p.ignore is not None for p in parts):
            return FeedbackBatch(
                *(torch.cat(t) for t in zip(*(p[:4] for p in parts))), counts=counts
            )
        parts = [p.with_ignore_slots() for p in parts]
        return FeedbackBatch(*(torch.cat(t) for t in zip(*(p.tensors for p in parts))), counts)

    def with_ignore_slots(self) -> FeedbackBatch:
        """The same batch with explicit (empty) ignore masks where there are none."""
        if self.ignore is not None:
            return self
        n = self.labels.shape[0]
        return self._replace(
            ignore=torch.zeros_like(self.masks),
            has_ignore=torch.zeros(n, dtype=torch.bool, device=self.labels.device),
        )


def feedback_present(masks: Tensor, has_mask: Tensor | None = None) -> Tensor:
    """Boolean (N,): the sample carries explanation feedback (a given, non-empty mask)."""
    present = masks.flatten(1).amax(dim=1) > 0
    if has_mask is not None:
        present = present & has_mask.to(device=masks.device, dtype=torch.bool)
    return present


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Images (N, H, W, 3) uint8, keep masks (N, H, W) uint8 0/1, labels (N,) int64,
    has_mask (N,) bool, ids (N,) str, the class names the labels index, and optional ignore
    masks (N, H, W) uint8 0/1 with has_ignore (N,) bool."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    has_mask: np.ndarray
    ids: tuple[str, ...]
    classes: tuple[str, ...]
    ignore: np.ndarray | None = None
    has_ignore: np.ndarray | None = None

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
        if (self.ignore is None) != (self.has_ignore is None):
            raise ValueError("ignore and has_ignore: give both or neither")
        if self.ignore is not None and self.ignore.shape != self.images.shape[:3]:
            raise ValueError(
                f"ignore: expected shape {self.images.shape[:3]}, got {self.ignore.shape}"
            )
        for name in ("images", "masks", "labels", "has_mask"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name}: expected {n} entries (one per id)")
        if self.has_ignore is not None and len(self.has_ignore) != n:
            raise ValueError(f"has_ignore: expected {n} entries (one per id)")
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
            None if self.ignore is None else self.ignore[idx],
            None if self.has_ignore is None else self.has_ignore[idx],
        )

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, counts)}

    def with_classes(self, classes: Sequence[str], source: object = "the model") -> ArrayDataset:
        """The same images with labels re-indexed by ``classes`` (e.g. a 3-class Task 2 set
        evaluated by an 8-class ISIC 2019 model, as in the thesis), matched by name.

        Raises:
            ValueError: a class of this set is not in ``classes`` (``source`` names where
                ``classes`` came from, for the message).
        """
        classes = tuple(classes)
        if self.classes == classes:
            return self
        missing = [c for c in self.classes if c not in classes]
        if missing:
            raise ValueError(f"{source}: has no class {missing}; it knows {list(classes)}")
        mapping = np.asarray([classes.index(c) for c in self.classes], dtype=np.int64)
        labels = mapping[self.labels] if len(self.labels) else self.labels.astype(np.int64)
        return ArrayDataset(
            self.images,
            self.masks,
            labels,
            self.has_mask,
            self.ids,
            classes,
            self.ignore,
            self.has_ignore,
        )

    def tensors(self, device: torch.device | str = "cpu") -> TensorData:
        """The arrays as torch tensors (uint8 kept) on ``device``, ready for batching."""

        def put(a):
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)

        return TensorData(
            put(self.images),
            put(self.masks),
            torch.from_numpy(self.labels.astype(np.int64)).to(device),
            torch.from_numpy(self.has_mask.astype(bool)).to(device),
            put(self.ignore),
            None if self.has_ignore is None else put(self.has_ignore.astype(bool)),
            torch.from_numpy(self.feedback_present()),
        )

    def feedback_present(self) -> np.ndarray:
        """(N, 2) bool: each row carries keep feedback, ignore feedback (flag on, mask
        non-empty)."""
        n = len(self)
        keep = self.has_mask.astype(bool) & (self.masks.reshape(n, -1).max(axis=1) > 0)
        ignore = np.zeros(n, bool)
        if self.ignore is not None:
            flags = np.ones(n, bool) if self.has_ignore is None else self.has_ignore.astype(bool)
            ignore = flags & (self.ignore.reshape(n, -1).max(axis=1) > 0)
        return np.stack([keep, ignore], axis=1)


@dataclass(frozen=True, eq=False)
class TensorData:
    images: torch.Tensor  # uint8 (N, H, W, 3)
    masks: torch.Tensor  # uint8 (N, H, W)
    labels: torch.Tensor
    has_mask: torch.Tensor
    ignore: torch.Tensor | None = None  # uint8 (N, H, W)
    has_ignore: torch.Tensor | None = None
    # (N, 2) bool on the CPU: keep feedback, ignore feedback per row (ArrayDataset's
    # feedback_present), so that a batch's counts need no read from an accelerator
    present: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, idx: torch.Tensor, host_idx: torch.Tensor | None = None) -> FeedbackBatch:
        """Float batch: images (B, 3, H, W) in [0, 1], masks (B, H, W) in {0, 1}; with its
        feedback counts where ``present`` is known and the indices are on the CPU (``idx``, or
        ``host_idx``: the same indices, kept on the host)."""
        if host_idx is None and idx.device.type == "cpu":
            host_idx = idx
        counts = None
        if self.present is not None and host_idx is not None:
            counts = tuple(int(c) for c in self.present[host_idx].sum(dim=0))
        images = self.images[idx].permute(0, 3, 1, 2).float().div_(255)
        ignore = None if self.ignore is None else self.ignore[idx].float()
        has_ignore = None if self.has_ignore is None else self.has_ignore[idx]
        return FeedbackBatch(
            images,
            self.labels[idx],
            self.masks[idx].float(),
            self.has_mask[idx],
            ignore,
            has_ignore,
            counts,
        )
