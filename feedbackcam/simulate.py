"""Feedback simulations (thesis chapter 5): a simulated dermatologist corrects a baseline model.

The experiment is ``run_simulation(...) -> results``: train (or take) a baseline on a base set
with classification loss; split the feedback set 80/10/10 (ids that overlap the base model's
data stay in feedback-train); optionally balance feedback-train; then, per loss mode, fine-tune a
copy of the baseline for E epochs (or over K slices), keep the best *eligible* epoch by
validation mean Jaccard (or accuracy) — an epoch whose average sensitivity falls more than a
tolerance below the baseline's is a collapsed classifier and is never kept — and report its test
metrics. Everything it writes goes to one output folder, beside the resolved config.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .balance import auto_scaled, probe_batches
from .checkpoint import ModelSpec, save_checkpoint
from .counterfactual import fill_region_uint8
from .data.dataset import ArrayDataset, TensorData
from .data.splits import BALANCE_MODES, balance, make_slices, split_feedback
from .decision import head, refit_bias
from .distributed import SINGLE, Dist, wrap
from .evaluate import Evaluation, evaluate
from .fileio import write_csv, write_json, write_text
from .losses import feedback_present
from .objective import ADDED_TERMS, FeedbackConfig, check_feedback_kind
from .reliance import marks_filled
from .selection import (
    CLASS_MEASURES,
    drops,
    noise_margins,
    run_warnings,
    validation_warnings,
)
from .self_explaining import SelfExplaining
from .simulation_data import SimulationData
from .train import (
    Batching,
    BestEpoch,
    class_weights,
    make_optimizer,
    place_model,
    progress_bar,
    train_epochs,
)

log = logging.getLogger(__name__)

MODES = ("cls", "exp", "combined")
# The scales a mode trains with (calibrated before its first step), recorded in its results.
SCALES = ("loss_scale", *(scale for _, scale, _ in ADDED_TERMS))
# FeedbackConfig.auto_scale measures the terms on this many batches of at least this size.
CALIBRATION_BATCHES = 4
CALIBRATION_BATCH = 16
HISTORY_FIELDS = (
    "mode",
    "slice",
    "loss_scale",
    "surroundings_scale",
    "ignore_scale",
    "epoch",
    "train_loss",
    "skipped_steps",
    "val_accuracy",
    "val_avg_sensitivity",
    "val_jaccard_mean",
    "eligible",
)


@dataclass(frozen=True)
class SimulationConfig:
    """One simulation. Defaults reproduce the thesis' runs (section 5.5-5.9).

    Attributes:
        modes: loss modes to run: "cls" (lambda 0), "exp" (lambda 1), "combined"
            (``feedback.lam``).
        feedback: how feedback becomes a loss; its ``lam`` is the combined mode's lambda
            (thesis: 0.3), the only lambda of a simulation.
        epochs: epochs of a full simulation (thesis: up to 40).
        slices: K for a sliced simulation (thesis: 20); None runs the full simulation.
        slice_epochs: epochs per slice (thesis: 20).
        batch_size: feedback batch size (thesis: 1, online gradient descent).
        optimizer, lr, momentum, weight_decay: the fine-tuning optimiser (thesis: plain SGD).
        balance: "none", "reduce" or "upsample" feedback-train (val and test never).
        drop_classes: classes removed from feedback-train when balancing (thesis 5.7: BKL).
        select_by: "jaccard" (thesis) or "accuracy" for the best epoch on val.
        guard_tolerance: the collapse guard: an epoch is eligible only if its validation
            average sensitivity is at most this far below the baseline's. None turns the guard
            off (the thesis' unguarded selection).
        guard_per_class: the guard also holds every class's score to the tolerance (off
            before 2026-12-06, when the score was the sensitivity and refused repairs).
        guard_class_measure: that score: "youden", Youden's J of the class against the rest
            (sensitivity + specificity - 1), lets a class lose sensitivity by what it stops
            taking from the others (the repair of a shortcut that made it absorb a class) and
            refuses a class traded away; "sensitivity" refuses both
            (:func:`feedbackcam.selection.class_scores`). With two classes either class's J
            is twice the average sensitivity less one: the rule holds the average to half
            the tolerance (its chance margin doubles with it).
        guard_confidence: widen the tolerance by what the validation set cannot tell from
            noise at this one-sided confidence (the paired change's bound,
            :func:`feedbackcam.selection.noise_margins`): on ~20 images of a class a point
            threshold of 0.05 rejects good epochs by chance. None: the point threshold.
        class_weighted: fine-tuning cross-entropies weighted by feedback-train's inverse class
            frequencies, as ``train-base`` weights the base model's: fine-tuning a model on its
            own, unbalanced images then does not drift to the majority class.
        deconfound_validation: where the feedback marks ignore regions, validate on the
            validation images with those regions filled (median colour): a validation split
            confounded like the feedback rewards the marked shortcut, so selection and the
            guard would prefer the model that still uses it. No effect without ignore masks.
        base_epochs, base_lr, base_batch_size: the baseline's classification training.
        seed: seeds the split, balancing, shuffling and initialisation.
        eval_batch_size: batch size of evaluation passes.
        device: "cpu" or "cuda".
    """

    modes: tuple[str, ...] = MODES
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
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
    guard_tolerance: float | None = 0.05
    guard_per_class: bool = True
    guard_class_measure: str = "youden"
    guard_confidence: float | None = 0.95
    class_weighted: bool = True
    deconfound_validation: bool = True
    base_epochs: int = 20
    base_lr: float = 1e-3
    base_batch_size: int = 32
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
        if self.guard_class_measure not in CLASS_MEASURES:
            raise ValueError(
                f"guard_class_measure: expected one of {CLASS_MEASURES}, "
                f"got {self.guard_class_measure!r}"
            )
        if self.guard_tolerance is not None and not self.guard_tolerance >= 0:
            raise ValueError(f"guard_tolerance: expected >= 0 or None, got {self.guard_tolerance}")

    @property
    def lam(self) -> float:
        """The combined mode's lambda (``feedback.lam``)."""
        return self.feedback.lam

    def mode_feedback(self, mode: str) -> FeedbackConfig:
        """The feedback config that mode ``mode`` trains with: lambda 0, 1, or ``feedback.lam``."""
        lam = {"cls": 0.0, "exp": 1.0, "combined": self.feedback.lam}[mode]
        return replace(self.feedback, lam=lam)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_baseline(
    model: SelfExplaining,
    base: ArrayDataset,
    cfg: SimulationConfig,
    *,
    progress: bool = False,
    ctx: Dist = SINGLE,
) -> SelfExplaining:
    """Train the initial classifier on the base set with class-weighted cross-entropy."""
    weights = class_weights(base.labels, len(base.classes))
    fb = replace(cfg.feedback, lam=0.0, class_weights=weights, freeze_batchnorm=False)
    generator = torch.Generator().manual_seed(cfg.seed)
    place_model(model, cfg.device)
    optimizer = make_optimizer(model, "adam", cfg.base_lr)
    trained = wrap(model, ctx)
    batching = Batching(cfg.base_batch_size, cfg.device, cfg.seed, ctx)
    data, everything = base.tensors(cfg.device), np.arange(len(base))
    progress_label = "baseline" if progress else None
    train_epochs(
        trained,
        data,
        everything,
        optimizer,
        fb,
        batching,
        epochs=cfg.base_epochs,
        generator=generator,
        first=0,
        progress=progress_label,
    )
    return model


def deconfounded(data: ArrayDataset) -> ArrayDataset:
    """``data`` with every ignore region filled by the image's median colour outside it: the
    same images without the content a user marked as "must not matter"."""
    if data.ignore is None or data.has_ignore is None or not data.has_ignore.any():
        return data
    masks = (data.ignore > 0) & data.has_ignore[:, None, None]
    return replace(data, images=fill_region_uint8(data.images, masks))


def _score(ev: Evaluation, select_by: str) -> float:
    value = ev.jaccard.mean if select_by == "jaccard" else ev.classification.accuracy
    return value if math.isfinite(value) else -math.inf


def _val_row(ev: Evaluation) -> dict[str, Any]:
    """An epoch's validation scores; every class's sensitivity and specificity too, so that a
    run's history can be replayed under either per-class guard."""
    c = ev.classification
    per_class = {}
    for name, m in c.per_class.items():
        per_class[f"val_sensitivity {name}"] = m.sensitivity
        per_class[f"val_specificity {name}"] = m.specificity
    return {
        "val_accuracy": c.accuracy,
        "val_avg_sensitivity": c.avg_sensitivity,
        "val_jaccard_mean": ev.jaccard.mean,
        **per_class,
    }


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
    """Fine-tune a copy of ``baseline`` for ``epochs``; return the best eligible epoch's model.

    Epoch 0 is the incoming model itself (its validation row opens the history), so a run in
    which no epoch improves, or none passes the collapse guard, keeps it: best epoch 0.
    """
    fb = cfg.mode_feedback(mode)
    if cfg.class_weighted and fb.class_weights is None:
        labels = data.labels[torch.as_tensor(train_idx, device=data.labels.device)].cpu().numpy()
        fb = replace(fb, class_weights=class_weights(labels, len(val.classes)))
    model = copy.deepcopy(baseline)
    probe: list = []
    unset = any(getattr(fb, scale) is None for _, scale, _ in ADDED_TERMS)
    if fb.lam > 0 and (fb.auto_scale or unset):
        # A probe of its own generator: the training shuffles stay what they were.
        probe = probe_batches(
            data,
            train_idx,
            max(cfg.batch_size, CALIBRATION_BATCH),
            CALIBRATION_BATCHES,
            generator=torch.Generator().manual_seed(cfg.seed + 1),
        )
    fb = auto_scaled(model, probe, fb)
    stage = {**stage, **{k: getattr(fb, k) for k in SCALES}}
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    trained = wrap(model, ctx)

    def validate() -> Evaluation:
        # every rank evaluates the whole validation set with identical weights (same result)
        return evaluate(
            model, val, batch_size=cfg.eval_batch_size, method=fb.cam, device=cfg.device
        )

    start = validate()
    reference = start.summary()
    best = BestEpoch(model, _score(start, cfg.select_by), start)
    history.append({**stage, "mode": mode, "epoch": 0, **_val_row(start), "eligible": True})
    # Distributed shuffles are numbered apart per slice: slice k's epoch e is 1000 k + e.
    offset = stage.get("slice", 0) * 1000

    refit = fb.refits_offsets and data.ignore is not None and _marks_ignore(data, train_idx)

    def after_epoch(number: int, stats: dict) -> None:
        epoch = number - offset
        # The epoch is judged (and kept, if chosen) with its offsets re-fit; training goes on
        # from the offsets it had, so the re-fit never steers the next epoch.
        trained_bias = head(model).bias.detach().clone() if refit else None
        if refit:
            refit_bias(model, data, index=train_idx, class_weights=fb.class_weights)
        ev = validate()
        margins = None
        if cfg.guard_confidence is not None:
            pred, start_pred = ev.probs.argmax(1), start.probs.argmax(1)
            classes = list(ev.classification.per_class)
            margins = noise_margins(ev.labels, start_pred, pred, classes, cfg.guard_confidence)
        eligible = cfg.guard_tolerance is None or not drops(
            reference,
            ev.summary(),
            cfg.guard_tolerance,
            per_class=cfg.guard_per_class,
            measure=cfg.guard_class_measure,
            margins=margins,
        )
        history.append(
            {
                **stage,
                "mode": mode,
                "epoch": epoch,
                "train_loss": stats["train_loss"],
                "skipped_steps": stats["skipped_steps"],
                **_val_row(ev),
                "eligible": eligible,
            }
        )
        best.offer(model, epoch, _score(ev, cfg.select_by), ev, eligible=eligible)
        if trained_bias is not None:
            with torch.no_grad():
                head(model).bias.copy_(trained_bias)

    batching = Batching(cfg.batch_size, cfg.device, cfg.seed, ctx)
    train_epochs(
        trained,
        data,
        train_idx,
        optimizer,
        fb,
        batching,
        epochs=epochs,
        generator=generator,
        first=1 + offset,
        progress=mode if progress else None,
        after_epoch=after_epoch,
    )
    best.restore(model)
    return model, best.epoch, best.info


