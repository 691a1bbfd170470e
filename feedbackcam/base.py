"""Training the base classifier (thesis section 3.2): class-weighted cross-entropy, flips and
24 rotations, stratified train/val/test, best checkpoint by validation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import ModelSpec, save_checkpoint
from .data.dataset import ArrayDataset, FeedbackBatch
from .data.splits import split_feedback
from .distributed import SINGLE, Dist, wrap
from .evaluate import predict_probs
from .fileio import write_csv, write_json, write_text
from .metrics import ClassificationMetrics, classification_metrics, per_class_table
from .objective import FeedbackConfig
from .self_explaining import SelfExplaining
from .train import (
    Batching,
    BestEpoch,
    class_weights,
    make_optimizer,
    place_model,
    train_epochs,
)

HISTORY_FIELDS = ("epoch", "train_loss", "skipped_steps", "val_accuracy", "val_avg_sensitivity")


@dataclass(frozen=True)
class BaseConfig:
    """Base training. Defaults follow the thesis (20 epochs, flips and 24 rotations).

    Attributes:
        epochs, batch_size, optimizer, lr, weight_decay: the optimisation.
        augment: random horizontal flip and rotation by a multiple of 15 degrees per image.
        class_weighted: cross-entropy weights inversely proportional to class frequency.
        fractions: train/val/test fractions of the stratified split.
        select_by: "avg_sensitivity" (robust to imbalance) or "accuracy" on val.
        seed, device, eval_batch_size; precision "fp32" or "bf16" (autocast).
    """

    epochs: int = 20
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    augment: bool = True
    class_weighted: bool = True
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    select_by: str = "avg_sensitivity"
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size: expected >= 1")
        if self.select_by not in ("avg_sensitivity", "accuracy"):
            raise ValueError(
                f"select_by: expected 'avg_sensitivity' or 'accuracy', got {self.select_by!r}"
            )


def evaluate_classifier(model, data, cfg: BaseConfig) -> ClassificationMetrics:
    probs = predict_probs(model, data.images, batch_size=cfg.eval_batch_size, device=cfg.device)
    return classification_metrics(data.labels, probs.numpy(), data.classes)


def train_base(
    model: SelfExplaining,
    data: ArrayDataset,
    cfg: BaseConfig,
    out: str | Path,
    spec: ModelSpec,
    *,
    progress: bool = True,
    ctx: Dist = SINGLE,
) -> dict[str, Any]:
    """Train ``model`` on ``data``'s train split; save the best epoch by val to
    ``out/model.pt``; write history, config, test metrics and the per-class table."""
    from .augment import random_flip_rotate

    out, main = Path(out), ctx.is_main
    progress = progress and main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    splits = split_feedback(data.labels, seed=cfg.seed, fractions=cfg.fractions)
    train, val, test = (data.subset(s) for s in (splits.train, splits.val, splits.test))
    if not (len(train) and len(val) and len(test)):
        raise ValueError(
            f"{len(data)} image(s) are too few for a train/val/test split "
            f"({len(train)}/{len(val)}/{len(test)})"
        )
    weights = class_weights(train.labels, len(data.classes)) if cfg.class_weighted else None
    # BatchNorm statistics adapt to the data while the base model learns it (batches of 32+);
    # only feedback fine-tuning freezes them.
    fb = FeedbackConfig(
        lam=0.0, class_weights=weights, precision=cfg.precision, freeze_batchnorm=False
    )
    if main:
        write_json(
            out / "config.json",
            {
                "base": asdict(cfg),
                "model": asdict(spec),
                "class_weights": weights,
                "split_sizes": {"train": len(train), "val": len(val), "test": len(test)},
                "class_counts": data.class_counts(),
            },
        )
    place_model(model, cfg.device)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, 0.0, cfg.weight_decay)
    trained = wrap(model, ctx)
    generator = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + ctx.rank)

    def augment(batch: FeedbackBatch) -> FeedbackBatch:
        images, masks = random_flip_rotate(batch.images, batch.masks, aug_gen)
        return batch._replace(images=images, masks=masks)

    best = BestEpoch(model, -math.inf)
    history = []

    def validate(epoch: int, stats: dict) -> None:
        metrics = evaluate_classifier(model, val, cfg)
        history.append(
            {
                "epoch": epoch,
                "train_loss": stats["train_loss"],
                "skipped_steps": stats["skipped_steps"],
                "val_accuracy": metrics.accuracy,
                "val_avg_sensitivity": metrics.avg_sensitivity,
            }
        )
        if progress:
            print(
                f"epoch {epoch}/{cfg.epochs}: loss {stats['train_loss']:.3f}, val accuracy "
                f"{metrics.accuracy:.3f}, val average sensitivity {metrics.avg_sensitivity:.3f}",
                flush=True,
            )
        best.offer(model, epoch, getattr(metrics, cfg.select_by))

    batching = Batching(cfg.batch_size, cfg.device, cfg.seed, ctx, augment if cfg.augment else None)
    tensors = train.tensors(cfg.device)
    train_epochs(
        trained,
        tensors,
        np.arange(len(train)),
        optimizer,
        fb,
        batching,
        epochs=cfg.epochs,
        generator=generator,
        batch_progress=progress,
        after_epoch=validate,
    )
    best.restore(model)
    test_metrics = evaluate_classifier(model, test, cfg)
    result = {
        "best_epoch": best.epoch,
        "val_" + cfg.select_by: best.score,
        "test": test_metrics.to_dict(),
    }
    if not main:
        return result
    trained_on = {"train": list(train.ids), "val": list(val.ids), "test": list(test.ids)}
    save_checkpoint(
        out / "model.pt",
        model,
        spec,
        config={"base": asdict(cfg), "trained_on": trained_on},
        metrics=result,
    )
    write_csv(out / "history.csv", history, HISTORY_FIELDS)
    write_text(out / "table.md", per_class_table(test_metrics))
    write_json(out / "metrics.json", result)
    return result
