"""Issue 21's step goal, measured interleaved: the default objective's step with ignore (or keep)
marks on part of the batch, over a classification-only step on the same batch size.

``feedback_step.py`` times each marked row just before and after its own classification-only
reference; on a machine whose speed drifts by ±15 % within the hour that gives one noisy ratio
per configuration. Here every configuration is timed once per round, the rounds repeat, and the
ratio of each round (its step over the same round's classification-only step) is summarised by
its median and range. Also timed: a classification-only step on as many rows as the objective
forwards (the batch plus its counterfactual rows), which says how much of the cost is the rows.

    python bench/step_ratio.py --shares 0.5 0.3 --json docs/benchmarks/step_ratio_cpu.json
    python bench/step_ratio.py --device cuda --model skincare_vgg16 --size 227 --batch 128 \
        --precision bf16 --fractions 0.3 --shares 0.5 0.3   # the GPU goal (bench/gpu_session.sh)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import torch
from feedback_step import make_batch, marked_batch, timed

from feedbackcam.models import build_model
from feedbackcam.objective import FeedbackConfig
from feedbackcam.train import feedback_step, place_model


def rows_forwarded(model, batch, optimizer, cfg) -> int:
    """The images one step of ``cfg`` on ``batch`` forwards through ``model``: the batch and
    every counterfactual row, counted in the model's forward passes (whatever the loss)."""
    rows = []
    hook = model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        feedback_step(model, batch, optimizer, cfg, sync=False)
    finally:
        hook.remove()
    return sum(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    p.add_argument("--shares", type=float, nargs="+", default=None)
    p.add_argument("--marks", choices=("ignore", "keep"), default="ignore")
    p.add_argument(
        "--ignore-losses", nargs="+", default=None, help="default: the library's ignore loss"
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    classes = 3
    model = place_model(build_model(args.model, classes), args.device)
    optimizer = torch.optim.SGD(list(model.parameters()), lr=1e-5)
    default = FeedbackConfig(precision=args.precision)
    shares = args.shares or [default.counterfactual_share]
    plain = FeedbackConfig(lam=0.0, precision=args.precision)
    base = make_batch(args.batch, args.size, classes, args.device)
    ignore_losses = args.ignore_losses or [default.ignore_loss]
    arms = {}  # (ignore loss, fraction, share) -> (batch, config)
    for loss in ignore_losses:
        for fraction in args.fractions:
            for share in shares:
                batch = marked_batch(
                    args.batch, args.size, classes, args.device, fraction, args.marks
                )
                cfg = dataclasses.replace(default, counterfactual_share=share, ignore_loss=loss)
                arms[(loss, fraction, share)] = (batch, cfg)
    rows = {key: rows_forwarded(model, batch, optimizer, cfg) for key, (batch, cfg) in arms.items()}
    plain_rows = sorted(set(rows.values()))
    as_many = {n: make_batch(n, args.size, classes, args.device) for n in plain_rows}

    def step(batch, cfg):
        return timed(
            lambda: feedback_step(model, batch, optimizer, cfg, sync=False),
            args.steps,
            2,
            args.device,
        )

    ratios: dict = {key: [] for key in arms}
    rows_ratios: dict = {n: [] for n in plain_rows}
    for r in range(args.rounds):
        reference = step(base, plain)
        line = [f"round {r}: classification-only {1e3 * reference:.1f} ms"]
        for key, (batch, cfg) in arms.items():
            ratios[key].append(step(batch, cfg) / reference)
            line.append(f"{key}: {ratios[key][-1]:.2f}x")
        for n, batch in as_many.items():
            rows_ratios[n].append(step(batch, plain) / reference)
        print("  ".join(line), flush=True)
    results = []
    device = (
        f"CPU ({torch.get_num_threads()} threads)"
        if args.device == "cpu"
        else torch.cuda.get_device_name()
    )
    print(f"\n{args.model} at {args.size} px, batch {args.batch}, {args.precision}, {device}, "
          f"{args.rounds} rounds of {args.steps} steps (median, range):")  # fmt: skip
    for (loss, fraction, share), values in ratios.items():
        n = rows[(loss, fraction, share)]
        results.append(
            {
                "marks": args.marks,
                "ignore_loss": loss,
                "fraction_marked": fraction,
                "counterfactual_share": share,
                "rows_forwarded": n,
                "step_vs_classification": statistics.median(values),
                "range": [min(values), max(values)],
                "plain_step_on_as_many_rows": statistics.median(rows_ratios[n]),
            }
        )
        print(
            f"{args.marks} marks{f' ({loss})' if args.marks == 'ignore' else ''} on "
            f"{100 * fraction:3.0f} %, share {share}: "
            f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f}); "
            f"a plain step on its {n} rows {statistics.median(rows_ratios[n]):.2f}x",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "device": device, "rows": results}, f, indent=2)


if __name__ == "__main__":
    main()
