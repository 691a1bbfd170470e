"""Training the base classifier (thesis section 3.2): class-weighted cross-entropy, flips and
24 rotations, stratified train/val/test, best checkpoint by validation."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import ModelSpec, save_checkpoint
from .data.dataset import ArrayDataset
from .data.splits import split_feedback
from .distributed import SINGLE, Dist, local_batch_size, shard_order, sum_across, wrap
from .metrics import ClassificationMetrics, classification_metrics, per_class_table
from .models import SelfExplaining
from .simulate import _write_history, _write_json, _write_text, make_optimizer, place_model
from .train import FeedbackConfig, feedback_step


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


def class_weights(labels: np.ndarray, n_classes: int) -> tuple[float, ...]:
    """Inverse-frequency weights, normalised so a balanced set gets all ones."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    return tuple(float(w) for w in counts.sum() / np.maximum(counts, 1) / n_classes)


def predict_probs(
    model: SelfExplaining, data: ArrayDataset, *, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """Class probabilities (N, C) in eval mode, no CAM."""
    model.eval()
    tensors = data.tensors(device)
    out = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(data)), device=device)
            images = tensors.batch(idx).images
            out.append(torch.softmax(model(images).logits.float(), dim=1).cpu())
    return torch.cat(out).numpy()


def evaluate_classifier(model, data, cfg: BaseConfig) -> ClassificationMetrics:
    probs = predict_probs(model, data, batch_size=cfg.eval_batch_size, device=cfg.device)
    return classification_metrics(data.labels, probs, data.classes)


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

    out = Path(out)
    main = ctx.is_main
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
    (_write_json if main else lambda *a: None)(
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
    batch_size = local_batch_size(cfg.batch_size, ctx)
    tensors = train.tensors(cfg.device)
    best_score, best_state, best_epoch = -math.inf, copy.deepcopy(model.state_dict()), 0
    history = []
    bar = tqdm(range(1, cfg.epochs + 1), disable=not progress, desc="train-base")
    for epoch in bar:
        if ctx.enabled:
            order = shard_order(len(train), epoch=epoch, seed=cfg.seed, ctx=ctx)
        else:
            order = torch.randperm(len(train), generator=generator)
        order = order.to(cfg.device)
        total = torch.zeros((), device=cfg.device)
        seen = torch.zeros((), device=cfg.device)
        skipped = torch.zeros((), device=cfg.device)
        for start in range(0, len(order), batch_size):
            batch = tensors.batch(order[start : start + batch_size])
            if cfg.augment:
                images, masks = random_flip_rotate(batch.images, batch.masks, aug_gen)
                batch = batch._replace(images=images, masks=masks)
            if batch.images.device.type == "cuda":
                batch = batch._replace(
                    images=batch.images.contiguous(memory_format=torch.channels_last)
                )
            stats = feedback_step(trained, batch, optimizer, fb, sync=False)
            loss = stats["loss"].to(cfg.device)
            finite = torch.isfinite(loss)
            skipped += stats["skipped"].to(cfg.device)
            total += torch.where(finite, loss, 0.0) * len(batch.labels)
            seen += finite.float() * len(batch.labels)
        sums = sum_across(torch.stack([total, seen, skipped]), ctx)
        total, seen = float(sums[0]), float(sums[1])
        skipped = int(sums[2]) // ctx.world_size
        metrics = evaluate_classifier(model, val, cfg)
        score = getattr(metrics, cfg.select_by)
        history.append(
            {
                "mode": "base",
                "slice": 0,
                "epoch": epoch,
                "train_loss": total / max(seen, 1),
                "skipped_steps": skipped,
                "val_accuracy": metrics.accuracy,
                "val_avg_sensitivity": metrics.avg_sensitivity,
                "val_jaccard_mean": float("nan"),
            }
        )
        bar.set_postfix(loss=f"{total / max(seen, 1):.3f}", val_acc=f"{metrics.accuracy:.3f}")
        if math.isfinite(score) and score > best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    test_metrics = evaluate_classifier(model, test, cfg)
    result = {
        "best_epoch": best_epoch,
        "val_" + cfg.select_by: best_score,
        "test": test_metrics.to_dict(),
    }
    if not main:
        return result
    save_checkpoint(out / "model.pt", model, spec, config={"base": asdict(cfg)}, metrics=result)
    _write_history(out / "history.csv", history)
    _write_text(out / "table.md", per_class_table(test_metrics))
    _write_json(out / "metrics.json", result)
    return result
