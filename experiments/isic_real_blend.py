"""Weight interpolation between the incoming model and its fine-tune (WiSE-FT, Wortsman et al.
2022) on isic-real (docs/real-artifacts.md, "Blending the fine-tune with the incoming model":
exploratory, not adopted).

For each seed: the default objective's fine-tune with the epoch the per-class guard chooses (as
``--select-epoch``), then every blend (1 - alpha) * incoming + alpha * fine-tuned of all
floating-point state (weights and BatchNorm statistics) scored like a benchmark row: validation
flip and filled-validation sensitivities, test flip to NV (real patch and region filled), MEL
AUC and sensitivities on the clean test images.

    python experiments/isic_real_blend.py --bench BENCH --isic-root ISIC2017_FOLDER \\
        --json docs/shortcuts/isic-real-blend.json
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from real_patch_floor import arguments, guarded_fine_tunes, save  # noqa: E402

from feedbackcam.shortcuts.bench import evaluate_row

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
KEYS = ("val_flip", "val_sens_filled", "flip_to_target", "flip_to_target_filled", "auc_clean",
        "sens_clean")  # fmt: skip


def blend(base, tuned, alpha: float):
    """(1 - alpha) * base + alpha * tuned, floating-point state only (counters from tuned)."""
    a, b = base.state_dict(), tuned.state_dict()
    model = copy.deepcopy(base)
    model.load_state_dict(
        {k: a[k] * (1 - alpha) + b[k] * alpha if a[k].is_floating_point() else b[k] for k in a}
    )
    return model


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    rows = []
    for seed, data, base, tuned, epoch in guarded_fine_tunes(args):
        for alpha in ALPHAS:
            r = evaluate_row(blend(base, tuned, alpha), data)
            row = {"seed": seed, "epoch": epoch, "alpha": alpha, **{k: r[k] for k in KEYS}}
            print(row, flush=True)
            rows.append(row)
    save(args, rows)


if __name__ == "__main__":
    main()
