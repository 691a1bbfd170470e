"""Running the shortcut benchmark: for each data set and seed, train a baseline on confounded
data; fine-tune a copy on the confounded feedback pool with each method (class feedback, or a
registered explanation loss given the user's ignore or keep masks); train the same network
without the confounder (the ceiling); score every model (:mod:`.metrics`). Controls replace the
masks by random, wrong-region or half masks; the efficiency runs give feedback on a share of the
images. Baselines, ceilings and fine-tunes all train through the project's one loop
(:func:`feedbackcam.train.train_epochs`).

Protocol: each method gets the same tuning budget (``BenchConfig.lams``, with the explanation
terms scaled so that lambda is their share of the gradient at the start, see
:func:`~feedbackcam.balance.auto_scaled`); the setting is chosen on the tuning seed's
*validation* split by :func:`.rules.choose_lambda`. Test numbers never choose anything.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .. import clarc, losses
from ..balance import auto_scaled, probe_batches
from ..data.dataset import ArrayDataset
from ..fileio import write_atomic, write_json
from ..models import build_model
from ..objective import ADDED_TERMS, FeedbackConfig
from ..selection import CLASS_MEASURES
from ..self_explaining import SelfExplaining
from ..train import (
    Batching,
    BestEpoch,
    class_weights,
    make_optimizer,
    train_epochs,
)
from .config import CLARC, CLASS_ONLY, WHOLE_CONTROLS, BenchConfig, Schedule, needs_keep_masks
from .data import ShortcutData, ShortcutEval
from .datasets import load_data
from .metrics import shortcut_scores, val_scores
from .report import write_outputs
from .rules import below_floors, choose_lambda, class_floors, class_values, flip_key


def make_model(n_classes: int, sched: Schedule, seed: int) -> SelfExplaining:
    """The schedule's network, seeded (ImageNet weights for EfficientNet-Lite0, offline)."""
    torch.manual_seed(seed)
    weights = "imagenet" if sched.arch == "efficientnet_lite0" else None
    kwargs = {"width": sched.width} if sched.arch in ("small_cnn", "decoy_cnn") else {}
    return build_model(sched.arch, n_classes, layers=sched.layer or None, weights=weights, **kwargs)


def train_classifier(
    model: SelfExplaining, data: ArrayDataset, sched: Schedule, seed: int
) -> SelfExplaining:
    """Plain cross-entropy training (the baseline and the ceiling), Adam, seeded shuffling;
    BatchNorm statistics learn the data (as in base training); inverse-frequency class weights
    where the schedule says so (as ``train-base`` trains)."""
    weights = class_weights(data.labels, len(data.classes)) if sched.weighted else None
    cfg = FeedbackConfig(lam=0.0, freeze_batchnorm=False, class_weights=weights)
    opt = make_optimizer(model, "adam", sched.base_lr)
    g = torch.Generator().manual_seed(seed)
    everything = np.arange(len(data))
    batching = Batching(sched.base_batch)
    train_epochs(
        model, data.tensors(), everything, opt, cfg, batching, epochs=sched.base_epochs, generator=g
    )
    return model


def method_config(method: str, lam: float, weights=None, **objective) -> FeedbackConfig:
    """The objective of a benchmark method: ``"class"`` (lambda 0), a registered loss alone, or
    ``"A+B[+C]"``: loss A as the explanation loss with B (and C) as its added terms, each in the
    slot of the masks it learns from (``"jaccard+surroundings+invariance_balanced"`` is the
    library's default objective). A method runs exactly the terms it names.

    ``objective``: the :class:`~feedbackcam.objective.FeedbackConfig` fields the benchmark sets
    beside the method (:meth:`~.config.BenchConfig.objective`): ``recalibrate_batchnorm``
    (False: the runs before 2026-12-05, BatchNorm's statistics those of the incoming model),
    ``counterfactual_symmetries`` (the counterfactual terms turn or mirror what they move) and
    ``counterfactual_share``, which here defaults to None: every marked row, as
    docs/shortcuts.md measured it (the library samples a share of the batch's rows per term,
    the same loss in expectation). The others keep the library's defaults."""
    objective = {"counterfactual_share": None, **objective}
    if method == CLASS_ONLY:
        return FeedbackConfig(
            lam=0.0, explanation_loss="rrr_ignore", surroundings_loss=None, ignore_loss=None,
            class_weights=weights, **objective,
        )  # fmt: skip
    first, *added = method.split("+")
    slots = {field: None for field, _, _ in ADDED_TERMS}
    for name in added:
        needs = losses.get_loss(name).needs
        field = next(f for f, _, kind in ADDED_TERMS if kind == needs)
        if slots[field] is not None:
            raise ValueError(f"method {method!r}: two losses for {needs} masks")
        slots[field] = name
    return FeedbackConfig(
        lam=lam, explanation_loss=first, class_weights=weights, **slots, **objective
    )


class EpochChoice:
    """A per-class collapse guard on a benchmark's validation split, choosing the epoch a
    fine-tune keeps (``simulate`` too keeps a guarded epoch, on average sensitivity by default).

    An epoch is eligible when no class's score on the filled validation images falls below the
    incoming model's floor (:func:`.rules.class_floors`: its score less ``tolerance`` and what
    two models can differ by chance on this many images). Among the eligible epochs, the
    incoming model (epoch 0) included, the lowest validation flip rate wins, ties to the later
    epoch; without a flip rate (no marked confounder on validation, the trap splits) the last
    eligible epoch. Validation numbers only.

    The score (``measure``) is the class's Youden's J against the rest by default. The floors
    come from the model being repaired: where its shortcut made one class absorb another (the
    demo's baseline: NV 1.00, MEL 0.03 with the patch filled), the repair lowers the absorbing
    class's sensitivity, and a guard on sensitivity (``measure="sensitivity"``, the runs before
    2026-12-06) refused it (docs/real-artifacts.md, "A guard that tells repair from collapse");
    its specificity rises by what it stops absorbing. The history records both verdicts."""

    def __init__(self, val: ShortcutEval, tolerance: float, measure: str = "youden") -> None:
        self.val, self.tolerance, self.measure = val, tolerance, measure
        self.floors: dict[str, list[float]] = {}
        self.history: list[dict] = []
        self._best: BestEpoch | None = None  # scored by minus the flip rate

    @property
    def epoch(self) -> int | None:
        """The epoch kept (None before :meth:`start`)."""
        return None if self._best is None else self._best.epoch

    def _verdicts(self, row: dict) -> dict[str, bool]:
        return {
            m: not below_floors(class_values(row, m), floors) for m, floors in self.floors.items()
        }

    @staticmethod
    def _entry(epoch: int, row: dict, eligible: bool, verdicts: dict[str, bool]) -> dict:
        keys = ("val_flip", "val_avg_sens_filled", "val_sens_filled", "val_spec_filled")
        return {
            "epoch": epoch,
            **{k: row[k] for k in keys},
            "val_flip_to_target": row.get("val_flip_to_target", math.nan),
            "eligible": eligible,
            **{f"eligible_{m}": v for m, v in verdicts.items()},
        }

    def start(self, model: SelfExplaining) -> None:
        row = val_scores(model, self.val)
        self.floors = {m: class_floors(row, self.tolerance, measure=m) for m in CLASS_MEASURES}
        self._best = BestEpoch(model, -flip_key(row), later_ties=True)
        self.history = [self._entry(0, row, True, {m: True for m in self.floors})]

    def offer(self, model: SelfExplaining, epoch: int) -> None:
        row = val_scores(model, self.val)
        verdicts = self._verdicts(row)
        eligible = verdicts[self.measure]
        self.history.append(self._entry(epoch, row, eligible, verdicts))
        self._best.offer(model, epoch, -flip_key(row), eligible=eligible)

    def restore(self, model: SelfExplaining) -> None:
        self._best.restore(model)


def fine_tune(
    base: SelfExplaining,
    data: ShortcutData | ArrayDataset,
    sched: Schedule,
    method: str,
    lam: float,
    seed: int,
    *,
    mask_kind: str = "ignore",
    fraction: float = 1.0,
    calibration_batches: int = 4,
    class_weighted: bool = False,
    choice: EpochChoice | None = None,
    **objective,
) -> tuple[SelfExplaining, float]:
    """Fine-tune a copy of ``base`` on the feedback pool with one method (:func:`method_config`);
    return it and its loss scale.

    ``data``: a data set's :class:`~.data.ShortcutData` (its pool, with the ``mask_kind`` ignore
    masks) or a pool of its own. ``fraction`` of the pool's marked images (a seeded choice)
    carry their ignore mask; the others are still in the pool with their labels and keep masks.
    Every term's scale is calibrated on the first batches so that lambda is the explanation
    share of the starting gradient (:func:`~feedbackcam.balance.auto_scaled`).
    ``class_weighted`` (or a weighted schedule): every cross-entropy, the classification term's
    and the counterfactuals', is weighted by the pool's inverse class frequencies.
    ``choice``: keep the epoch it chooses (:class:`EpochChoice`, its ``epoch`` says which)
    instead of the last. ``objective``: FeedbackConfig fields beside the method
    (:func:`method_config`'s: BatchNorm re-estimated after each epoch, turned counterfactuals,
    the counterfactual rows a term forwards per step).
    """
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    pool, given = feedback_pool(data, mask_kind, fraction, g, seed)
    n = len(pool)
    weighted = class_weighted or sched.weighted
    weights = class_weights(pool.labels, len(pool.classes)) if weighted else None
    if method in CLARC:
        return _clarc(model, pool, given, sched, method, g, weights), 1.0
    cfg = method_config(method, lam, weights, **objective)
    tensors = pool.tensors()
    everything = np.arange(n)
    torch.manual_seed(seed)
    if cfg.lam > 0:
        probe = probe_batches(tensors, everything, sched.batch, calibration_batches, generator=g)
        cfg = auto_scaled(model, probe, replace(cfg, auto_scale=True))
    opt = make_optimizer(model, "adam", sched.lr)
    batching = Batching(sched.batch)
    after = None
    if choice is not None:
        choice.start(model)

        def after(epoch: int, stats: dict) -> None:
            choice.offer(model, epoch)

    train_epochs(
        model,
        tensors,
        everything,
        opt,
        cfg,
        batching,
        epochs=sched.epochs,
        generator=g,
        after_epoch=after,
    )
    if choice is not None:
        choice.restore(model)
    return model, cfg.loss_scale


def feedback_pool(
    data: ShortcutData | ArrayDataset,
    mask_kind: str,
    fraction: float,
    g: torch.Generator,
    seed: int,
) -> tuple[ArrayDataset, np.ndarray]:
    """The pool a fine-tune learns from and which of its images carry their ignore mask
    (``fraction`` of the marked ones, in an order drawn from ``g``), as :func:`fine_tune` builds
    it; the same ``seed`` and a fresh generator give the same pool."""
    pool = data.pool if isinstance(data, ShortcutData) else data
    n = len(pool)
    marked = (
        np.zeros(n, bool)
        if pool.ignore is None
        else pool.ignore.reshape(n, -1).any(1) & (pool.has_ignore is None or pool.has_ignore)
    )
    order = torch.randperm(n, generator=g).numpy()
    ranked = order[marked[order]]
    given = np.zeros(n, bool)
    given[ranked[: int(round(fraction * len(ranked)))]] = True
    if isinstance(data, ShortcutData):
        pool = data.pool_with(mask_kind, given, seed)
    elif pool.ignore is not None:
        pool = replace(pool, ignore=pool.ignore * given[:, None, None], has_ignore=given)
    return pool, given


def _clarc(model, pool: ArrayDataset, given: np.ndarray, sched: Schedule, method, g, weights):
    """P-ClArC (the artifact's direction projected out, no training) or A-ClArC (class
    feedback fine-tuning with the direction added to every image), the direction from the
    marked images vs the rest of the pool (:mod:`feedbackcam.clarc`)."""
    d = clarc.artifact_direction(model, pool.images, given)
    if method == "p_clarc":
        clarc.attach(model, d, d.clean)  # for good: this copy is only evaluated
        return model
    cfg = method_config(CLASS_ONLY, 0.0, weights)
    opt = make_optimizer(model, "adam", sched.lr)
    with clarc.augmented(model, d):
        train_epochs(
            model, pool.tensors(), np.arange(len(pool)), opt, cfg, Batching(sched.batch),
            epochs=sched.epochs, generator=g,
        )  # fmt: skip
    return model


# A fine-tune scored again after its decision's offsets are re-fit (BenchConfig.refit_bias)
# is a row of its own, the method's name with the suffix of how they were re-fit: on the pool
# it was fine-tuned on, with the fine-tune's class weights; on the validation split (held out:
# its validation numbers then are not); on the pool at the balanced operating point (inverse
# class frequencies, whatever the fine-tune's weights).
REFIT = {"pool": " +refit", "val": " +refit val", "weighted": " +refit weighted"}


def refit_row(
    model, data: ShortcutData, pool: ArrayDataset, weighted: bool, scored, on: str = "pool"
) -> dict:
    """A copy of ``model`` with the last layer's bias re-fit (:data:`REFIT`: "pool", "val" or
    "weighted"; ``pool``: the one it was fine-tuned on, :func:`feedback_pool`), marked regions
    filled (:func:`feedbackcam.decision.refit_bias`), scored again; ``scored``: its row before."""
    from ..decision import refit_bias

    started = time.perf_counter()
    model = copy.deepcopy(model)
    balanced = weighted or on == "weighted"
    weights = class_weights(pool.labels, len(pool.classes)) if balanced else None
    change = refit_bias(model, data.val.data if on == "val" else pool, class_weights=weights)
    seconds = scored["seconds"] + round(time.perf_counter() - started, 1)
    return {
        "loss_scale": scored["loss_scale"],
        "bias_change": change.tolist(),
        **evaluate_row(model, data),
        "seconds": seconds,
    }


def baseline(path: Path, data: ShortcutData, sched: Schedule, seed: int) -> SelfExplaining:
    """The seed's baseline, trained once and kept at ``path`` (a resumed or parallel run on
    the same folder loads it instead of training it again; the training is seeded, so either
    way it is the same model)."""
    model = make_model(len(data.classes), sched, seed)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model
    model = train_classifier(model, data.base, sched, seed)
    write_atomic(path, lambda f: torch.save(model.state_dict(), f))
    return model


def evaluate_row(model: SelfExplaining, data: ShortcutData) -> dict:
    """The validation scores (what a user can see) and every test metric of one model."""
    scores = {**val_scores(model, data.val), **shortcut_scores(model, data.test).to_dict()}
    return {**scores, "classes": list(data.classes)}


_KEY = ("dataset", "seed", "phase", "method", "lam", "mask", "fraction")


def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in _KEY)


