"""Why does an ignore loss forget the class a shortcut stood for? Which term of the objective
pushes the decision away from it, measured where fine-tuning starts.

For the benchmark's baseline of one data set and seed (cached in ``BENCH/models``), on the
feedback pool's batches as fine-tuning draws them, the gradient of each term of the objective
on the classifier's bias (one number per class: a term with a positive gradient for class c
lowers c's logit for every image, a pure shift of the decision) and the mean predicted
probability of each class. Terms: the class loss on the images as they are, and the parts of
``invariance_balanced`` (the donor's KL to its filled self, CE on the recipients with the moved
artifact and with the blank, the KL between those), and the ``surroundings`` loss.

    python experiments/bias_terms.py --bench /tmp/bench/bandaid --dataset isic-bandaid \\
        --isic-root ../shared/data/isic2017-256 [--seed 0 --batches 8]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from feedbackcam import losses
from feedbackcam.fileio import write_json
from feedbackcam.losses import invariance
from feedbackcam.objective import FeedbackConfig, LossInputs
from feedbackcam.shortcuts.bench import baseline
from feedbackcam.shortcuts.config import BenchConfig
from feedbackcam.shortcuts.datasets import load_data
from feedbackcam.train import epoch_batches


def bias_parameter(model) -> torch.nn.Parameter:
    """The last linear layer's bias (the decision's per-class offset)."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return last.bias


def terms(inputs, cfg) -> dict[str, torch.Tensor]:
    """Each part of the objective, a mean over the batch's rows that carry it."""
    out = {"class loss (CE on x)": losses.classification_loss(inputs.logits, inputs.labels)}
    marked = losses.feedback_present(inputs.ignore)
    if marked.any():
        moved = losses.drive(invariance._moved_logits(inputs, blank=True), inputs)
        recipients, lf, (lp, lb), w = moved
        y = inputs.labels[recipients]  # w: the rows that got counterfactuals, unbiased weights

        def mean(v):
            return (v * w).sum() / w.sum()

        out["KL(p(x) || p(x filled)) on donors"] = mean(invariance._kl(inputs.logits, lf))
        out["KL, teacher p(x) detached"] = mean(invariance._kl(inputs.logits.detach(), lf))
        out["KL, student p(x): filled detached"] = mean(invariance._kl(inputs.logits, lf.detach()))
        out["CE(recipient + moved artifact)"] = mean(invariance._ce(lp, y, cfg))
        out["CE(recipient + blank)"] = mean(invariance._ce(lb, y, cfg))
        out["KL(blank || moved)"] = mean(invariance._kl(lb, lp))
    present = losses.feedback_present(inputs.keep)
    if present.sum() > 1:
        s = losses.run_loss(losses.EXPLANATION_LOSSES["surroundings"], inputs, cfg)
        out["surroundings"] = (s * present.float()).sum() / present.sum()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", type=Path, required=True)
    p.add_argument("--dataset", default="isic-bandaid")
    p.add_argument("--isic-root", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    cfg_bench = BenchConfig(datasets=(args.dataset,), isic_root=args.isic_root)
    data, sched = load_data(args.dataset, args.seed, cfg_bench, args.bench / "data")
    model = baseline(
        args.bench / "models" / f"{args.dataset}-seed{args.seed}.pt", data, sched, args.seed
    )
    model.train()
    from feedbackcam.self_explaining import set_batchnorm_eval

    set_batchnorm_eval(model)
    pool = data.pool_with("ignore")
    cfg = FeedbackConfig.thesis()
    bias = bias_parameter(model)
    g = torch.Generator().manual_seed(args.seed)
    batches = epoch_batches(pool.tensors(), np.arange(len(pool)), sched.batch, generator=g)
    sums: dict[str, np.ndarray] = {}
    probs = []
    torch.manual_seed(0)
    for batch in itertools.islice(batches, args.batches):
        out = model(batch.images)
        probs.append(torch.softmax(out.logits.detach(), 1).mean(0).numpy())
        inputs = LossInputs(model, out, batch.images, batch, cfg)
        for name, value in terms(inputs, cfg).items():
            (grad,) = torch.autograd.grad(value, bias, retain_graph=True)
            sums.setdefault(name, []).append(grad.numpy())
    result = {
        "classes": list(data.classes),
        "mean_probability": np.mean(probs, 0).round(4).tolist(),
        "label_share": np.bincount(pool.labels, minlength=len(data.classes)).tolist(),
        "bias_gradient": {k: np.mean(v, 0).round(5).tolist() for k, v in sums.items()},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
