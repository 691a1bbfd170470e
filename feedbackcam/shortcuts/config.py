"""What the shortcut benchmark runs: data sets, methods, controls, schedules.

A *method* is ``"class"`` (class feedback only, lambda 0) or the name of a registered explanation
loss (:data:`feedbackcam.losses.EXPLANATION_LOSSES`): registering a loss makes it a method here.
The documented run compares class feedback, every loss that learns from ignore masks, and HINT
(the typology's keep-mask method), each given the user's masks of the kind it needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .. import losses
from ..objective import check_counterfactual_share
from ..selection import CLASS_MEASURES

TRAPS = ("isic-trap-ruler", "isic-trap-ink", "isic-trap-dark_corner", "isic-trap-all")
DATASETS = ("decoy", "synth-patch", "synth-ruler", "isic-bandaid", "isic-real", *TRAPS)
MASK_CONTROLS = ("random", "wrong", "half")
# Controls of the whole feedback: every mask the user gave, the ignore strokes *and* the keep
# masks, replaced by a random or a wrong one (a method that learns from keep masks, "decide from
# the lesion", is tested by these: the stroke-only controls leave its keep masks true).
WHOLE_CONTROLS = ("random_all", "wrong_all")
CONTROLS = (*MASK_CONTROLS, *WHOLE_CONTROLS)
CLASS_ONLY = "class"
# Reveal2Revise's activation-space corrections (feedbackcam.clarc): the marked images give the
# artifact's direction; P-ClArC projects it out (no training), A-ClArC fine-tunes with it added.
CLARC = ("p_clarc", "a_clarc")
# Keep-mask losses in the documented run (the typology's HINT); every ignore-mask loss is in it.
KEEP_METHODS = ("hint",)


def methods() -> tuple[str, ...]:
    """Every single-loss method the benchmark can run: class feedback and every registered
    loss (a method may also combine losses, ``"A+B"``: see :func:`check_method`)."""
    return (CLASS_ONLY, *CLARC, *losses.EXPLANATION_LOSSES)


def check_method(method: str) -> str:
    """``method`` if it is ``"class"``, a registered loss, or ``"A+B[+C]"``: a registered loss
    and added terms for other kinds of mask (``ValueError`` naming what is wrong)."""
    if method == CLASS_ONLY or method in CLARC:
        return method
    parts = method.split("+")
    for name in parts:
        losses.get_loss(name)
    kinds = [losses.get_loss(name).needs for name in parts[1:]]
    if len(set(kinds)) < len(kinds):
        raise ValueError(f"method {method!r}: at most one added loss per kind of mask")
    return method


def default_methods() -> tuple[str, ...]:
    """The documented run's methods: class feedback, HINT, and every ignore-mask loss."""
    ignore = [k for k, v in losses.EXPLANATION_LOSSES.items() if v.needs == "ignore"]
    keep = [k for k in KEEP_METHODS if k in losses.EXPLANATION_LOSSES]
    return (CLASS_ONLY, *keep, *ignore)


def needs_keep_masks(method: str) -> bool:
    """The method learns from keep masks alone (so the ignore-mask controls do not apply)."""
    if method == CLASS_ONLY or method in CLARC:
        return False
    return all(losses.get_loss(name).needs == "keep" for name in method.split("+"))


@dataclass(frozen=True)
class Schedule:
    """Model and training schedule of one data set: ``arch`` (a ``build_model`` name), its
    width and explanation layer (empty: the architecture's own), the baseline's and the
    fine-tuning's epochs, learning rate (Adam) and batch size."""

    arch: str = "decoy_cnn"
    width: int = 16
    layer: str = "features.relu2"
    base_epochs: int = 6
    base_lr: float = 1e-3
    base_batch: int = 64
    epochs: int = 3
    lr: float = 1e-3
    batch: int = 64
    weighted: bool = False  # inverse-frequency class weights in every cross-entropy


# The ISIC schedules: EfficientNet-Lite0 (ImageNet weights, offline) at the explanation layer bn2.
ISIC = dict(arch="efficientnet_lite0", layer="", base_epochs=6, base_lr=3e-4, base_batch=32)
ISIC_FINE = dict(epochs=3, lr=3e-4, batch=32)


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark runs. Defaults are the documented run (docs/shortcuts.md).

    Attributes:
        datasets, seeds, methods, lams: the main table; ``lams`` is each method's tuning grid,
            chosen on ``tune_seed``'s validation split (:func:`~.rules.choose_lambda`).
        controls, control_seeds, control_methods: the mask controls (random, wrong, half: the
            ignore strokes replaced; random_all, wrong_all: the keep masks too).
        fractions, efficiency_methods, efficiency_seeds: feedback on a share of the images.
        isic_root: an ISIC 2017 folder (official layout, lesion masks) or a folder prepared from one
            (``feedbackcam data prepare``) for ``isic-bandaid``; no default (``--isic-root``).
        isic_size, isic_split: the ISIC images' side and the base / pool / validation / test
            shares of a seed's stratified split (``isic-bandaid``).
        artifacts_root: the ISIC artifact annotations (artifact_lists.json, patch_masks/,
            artifact_flags.csv) for ``isic-real`` and the trap splits; default: ``artifacts/``
            in ``isic_root``.
        isic_real_split, isic_real_pool, isic_real: ``isic-real``'s train / validation / test
            shares of the unpatched images, its feedback pool size (a share of the model's own
            training images), and its schedule (class weighted, as ``train-base`` trains).
        trap_pool, trap: the trap splits' feedback pool (None: the whole training split, the
            model's own images) and schedule: class weighted, and eight fine-tuning epochs,
            because a model that learned the artifact instead of the lesion has to learn the
            lesion, not only unlearn the artifact (docs/real-artifacts.md).
        calibration_batches: batches the loss scale is calibrated on.
        class_weighted: fine-tunes (and the reference's) weight every cross-entropy by the
            pool's inverse class frequencies.
        refit_bias: every fine-tune is also scored after its last layer's bias is re-fit on its
            pool with the marked regions filled (:func:`feedbackcam.decision.refit_bias`): a
            second row, the method's name with " +refit".
        select_epoch: fine-tunes keep their best eligible epoch, as ``simulate`` does, instead
            of the last (:class:`~.bench.EpochChoice`: no class's filled-validation score
            below the incoming model's less ``acc_tolerance`` and chance, then the lowest
            validation flip rate; epoch 0, the incoming model, is a candidate). Rows get
            ``epoch``.
        guard_measure: that score: "youden" (Youden's J against the rest, the default
            since 2026-12-06) or "sensitivity" (the runs before).
        recalibrate_batchnorm: fine-tunes re-estimate BatchNorm's running statistics on their
            pool after each epoch, as the library does by default since 2026-12-05 (False: the
            earlier runs, whose statistics stayed the incoming model's).
        counterfactual_symmetries: the fine-tunes' counterfactual terms turn or mirror what
            they move (``FeedbackConfig.counterfactual_symmetries``; off, as in the library;
            docs/real-artifacts.md, "Where the patch lies").
        counterfactual_share: the fine-tunes' ``FeedbackConfig.counterfactual_share`` (None,
            every marked row forwarded each step: how every benchmark row was measured; the
            library samples a share, docs/benchmarks.md).
    """

    datasets: tuple[str, ...] = ("decoy",)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    methods: tuple[str, ...] = field(default_factory=default_methods)
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
    isic_root: str | None = None
    isic_size: int = 128
    isic_split: tuple[float, ...] = (0.4, 0.3, 0.1, 0.2)  # base, pool, val, test
    isic: Schedule = field(default_factory=lambda: Schedule(**ISIC, **ISIC_FINE))
    artifacts_root: str | None = None
    isic_real_split: tuple[float, ...] = (0.55, 0.15, 0.30)  # train, val, test (unpatched)
    isic_real_pool: int = 400
    isic_real: Schedule = field(
        default_factory=lambda: Schedule(**ISIC, **ISIC_FINE, weighted=True)
    )
    trap_pool: int | None = None
    trap: Schedule = field(
        default_factory=lambda: Schedule(**ISIC, epochs=8, lr=3e-4, batch=32, weighted=True)
    )
    calibration_batches: int = 4
    class_weighted: bool = False
    refit_bias: bool = False
    select_epoch: bool = False
    guard_measure: str = "youden"
    recalibrate_batchnorm: bool = True
    counterfactual_symmetries: bool = False
    counterfactual_share: float | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("datasets", DATASETS), ("controls", CONTROLS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad:
                raise ValueError(f"{name}: {bad} not in {allowed}")
        for name in ("methods", "control_methods", "efficiency_methods"):
            for method in getattr(self, name):
                check_method(method)
        if self.guard_measure not in CLASS_MEASURES:
            raise ValueError(
                f"guard_measure: expected one of {CLASS_MEASURES}, got {self.guard_measure!r}"
            )
        check_counterfactual_share(self.counterfactual_share)
        isic = [d for d in self.datasets if d.startswith("isic")]
        if isic and not self.isic_root:
            raise ValueError(
                f"{', '.join(isic)} need an ISIC 2017 folder (official layout, with the lesion "
                "masks) or one prepared from it: give --isic-root PATH"
            )

    def objective(self) -> dict:
        """The FeedbackConfig fields every fine-tune takes from this config
        (:func:`~.bench.method_config`); ``refit_bias`` is not one: the benchmark scores a
        re-fit in rows of its own, the fine-tune never re-fits."""
        return {
            "recalibrate_batchnorm": self.recalibrate_batchnorm,
            "counterfactual_symmetries": self.counterfactual_symmetries,
            "counterfactual_share": self.counterfactual_share,
        }

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