def run_benchmark(config: BenchConfig, out: str | Path, *, log=print) -> list[dict]:
    """Run the benchmark; write ``config.json``, ``runs.jsonl`` (one row per run, appended as
    runs finish, so a rerun resumes), ``runs.csv``, ``summary.md`` and ``efficiency.png``.
    Returns the rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config.to_dict())
    with (out / "invocations.jsonl").open("a") as f:  # a resumed run keeps every config
        f.write(json.dumps({"started": time.strftime("%FT%TZ", time.gmtime()), **config.to_dict()}))
        f.write("\n")
    path = out / "runs.jsonl"
    rows = [json.loads(s) for s in path.read_text().splitlines()] if path.exists() else []
    done = {_key(r): r for r in rows}
    torch.set_num_threads(max(1, torch.get_num_threads()))

    def record(row: dict, fn) -> dict:
        k = _key(row)
        if k in done:
            return done[k]
        started = time.perf_counter()
        row.update(fn())
        row["seconds"] = row.get("seconds") or round(time.perf_counter() - started, 1)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[k] = row
        rows.append(row)
        log(
            " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        )
        return row

    for ds in config.datasets:
        chosen: dict[str, float] = {}
        contexts: dict[int, tuple] = {}

        def context(seed: int, ds=ds, contexts=contexts) -> tuple:
            """Data, schedule, baseline model and baseline row of one seed (built once)."""
            if seed not in contexts:
                data, sched = load_data(ds, seed, config, out / "data")
                base = baseline(out / "models" / f"{ds}-seed{seed}.pt", data, sched, seed)
                row = {"dataset": ds, "seed": seed, "mask": "ignore", "fraction": 1.0}
                b = record(
                    {**row, "phase": "main", "method": "baseline", "lam": None},
                    lambda: evaluate_row(base, data),
                )
                contexts[seed] = (data, sched, base, b)
            return contexts[seed]

        def tuned(seed, method, lam, mask="ignore", fraction=1.0, phase="main", ds=ds):
            row = {"dataset": ds, "seed": seed, "phase": phase, "method": method, "lam": lam}
            row = {**row, "mask": mask, "fraction": fraction}
            wanted = [row]
            if config.refit_bias and method not in CLARC:
                wanted += [{**row, "method": method + suffix} for suffix in REFIT.values()]
            if all(_key(r) in done for r in wanted):  # resuming: no baseline to train
                return done[_key(row)]
            data, sched, base, _ = context(seed)
            started = time.perf_counter()
            choice = (
                EpochChoice(data.val, config.acc_tolerance, config.guard_measure)
                if config.select_epoch
                else None
            )
            model, scale = fine_tune(
                base,
                data,
                sched,
                method,
                lam,
                seed,
                mask_kind=mask,
                fraction=fraction,
                calibration_batches=config.calibration_batches,
                class_weighted=config.class_weighted,
                choice=choice,
                **config.objective(),
            )
            seconds = round(time.perf_counter() - started, 1)
            result = {"loss_scale": scale, **evaluate_row(model, data), "seconds": seconds}
            if choice is not None:
                result |= {"epoch": choice.epoch, "epochs": choice.history}
            first = record(row, lambda: result)
            missing = [
                (on, r) for on, r in zip(REFIT, wanted[1:], strict=False) if _key(r) not in done
            ]
            if missing:  # the pool the fine-tune learnt from, built again once
                g = torch.Generator().manual_seed(seed)
                pool, _ = feedback_pool(data, mask, fraction, g, seed)
                weighted = config.class_weighted or sched.weighted
            for on, refit in missing:
                again = refit_row(model, data, pool, weighted, result, on)
                record(refit, lambda again=again: again)
            return first

        def ceiling(seed):
            data, sched, _, _ = context(seed)
            model = make_model(len(data.classes), sched, seed)
            model = train_classifier(model, data.clean_base, sched, seed)
            model, _ = fine_tune(
                model,
                data.clean_pool,
                sched,
                CLASS_ONLY,
                0.0,
                seed,
                class_weighted=config.class_weighted,
                **config.objective(),
            )
            return evaluate_row(model, data)

        # The main table first for every seed, then controls, then efficiency: if the run is
        # cut short, what is missing is the least important.
        seeds = (config.tune_seed, *[s for s in config.seeds if s != config.tune_seed])
        for seed in seeds:
            row = {"dataset": ds, "seed": seed, "mask": "ignore", "fraction": 1.0}
            b = done.get(_key({**row, "phase": "main", "method": "baseline", "lam": None}))
            b = b or context(seed)[3]
            record(
                {**row, "phase": "main", "method": "no-confounder", "lam": None},
                lambda seed=seed: ceiling(seed),
            )
            for method in config.methods:
                if method == CLASS_ONLY or method in CLARC:  # no lambda to tune
                    chosen[method] = tuned(seed, method, 0.0)["lam"]
                    continue
                if method not in chosen:
                    trials = [tuned(seed, method, lam, phase="tune") for lam in config.lams]
                    chosen[method] = choose_lambda(trials, b, config.acc_tolerance)
                    for t in trials:  # the tuning seed's main run is its chosen trial
                        if t["lam"] == chosen[method]:
                            record({**t, "phase": "main"}, lambda: {})
                            for suffix in REFIT.values():
                                refit = done.get(_key({**t, "method": method + suffix}))
                                if refit is not None:
                                    record({**refit, "phase": "main"}, lambda: {})
                tuned(seed, method, chosen[method])
        for seed in [s for s in seeds if s in config.control_seeds]:
            for method in config.control_methods:
                for mask in config.controls:
                    # the stroke-only controls do not touch a keep-mask method's masks
                    masks_matter = method not in CLARC and (
                        mask in WHOLE_CONTROLS or not needs_keep_masks(method)
                    )
                    if method in chosen and masks_matter and method != CLASS_ONLY:
                        tuned(seed, method, chosen[method], mask=mask, phase="control")
        for seed in [s for s in seeds if s in config.efficiency_seeds]:
            for method in config.efficiency_methods:
                for fraction in config.fractions:
                    if method in chosen and fraction < 1.0:
                        tuned(seed, method, chosen[method], fraction=fraction, phase="efficiency")
    write_outputs(rows, out)
    return rows
