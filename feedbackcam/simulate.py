"""Feedback simulations (thesis chapter 5): a simulated dermatologist corrects a baseline model.

The experiment is ``run_simulation(...) -> results``: train (or take) a baseline on a base set
with classification loss; split the feedback set 80/10/10 (ids that overlap the base set stay in
feedback-train); optionally balance feedback-train; then, per loss mode, fine-tune a copy of the
baseline for E epochs (or over K slices), keep the best epoch by validation mean Jaccard (or
accuracy), and report its test metrics. Everything it writes goes to one output folder, beside
the resolved config.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import ModelSpec, save_checkpoint
from .data.dataset import ArrayDataset, TensorData
from .data.splits import BALANCE_MODES, balance, make_slices, split_feedback
from .distributed import SINGLE, Dist, local_batch_size, shard_order, sum_across, wrap
from .evaluate import Evaluation, evaluate
from .fileio import write_atomic
from .models import SelfExplaining
from .train import FeedbackConfig, feedback_step

log = logging.getLogger(__name__)

MODES = ("cls", "exp", "combined")


@dataclass(frozen=True)
class SimulationConfig:
    """One simulation. Defaults reproduce the thesis' runs (section 5.5-5.9).

    Attributes:
        modes: loss modes to run: "cls" (lambda 0), "exp" (lambda 1), "combined" (``lam``).
        lam: lambda of the combined mode (thesis: 0.3).
        epochs: epochs of a full simulation (thesis: up to 40).
        slices: K for a sliced simulation (thesis: 20); None runs the full simulation.
        slice_epochs: epochs per slice (thesis: 20).
        batch_size: feedback batch size (thesis: 1, online gradient descent).
        optimizer, lr, momentum, weight_decay: the fine-tuning optimiser (thesis: plain SGD).
        balance: "none", "reduce" or "upsample" feedback-train (val and test never).
        drop_classes: classes removed from feedback-train when balancing (thesis 5.7: BKL).
        select_by: "jaccard" (thesis) or "accuracy" for the best epoch on val.
        base_epochs, base_lr, base_batch_size: the baseline's classification training.
        feedback: how feedback becomes a loss; its ``lam`` is set per mode.
        seed: seeds the split, balancing, shuffling and initialisation.
        eval_batch_size: batch size of evaluation passes.
        device: "cpu" or "cuda".
    """

    modes: tuple[str, ...] = MODES
    lam: float = 0.3
    epochs: int = 40
    slices: int | None = None
    slice_epochs: int = 20
    batch_size: int = 1
    optimizer: str = "sgd"
    lr: float = 1e-4
    momentum: float = 0.0
    weight_decay: float = 0.0
    balance: str = "none"
    drop_classes: tuple[str, ...] = ()
    select_by: str = "jaccard"
    base_epochs: int = 20
    base_lr: float = 1e-3
    base_batch_size: int = 32
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    seed: int = 0
    eval_batch_size: int = 64
    device: str = "cpu"

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes: expected a non-empty subset of {MODES}, got {self.modes}")
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"balance: expected one of {BALANCE_MODES}, got {self.balance!r}")
        if self.select_by not in ("jaccard", "accuracy"):
            raise ValueError(f"select_by: expected 'jaccard' or 'accuracy', got {self.select_by!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer: expected 'sgd' or 'adam', got {self.optimizer!r}")
        for name in ("epochs", "slice_epochs", "batch_size", "base_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.slices is not None and self.slices < 1:
            raise ValueError(f"slices: expected >= 1 or None, got {self.slices}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam: expected a value in [0, 1], got {self.lam}")

    def mode_lambda(self, mode: str) -> float:
        return {"cls": 0.0, "exp": 1.0, "combined": self.lam}[mode]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_optimizer(model: torch.nn.Module, name: str, lr: float, momentum: float, wd: float):
    """Adam or SGD; fused on a GPU, which also lets a non-finite step be skipped without a
    host synchronisation (see :func:`feedbackcam.train.feedback_step`)."""
    fused = any(p.device.type == "cuda" for p in model.parameters()) or None
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd, fused=fused)
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=wd, fused=fused
    )


def place_model(model: SelfExplaining, device: str) -> SelfExplaining:
    """Move to ``device``; channels-last memory on a GPU (faster convolutions in bf16)."""
    model.to(device)
    if torch.device(device).type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def train_epoch(
    model: SelfExplaining,
    data: TensorData,
    indices: np.ndarray,
    optimizer: torch.optim.Optimizer,
    cfg: FeedbackConfig,
    *,
    batch_size: int,
    generator: torch.Generator,
    device: str = "cpu",
    progress: bool = False,
    ctx: Dist = SINGLE,
    epoch: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """One pass over ``indices`` in shuffled mini-batches; mean loss and skipped-step count.

    The data may live on the GPU already (``data`` built on ``device``); statistics are summed
    on the device and read once per epoch, so the steps run without host synchronisation.
    Distributed (``ctx``), each rank takes its DistributedSampler share of the epoch and
    ``batch_size / world_size`` per step; the statistics are summed across ranks.
    """
    if ctx.enabled:
        perm = shard_order(len(indices), epoch=epoch, seed=seed, ctx=ctx)
        batch_size = local_batch_size(batch_size, ctx)
    else:
        perm = torch.randperm(len(indices), generator=generator)
    order = torch.as_tensor(indices)[perm].to(data.labels.device)
    total = torch.zeros((), device=device)
    weight = torch.zeros((), device=device)
    skipped = torch.zeros((), device=device)
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, disable=not progress, leave=False, desc="steps"):
        idx = order[start : start + batch_size]
        batch = data.batch(idx).to(device)
        if batch.images.device.type == "cuda":
            batch = batch._replace(
                images=batch.images.contiguous(memory_format=torch.channels_last)
            )
        stats = feedback_step(model, batch, optimizer, cfg, sync=False)
        loss = stats["loss"].to(device)
        finite = torch.isfinite(loss)
        skipped += stats["skipped"].to(device)
        total += torch.where(finite, loss, 0.0) * len(idx)
        weight += finite.float() * len(idx)
    totals = sum_across(torch.stack([total, weight, skipped]), ctx)
    total, weight = totals[0], totals[1]
    n_skipped = int(totals[2]) // (ctx.world_size if ctx.enabled else 1)  # a step skips on all
    if n_skipped and ctx.is_main:
        log.warning("%d step(s) skipped for a non-finite loss or gradient", n_skipped)
    return {"train_loss": float(total / weight.clamp_min(1)), "skipped_steps": n_skipped}


def train_baseline(
    model: SelfExplaining,
    base: ArrayDataset,
    cfg: SimulationConfig,
    *,
    progress: bool = False,
    ctx: Dist = SINGLE,
) -> SelfExplaining:
    """Train the initial classifier on the base set with (class-weighted) cross-entropy."""
    counts = np.bincount(base.labels, minlength=len(base.classes)).astype(float)
    weights = tuple(float(w) for w in counts.sum() / np.maximum(counts, 1) / len(counts))
    fb = replace(cfg.feedback, lam=0.0, class_weights=weights, freeze_batchnorm=False)
    generator = torch.Generator().manual_seed(cfg.seed)
    place_model(model, cfg.device)
    optimizer = make_optimizer(model, "adam", cfg.base_lr, 0.0, 0.0)
    trained = wrap(model, ctx)
    data = base.tensors(cfg.device)
    bar = tqdm(range(cfg.base_epochs), disable=not progress, desc="baseline", leave=False)
    for epoch in bar:
        stats = train_epoch(
            trained,
            data,
            np.arange(len(base)),
            optimizer,
            fb,
            batch_size=cfg.base_batch_size,
            generator=generator,
            device=cfg.device,
            ctx=ctx,
            epoch=epoch,
            seed=cfg.seed,
        )
        bar.set_postfix(loss=f"{stats['train_loss']:.3f}")
    return model


def _score(ev: Evaluation, select_by: str) -> float:
    value = ev.jaccard.mean if select_by == "jaccard" else ev.classification.accuracy
    return value if math.isfinite(value) else -math.inf


def fine_tune(
    baseline: SelfExplaining,
    data: TensorData,
    train_idx: np.ndarray,
    val: ArrayDataset,
    cfg: SimulationConfig,
    mode: str,
    *,
    epochs: int,
    generator: torch.Generator,
    history: list[dict[str, Any]],
    stage: dict[str, Any],
    progress: bool = False,
    ctx: Dist = SINGLE,
) -> tuple[SelfExplaining, int, Evaluation]:
    """Fine-tune a copy of ``baseline`` for ``epochs``; return the best epoch's model by val.

    Epoch 0 is the incoming model itself, so a run that only makes things worse keeps it.
    """
    fb = replace(cfg.feedback, lam=cfg.mode_lambda(mode))
    model = copy.deepcopy(baseline)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    trained = wrap(model, ctx)
    # every rank evaluates the whole validation set with identical weights (same result)
    best_ev = evaluate(model, val, batch_size=cfg.eval_batch_size, device=cfg.device)
    best_state, best_epoch = copy.deepcopy(model.state_dict()), 0
    best_score = _score(best_ev, cfg.select_by)
    bar = tqdm(range(1, epochs + 1), disable=not progress, leave=False, desc=f"{mode}")
    for epoch in bar:
        stats = train_epoch(
            trained,
            data,
            train_idx,
            optimizer,
            fb,
            batch_size=cfg.batch_size,
            generator=generator,
            device=cfg.device,
            ctx=ctx,
            epoch=epoch + stage.get("slice", 0) * 1000,
            seed=cfg.seed,
        )
        ev = evaluate(model, val, batch_size=cfg.eval_batch_size, device=cfg.device)
        history.append(
            {
                **stage,
                "mode": mode,
                "epoch": epoch,
                "train_loss": stats["train_loss"],
                "skipped_steps": stats["skipped_steps"],
                "val_accuracy": ev.classification.accuracy,
                "val_avg_sensitivity": ev.classification.avg_sensitivity,
                "val_jaccard_mean": ev.jaccard.mean,
            }
        )
        bar.set_postfix(loss=f"{stats['train_loss']:.3f}", jac=f"{ev.jaccard.mean:.3f}")
        score = _score(ev, cfg.select_by)
        if score > best_score:
            best_score, best_epoch, best_ev = score, epoch, ev
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model, best_epoch, best_ev


@dataclass(frozen=True)
class SimulationData:
    """What a simulation runs on.

    Attributes:
        feedback: the feedback pool, split 80/10/10 by the simulation.
        base: the base model's training set (None when a trained baseline is given).
        train_only: bool (N,) over ``feedback``: overlaps the base set, feedback-train only.
        test_override: optional replacement for the test split's images, same ids in the same
            order as ``feedback`` (SynthDerm draws the test split with a class-independent
            confounder: the same lesions, the artifact at random).
        test_groups: named boolean masks over ``feedback`` for subgroup accuracies on test
            (e.g. images with and without the artifact).
    """

    feedback: ArrayDataset
    base: ArrayDataset | None = None
    train_only: np.ndarray | None = None
    test_override: ArrayDataset | None = None
    test_groups: dict[str, np.ndarray] = field(default_factory=dict)


def _test_summary(model, test: ArrayDataset, groups: dict[str, np.ndarray], cfg) -> dict:
    ev = evaluate(model, test, batch_size=cfg.eval_batch_size, device=cfg.device)
    summary = ev.summary()
    pred = ev.probs.argmax(axis=1)
    correct = pred == test.labels
    summary["groups"] = {
        name: {"accuracy": float(correct[m].mean()) if m.any() else None, "n": int(m.sum())}
        for name, m in groups.items()
    }
    return summary


def run_simulation(
    data: SimulationData,
    cfg: SimulationConfig,
    out: str | Path,
    *,
    make_model: Callable[[], SelfExplaining],
    spec: ModelSpec,
    baseline: SelfExplaining | None = None,
    progress: bool = True,
    ctx: Dist = SINGLE,
) -> dict[str, Any]:
    """Run the baseline and every mode; write config, history, results, table, plots, models.

    Returns the results dict (also written to ``out/results.json``). Distributed (``ctx``),
    every rank computes and only rank 0 writes.
    """
    out = Path(out)
    main = ctx.is_main
    progress = progress and main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    feedback = data.feedback
    splits = split_feedback(feedback.labels, seed=cfg.seed, train_only=data.train_only)
    drop = [feedback.classes.index(c) for c in cfg.drop_classes]
    train_idx = balance(
        splits.train, feedback.labels, cfg.balance, seed=cfg.seed, drop_classes=drop
    )
    if not (len(splits.val) and len(splits.test) and len(train_idx)):
        n_only = 0 if data.train_only is None else int(np.asarray(data.train_only).sum())
        raise ValueError(
            f"feedback set of {len(feedback)} image(s) ({n_only} kept in train as overlapping "
            f"the base data) leaves train/val/test = {len(train_idx)}/{len(splits.val)}/"
            f"{len(splits.test)}: too few to simulate"
        )
    source = data.test_override if data.test_override is not None else feedback
    val, test = feedback.subset(splits.val), source.subset(splits.test)
    groups = {name: np.asarray(m)[splits.test] for name, m in data.test_groups.items()}
    write_json = _write_json if main else (lambda *a: None)
    write_json(
        out / "splits.json",
        {
            name: [feedback.ids[i] for i in idx]
            for name, idx in [
                ("train", splits.train),
                ("train_balanced", train_idx),
                ("val", splits.val),
                ("test", splits.test),
            ]
        },
    )
    write_json(
        out / "config.json",
        {
            "simulation": cfg.to_dict(),
            "model": asdict(spec),
            "data": {
                "n_feedback": len(feedback),
                "n_base": len(data.base) if data.base is not None else None,
                "classes": list(feedback.classes),
                "split_sizes": {
                    "train": len(splits.train),
                    "train_balanced": len(train_idx),
                    "val": len(splits.val),
                    "test": len(splits.test),
                },
                "train_class_counts": _counts(feedback.labels[train_idx], feedback.classes),
            },
        },
    )
    if baseline is None:
        if data.base is None:
            raise ValueError("run_simulation: give either a baseline model or a base set")
        baseline = train_baseline(make_model(), data.base, cfg, progress=progress, ctx=ctx)
    place_model(baseline, cfg.device)
    ckpt_dir = out / "checkpoints"
    if main:
        save_checkpoint(ckpt_dir / "baseline.pt", baseline, spec, config=cfg.to_dict())
    results: dict[str, Any] = {"baseline": _test_summary(baseline, test, groups, cfg), "runs": {}}
    history: list[dict[str, Any]] = []
    tensors = feedback.tensors(cfg.device)
    for mode in tqdm(cfg.modes, disable=not progress, desc="modes"):
        generator = torch.Generator().manual_seed(cfg.seed)
        if cfg.slices is None:
            model, best_epoch, _ = fine_tune(
                baseline,
                tensors,
                train_idx,
                val,
                cfg,
                mode,
                epochs=cfg.epochs,
                generator=generator,
                history=history,
                stage={"slice": 0},
                progress=progress,
                ctx=ctx,
            )
            run = _test_summary(model, test, groups, cfg) | {"best_epoch": best_epoch}
        else:
            model, run = _sliced(
                baseline,
                tensors,
                train_idx,
                feedback,
                val,
                test,
                groups,
                cfg,
                mode,
                generator,
                history,
                progress,
                ctx,
            )
        results["runs"][mode] = run
        if main:
            save_checkpoint(ckpt_dir / f"{mode}.pt", model, spec, config=cfg.to_dict(), metrics=run)
    if not main:
        return results
    _write_history(out / "history.csv", history)
    _write_json(out / "results.json", results)
    from .report import simulation_plots, simulation_table

    _write_text(out / "results.md", simulation_table(results, feedback.classes))
    simulation_plots(history, results, out)
    return results


def _sliced(
    baseline,
    tensors,
    train_idx,
    feedback,
    val,
    test,
    groups,
    cfg,
    mode,
    generator,
    history,
    progress,
    ctx=SINGLE,
):
    """Sliced simulation: per slice, ``slice_epochs`` epochs, the best by val carried on."""
    model = baseline
    slices = make_slices(train_idx, feedback.labels, cfg.slices, seed=cfg.seed)
    rows = []
    best_epoch = 0
    for k, part in enumerate(tqdm(slices, disable=not progress, leave=False, desc="slices"), 1):
        model, best_epoch, _ = fine_tune(
            model,
            tensors,
            part,
            val,
            cfg,
            mode,
            epochs=cfg.slice_epochs,
            generator=generator,
            history=history,
            stage={"slice": k},
            ctx=ctx,
        )
        summary = _test_summary(model, test, groups, cfg)
        rows.append(
            {
                "slice": k,
                "mode": mode,
                "accuracy": summary["accuracy"],
                "avg_sensitivity": summary["avg_sensitivity"],
                "jaccard_mean": summary["jaccard_mean"],
            }
        )
    run = _test_summary(model, test, groups, cfg) | {"best_epoch": best_epoch, "slices": rows}
    return model, run


def _counts(labels: np.ndarray, classes) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(classes))
    return {c: int(n) for c, n in zip(classes, counts)}


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    write_atomic(path, write, binary="b" in mode)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: json.dump(_jsonable(obj), f, indent=2, allow_nan=False))


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text))


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = [
        "mode",
        "slice",
        "epoch",
        "train_loss",
        "skipped_steps",
        "val_accuracy",
        "val_avg_sensitivity",
        "val_jaccard_mean",
    ]

    def write(f):
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    _atomic_write(path, write)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj
