"""What a running feedback app needs to know: where things live, how it learns, what it accepts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..objective import FeedbackConfig

PROPOSE_WITH = ("served", "offline")


@dataclass(frozen=True)
class Settings:
    """Settings of one app instance; ``feedbackcam serve`` flags map onto these fields.

    Attributes:
        data_dir: images, masks, checkpoints, the SQLite file, and what the app is given: the
            gallery, the validation set and an optional replay set (see ``datasets.py``).
        model: the checkpoint to serve; None serves the demo's model (trained on first use).
        db_url: an SQLAlchemy URL; None is an SQLite file in ``data_dir``.
        update_every: fine-tune after this many new feedback items (1: online, as the thesis).
        grace_seconds: an automatic update takes an item only this long after it was given,
            so its author can still withdraw it (the page offers Withdraw until then); an
            admin's "update now" does not wait.
        steps: optimizer steps per update.
        batch_size: new items per step (all of them when fewer).
        replay_per_class: earlier feedback items drawn per class into every step.
        lr: Adam learning rate of an update.
        feedback: how an update turns feedback into a loss: lambda of eq. 4.1, the explanation
            loss (keep masks), the ignore loss (ignore masks) and the CAM. Its defaults are the
            library's (``FeedbackConfig``); ``serve --lambda --explanation-loss --ignore-loss
            --cam ...`` set them, and the versions page shows them.
        tolerance: the gate promotes a candidate unless its validation accuracy or average
            sensitivity falls more than this below the current model's (negative: must improve).
        gate_per_class: the gate also refuses a candidate that loses one class (its
            validation Youden's J against the rest, sensitivity + specificity - 1, more
            than ``tolerance`` plus chance below the current or the original model's) while
            accuracy and average sensitivity hold. On by default since 2026-12-06: a model
            with a shortcut has a class profile the shortcut made (without the artifact, the
            confounded class's images go to another class, whose sensitivity looks perfect),
            and the update that repairs it lowers that class's sensitivity while raising its
            specificity, which Youden's J lets through and sensitivity alone did not
            (docs/real-artifacts.md, "A guard that tells repair from collapse"). With two
            classes either class's J is twice the average sensitivity less one: the rule
            holds the average to half the tolerance, plus its chance margin.
        propose_with: what "N more images look like this" scores with: "offline" (the
            default: the offline ImageNet EfficientNet-Lite0's blocks.5 at 256 px, with query
            expansion and its threshold: the setting measured on ISIC 2017's real patches and,
            end to end, the better proposer on SynthDerm, docs/propagation.md; its weights load
            on first use, and the stored images' activations are computed in the background at
            start) or "served" (the served model's explanation layer).
        gate_images: the gate scores every version on a class-stratified random this many
            validation images (the same ones each time; the verdict says how many); None:
            all of them.
        max_upload_bytes: largest accepted image or mask file.
        max_pixels: largest accepted image (width x height), checked before decoding.
        max_concurrent_decodes: images decoded at once (each may take up to
            ``max_pixels`` x 4 bytes of memory); more wait their turn.
        max_concurrent: API requests in progress at once; one more waits up to 3 s for a
            slot, then gets 503 with Retry-After. The database pool holds this many
            connections plus four (the worker, the front door).
        rate_limit_per_minute: API requests per signed-in token (or per client address for
            requests without a known token) in any minute; 0 means no limit.
        worker: run the background updater (tests turn it off to hold items pending).
        poll_seconds: how often the worker looks for pending items without being woken.
        bootstrap_admin: on first start with no users, create ``admin`` and print its token once.
        seed: seeds the replay draws.
        device: where the model predicts and learns ("cpu", "cuda", "cuda:1").
        low_confidence: warn when the top class probability is below this.
        unfamiliar_quantile: warn when an image's energy score is above this quantile of the
            validation set's (see ``ood.py``).
    """

    data_dir: Path = Path("feedbackcam-data")
    model: Path | None = None
    db_url: str | None = None
    update_every: int = 1
    grace_seconds: float = 30.0
    steps: int = 8
    batch_size: int = 8
    replay_per_class: int = 4
    lr: float = 3e-4
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    tolerance: float = 0.02
    gate_per_class: bool = True
    propose_with: str = "offline"
    gate_images: int | None = None
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    max_concurrent_decodes: int = 2
    max_concurrent: int = 16
    rate_limit_per_minute: int = 600
    worker: bool = True
    poll_seconds: float = 5.0
    bootstrap_admin: bool = True
    seed: int = 0
    device: str = "cpu"
    low_confidence: float = 0.6
    unfamiliar_quantile: float = 0.99

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.model is not None:
            object.__setattr__(self, "model", Path(self.model))
        for name in (
            "update_every",
            "steps",
            "batch_size",
            "max_upload_bytes",
            "max_pixels",
            "max_concurrent_decodes",
            "max_concurrent",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if self.gate_images is not None and (
            not isinstance(self.gate_images, int) or self.gate_images < 1
        ):
            raise ValueError(f"gate_images: expected an int >= 1 or None, got {self.gate_images!r}")
        if not isinstance(self.replay_per_class, int) or self.replay_per_class < 0:
            raise ValueError(
                f"replay_per_class: expected an int >= 0, got {self.replay_per_class!r}"
            )
        if not isinstance(self.rate_limit_per_minute, int) or self.rate_limit_per_minute < 0:
            raise ValueError(
                f"rate_limit_per_minute: expected an int >= 0, got {self.rate_limit_per_minute!r}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr: expected a finite number > 0, got {self.lr!r}")
        # a NaN tolerance compares False with everything: the gate would reject every update
        if not math.isfinite(self.tolerance):
            raise ValueError(f"tolerance: expected a finite number, got {self.tolerance!r}")
        if self.propose_with not in PROPOSE_WITH:
            raise ValueError(
                f"propose_with: expected one of {PROPOSE_WITH}, got {self.propose_with!r}"
            )
        if not isinstance(self.feedback, FeedbackConfig):
            raise TypeError(f"feedback: expected a FeedbackConfig, got {self.feedback!r}")
        for name in ("low_confidence", "unfamiliar_quantile"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a value in [0, 1], got {getattr(self, name)!r}")
        if not (0 <= self.grace_seconds < float("inf")):
            raise ValueError(
                f"grace_seconds: expected a finite number >= 0, got {self.grace_seconds!r}"
            )
        if not self.poll_seconds > 0:
            raise ValueError(f"poll_seconds: expected > 0, got {self.poll_seconds!r}")

    @property
    def database_url(self) -> str:
        if self.db_url:
            return self.db_url
        return f"sqlite:///{(self.data_dir / 'feedbackcam.db').resolve()}"
