"""The shortcut benchmark: does explanation feedback make a model stop using a confounder?

Data sets with a confounder that goes with one class in training and is class-independent at test
(Decoy-MNIST, SynthDerm with a patch or a ruler, ISIC 2017 with pasted band-aids); a baseline
trained on them; every method (class feedback, or a registered explanation loss given the
user's masks) fine-tuning a copy; the same network trained without the confounder (the ceiling);
and the metrics that say whether the confounder still decides (accuracy where it misleads, the
counterfactual flip rate, WR, per-class sensitivity). Results: docs/shortcuts.md.

- :mod:`.config`: what runs (:class:`BenchConfig`, :data:`QUICK`; methods from the registry);
- :mod:`.data`: the data sets, as :class:`~feedbackcam.data.dataset.ArrayDataset` s;
- :mod:`.bench`: :func:`run_benchmark`, training through the project's one loop;
- :mod:`.metrics`: the shortcut metrics; :mod:`.rules`: lambda and the default loss, chosen on
  validation numbers only; :mod:`.report`: tables and plots.

Command line: ``feedbackcam shortcuts OUT [--quick] [--datasets ...] [--isic-root PATH]``.
"""

from .bench import fine_tune, run_benchmark
from .config import QUICK, BenchConfig, Schedule
from .rules import choose_default, choose_lambda

__all__ = [
    "QUICK",
    "BenchConfig",
    "Schedule",
    "choose_default",
    "choose_lambda",
    "fine_tune",
    "run_benchmark",
]