def _marks_ignore(data: TensorData, index: np.ndarray) -> bool:
    """Whether any image of ``index`` carries a given, non-empty ignore region."""
    idx = torch.as_tensor(index, device=data.ignore.device)
    has = None if data.has_ignore is None else data.has_ignore[idx]
    return bool(feedback_present(data.ignore[idx], has).any())


def _test_summary(model, test: ArrayDataset, groups: dict[str, np.ndarray], cfg, method) -> dict:
    ev = evaluate(model, test, batch_size=cfg.eval_batch_size, method=method, device=cfg.device)
    summary = ev.summary(bootstrap_seed=cfg.seed)
    pred = ev.probs.argmax(axis=1)
    correct = pred == test.labels
    summary["groups"] = {
        name: {"accuracy": float(correct[m].mean()) if m.any() else None, "n": int(m.sum())}
        for name, m in groups.items()
    }
    # per class: its marked images recognised as they are, and with the marks filled
    marks = marks_filled(model, test, pred, batch_size=cfg.eval_batch_size, device=cfg.device)
    if marks is not None:
        summary["marks_filled"] = marks
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
    out, main = Path(out), ctx.is_main
    progress = progress and main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    feedback = data.feedback
    has_ignore = feedback.has_ignore is not None and bool(feedback.has_ignore.any())
    for mode in cfg.modes:
        check_feedback_kind(cfg.mode_feedback(mode), bool(feedback.has_mask.any()), has_ignore)
    splits = split_feedback(feedback.labels, seed=cfg.seed, train_only=data.train_only)
    drop = [feedback.classes.index(c) for c in cfg.drop_classes]
    train_idx = balance(
        splits.train, feedback.labels, cfg.balance, seed=cfg.seed, drop_classes=drop
    )
    n_seen = 0 if data.train_only is None else int(np.asarray(data.train_only).sum())
    if not (len(splits.val) and len(splits.test) and len(train_idx)):
        raise ValueError(
            f"feedback set of {len(feedback)} image(s) ({n_seen} kept in train as seen by the "
            f"base model) leaves train/val/test = {len(train_idx)}/{len(splits.val)}/"
            f"{len(splits.test)}: too few to simulate"
        )
    if data.train_only is not None:
        held_out = np.concatenate([splits.val, splits.test])
        if np.asarray(data.train_only)[held_out].any():  # split_feedback's promise, checked
            raise ValueError("an image the base model has seen reached val or test")
    source = data.test_override if data.test_override is not None else feedback
    val, test = feedback.subset(splits.val), source.subset(splits.test)
    if cfg.deconfound_validation:
        val = deconfounded(val)
    groups = {name: np.asarray(m)[splits.test] for name, m in data.test_groups.items()}
    split_ids = {
        name: [feedback.ids[i] for i in idx]
        for name, idx in [
            ("train", splits.train),
            ("train_balanced", train_idx),
            ("val", splits.val),
            ("test", splits.test),
        ]
    }
    if main:
        write_json(out / "splits.json", split_ids)
        write_json(
            out / "config.json",
            {
                "simulation": cfg.to_dict(),
                "model": asdict(spec),
                "data": {
                    "n_feedback": len(feedback),
                    "n_base": len(data.base) if data.base is not None else None,
                    "n_seen_by_base_model": n_seen,
                    "classes": list(feedback.classes),
                    "split_sizes": {k: len(v) for k, v in split_ids.items()},
                    "train_class_counts": _counts(feedback.labels[train_idx], feedback.classes),
                },
            },
        )
    base_ids: tuple[str, ...] = ()
    if baseline is None:
        if data.base is None:
            raise ValueError("run_simulation: give either a baseline model or a base set")
        baseline = train_baseline(make_model(), data.base, cfg, progress=progress, ctx=ctx)
        base_ids = data.base.ids
    place_model(baseline, cfg.device)
    ckpt_dir = out / "checkpoints"
    base_cfg = replace(cfg, feedback=replace(cfg.feedback, lam=0.0))
    if main:
        save_checkpoint(
            ckpt_dir / "baseline.pt",
            baseline,
            spec,
            config=base_cfg.to_dict() | {"trained_on": {"train": list(base_ids)}},
        )
    method = cfg.feedback.cam
    results: dict[str, Any] = {
        "baseline": _test_summary(baseline, test, groups, cfg, method),
        "runs": {},
    }
    too_small = validation_warnings(val.labels, val.classes, cfg.guard_tolerance)
    for w in too_small:
        log.warning(w)
    history: list[dict[str, Any]] = []
    tensors = feedback.tensors(cfg.device)
    for mode in progress_bar(cfg.modes, enabled=progress, desc="modes"):
        generator = torch.Generator().manual_seed(cfg.seed)
        # Each mode starts from the same random state (the counterfactual rows' draws use the
        # global generator): its run does not depend on which modes ran before it, or for how
        # many epochs, and its first k epochs are those of a k-epoch run.
        torch.manual_seed(cfg.seed)
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
            run = _test_summary(model, test, groups, cfg, method)
        else:
            model, best_epoch, run = _sliced(
                baseline, tensors, train_idx, feedback, val, test, groups, cfg, mode, generator,
                history, ctx,
            )  # fmt: skip
        run["best_epoch"] = best_epoch
        last = [r for r in history if r["mode"] == mode][-1]  # the scales this mode trained with
        run.update({k: last[k] for k in SCALES})
        run["improved"] = best_epoch > 0
        rejected = sum(1 for r in history if r["mode"] == mode and not r["eligible"])
        run["guard_rejected_epochs"] = rejected
        run["warnings"] = run_warnings(run, best_epoch) + too_small
        if rejected:
            run["warnings"].append(
                f"{rejected} epoch(s) failed the collapse guard (validation average sensitivity "
                f"more than {cfg.guard_tolerance:g} below the baseline's) and were not selected"
            )
        results["runs"][mode] = run
        if main:
            # what ran: this mode's lambda is the config's only lambda
            scales = {k: run[k] for k in SCALES}
            ran = replace(cfg, feedback=replace(cfg.mode_feedback(mode), **scales))
            trained_on = {"train": list(base_ids) + split_ids["train"], "val": split_ids["val"]}
            save_checkpoint(
                ckpt_dir / f"{mode}.pt",
                model,
                spec,
                config=ran.to_dict() | {"mode": mode, "trained_on": trained_on},
                metrics=run,
            )
    results["baseline"]["warnings"] = run_warnings(results["baseline"])
    if not main:
        return results
    first = history[0] if history else {}
    per_class = [k for k in first if k.startswith(("val_sensitivity ", "val_specificity "))]
    write_csv(out / "history.csv", history, (*HISTORY_FIELDS, *per_class))
    write_json(out / "results.json", results)
    from .report import simulation_plots, simulation_table

    write_text(out / "results.md", simulation_table(results, feedback.classes))
    simulation_plots(history, results, out)
    return results


def _sliced(
    baseline, tensors, train_idx, feedback, val, test, groups, cfg, mode, generator, history, ctx
):
    """Sliced simulation: per slice, ``slice_epochs`` epochs, the best by val carried on."""
    model = baseline
    slices = make_slices(train_idx, feedback.labels, cfg.slices, seed=cfg.seed)
    rows = []
    best_epoch = 0
    method = cfg.feedback.cam
    for k, part in enumerate(progress_bar(slices, enabled=False), 1):
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
        summary = _test_summary(model, test, groups, cfg, method)
        rows.append(
            {
                "slice": k,
                "mode": mode,
                "accuracy": summary["accuracy"],
                "avg_sensitivity": summary["avg_sensitivity"],
                "jaccard_mean": summary["jaccard_mean"],
            }
        )
    run = _test_summary(model, test, groups, cfg, method) | {"slices": rows}
    return model, best_epoch, run


def _counts(labels: np.ndarray, classes) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(classes))
    return {c: int(n) for c, n in zip(classes, counts)}
