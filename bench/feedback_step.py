"""Images/s of one explanation-feedback training step against the thesis' method.

Prints, in one run: the reference mode (Algorithm 2: batch 1, a deep copy per sample), our step
at batch 1, our step at larger batches in fp32 and bf16, classification-only training at the same
batches, the ratios, and peak memory per image; then the library's default objective
(``FeedbackConfig()``) with 10 %, 30 % and 100 % of each batch marked, once with ignore masks
(its ignore loss) and once with keep masks (its keep losses), against classification-only.
Usage:

    python bench/feedback_step.py --device cuda            # SkinCare VGG16 at 227 (the thesis)
    python bench/feedback_step.py --device cpu             # small CNN at the demo's 64 px
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from feedbackcam import objective
from feedbackcam.data.dataset import FeedbackBatch
from feedbackcam.models import build_model
from feedbackcam.objective import FeedbackConfig
from feedbackcam.train import feedback_step, place_model, reference_step


def marked_batch(n: int, size: int, classes: int, device: str, fraction: float, kind: str):
    """A batch with ``fraction`` of its images marked: an ignore square in a corner (``kind``
    "ignore") or a keep square on the centre ("keep")."""
    g = torch.Generator().manual_seed(n)
    images = torch.rand(n, 3, size, size, generator=g)
    labels = torch.arange(n) % classes
    marked = torch.arange(n) < max(1, round(fraction * n))
    region = torch.zeros(n, size, size)
    if kind == "ignore":
        region[:, : size // 4, : size // 4] = 1
        unmarked = torch.zeros(n, dtype=torch.bool)
        batch = FeedbackBatch(images, labels, torch.zeros_like(region), unmarked, region, marked)
    else:
        region[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
        batch = FeedbackBatch(images, labels, region, marked)
    return batch.to(device)


def make_batch(n: int, size: int, classes: int, device: str) -> FeedbackBatch:
    g = torch.Generator().manual_seed(n)
    masks = torch.zeros(n, size, size)
    masks[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    return FeedbackBatch(
        torch.rand(n, 3, size, size, generator=g),
        torch.randint(0, classes, (n,), generator=g),
        masks,
        torch.ones(n, dtype=torch.bool),
    ).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


ride_along = objective.rows_ride_along


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--model", default=None, help="default: skincare_vgg16 on cuda, small_cnn on cpu"
    )
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--batches", default=None, help="comma-separated, default 32,128 (cuda)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--reference-steps", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--shares",
        type=float,
        nargs="+",
        default=None,
        help="the default objective's counterfactual_share values to time with marked batches "
        "(default: the library's)",
    )
    args = p.parse_args()
    cuda = args.device == "cuda"
    arch = args.model or ("skincare_vgg16" if cuda else "small_cnn")
    size = args.size or (227 if arch == "skincare_vgg16" else 64)
    batches = [int(b) for b in (args.batches or ("32,128" if cuda else "32")).split(",")]
    steps = args.steps or (20 if cuda else 10)
    ref_steps = args.reference_steps or (30 if cuda else 20)
    classes = 8 if arch == "skincare_vgg16" else 3
    torch.manual_seed(0)
    if cuda:
        torch.backends.cudnn.benchmark = True
    model = place_model(build_model(arch, classes), args.device)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-5, fused=cuda)
    rows = []
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} thr)"

    def record(name, batch, precision, seconds):
        peak = torch.cuda.max_memory_allocated() / batch / 2**20 if cuda else None
        rows.append(
            {
                "step": name,
                "batch": batch,
                "precision": precision,
                "images_per_s": batch / seconds,
                "peak_mib_per_image": peak,
            }
        )
        mem = f"{peak:8.1f} MiB/img" if peak is not None else ""
        print(
            f"{name:<34} batch {batch:>4} {precision:>5}: {batch / seconds:9.1f} img/s {mem}",
            flush=True,
        )

    # the thesis' objective (Jaccard alone), which the reference step implements
    fb = FeedbackConfig(lam=0.3, second_order="detached", surroundings_loss=None, ignore_loss=None)
    one = make_batch(1, size, classes, args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sec = timed(lambda: reference_step(model, one, optimizer, fb), ref_steps, 3, args.device)
    record("reference (deep copy, Alg. 2)", 1, "fp32", sec)
    for name, cfg in [
        ("feedback step", fb),
        ("feedback step, full 2nd order", dataclasses.replace(fb, second_order="full")),
    ]:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sec = timed(
            lambda cfg=cfg: feedback_step(model, one, optimizer, cfg, sync=False),
            ref_steps,
            3,
            args.device,
        )
        record(name, 1, "fp32", sec)
    for batch_size in batches:
        batch = make_batch(batch_size, size, classes, args.device)
        if cuda:
            batch = batch._replace(
                images=batch.images.contiguous(memory_format=torch.channels_last)
            )
        for precision in ("fp32", "bf16") if cuda else ("fp32",):
            for name, cfg in [
                ("classification only", FeedbackConfig(lam=0.0, precision=precision)),
                # the thesis' objective (Jaccard on keep masks), as measured on 2026-11-26
                ("feedback step (thesis)", dataclasses.replace(fb, precision=precision)),
                # today's default objective (Jaccard and surroundings), keep masks on every row
                ("feedback step (default)", FeedbackConfig(lam=0.3, precision=precision)),
            ]:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                sec = timed(
                    lambda cfg=cfg, b=batch: feedback_step(model, b, optimizer, cfg, sync=False),
                    steps,
                    3,
                    args.device,
                )
                record(name, batch_size, precision, sec)
    # the default objective, with part of the batch marked: ignore feedback and keep feedback
    default = FeedbackConfig()
    marks = []
    for batch_size in batches:
        for precision in ("fp32", "bf16") if cuda else ("fp32",):
            plain = FeedbackConfig(lam=0.0, precision=precision)
            base = make_batch(batch_size, size, classes, args.device)

            def classification(b=base, c=plain):
                return timed(
                    lambda: feedback_step(model, b, optimizer, c, sync=False), steps, 3, args.device
                )

            for kind, fraction, share in [
                (k, f, s)
                for k in ("ignore", "keep")
                for f in (0.1, 0.3, 1.0)
                for s in args.shares or [default.counterfactual_share]
            ]:
                batch = marked_batch(batch_size, size, classes, args.device, fraction, kind)
                cfg = dataclasses.replace(default, precision=precision, counterfactual_share=share)
                # the reference is timed just before and after each row: a machine whose
                # speed drifts (shared, throttled) moves both alike
                before = classification()
                sec = timed(
                    lambda b=batch, c=cfg: feedback_step(model, b, optimizer, c, sync=False),
                    steps,
                    3,
                    args.device,
                )
                cls_s = (before + classification()) / 2
                row = {
                    "batch": batch_size,
                    "precision": precision,
                    "marks": kind,
                    "fraction_marked": fraction,
                    "counterfactual_share": share,
                    "step_vs_classification": sec / cls_s,
                }
                marks.append(row)
                print(
                    f"default objective, {kind:>6} marks on {100 * fraction:3.0f} % of batch "
                    f"{batch_size} {precision}, counterfactual share {share}: "
                    f"{sec / cls_s:.2f}x a classification-only step",
                    flush=True,
                )
    # counterfactual rows in the batch's forward against a forward per term (the choice of
    # objective.rows_ride_along: together on an accelerator, apart on a CPU), interleaved
    riding = []
    for batch_size in batches:
        for kind in ("ignore", "keep"):
            batch = marked_batch(batch_size, size, classes, args.device, 0.3, kind)
            cfg = dataclasses.replace(default, precision="bf16" if cuda else "fp32")
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(3):
                for together in (True, False):
                    objective.rows_ride_along = lambda model, device, t=together: t
                    times[together].append(
                        timed(
                            lambda b=batch, c=cfg: feedback_step(
                                model, b, optimizer, c, sync=False
                            ),
                            max(3, steps // 4),  # short: the GPU session's step has 120 s
                            2,
                            args.device,
                        )
                    )
            objective.rows_ride_along = ride_along
            one, apart = sorted(times[True])[1], sorted(times[False])[1]  # medians
            riding.append({"batch": batch_size, "marks": kind, "together_vs_apart": one / apart})
            print(
                f"counterfactual rows in the batch's forward, {kind:>6} marks on 30 % of batch "
                f"{batch_size}: {one / apart:.2f}x the time of a forward per term",
                flush=True,
            )
    if cuda:
        # the whole step must run without a host synchronisation (errors if one happens)
        batch = make_batch(32, size, classes, args.device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            feedback_step(
                model, batch, optimizer, FeedbackConfig(lam=0.3, precision="bf16"), sync=False
            )
            print("feedback step (sync=False, fused SGD): no host synchronisation")
        except RuntimeError as err:
            print(f"feedback step synchronises with the host: {err}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ref = rows[0]["images_per_s"]
    print(f"\ndevice: {device_name}; model {arch} at {size}x{size}")
    summary = []
    for r in rows:
        if r["step"] in ("feedback step (thesis)", "feedback step (default)"):
            cls = next(
                x
                for x in rows
                if x["step"] == "classification only"
                and x["batch"] == r["batch"]
                and x["precision"] == r["precision"]
            )
            line = {
                "step": r["step"],
                "batch": r["batch"],
                "precision": r["precision"],
                "feedback_vs_classification": r["images_per_s"] / cls["images_per_s"],
                "feedback_vs_reference": r["images_per_s"] / ref,
            }
            summary.append(line)
            print(
                f"{r['step']:<24} batch {r['batch']:>4} {r['precision']}: feedback/classification "
                f"{line['feedback_vs_classification']:.2f}x, feedback/reference "
                f"{line['feedback_vs_reference']:.1f}x"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": device_name,
                    "model": arch,
                    "size": size,
                    "rows": rows,
                    "summary": summary,
                    "marked": marks,
                    "rows_together_vs_apart": riding,
                    "torch": torch.__version__,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
