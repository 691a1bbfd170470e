"""Command-line flags that several commands share, and what they build: the model flags
(``--model``, ``--layer``, ``--weights``, ``--width``) and the :class:`FeedbackConfig` flags
(``--lambda``, ``--explanation-loss``, ``--ignore-loss``, ``--cam``, ...), whose choices come from
the registries (``losses.EXPLANATION_LOSSES``, ``cam.CAM_METHODS``) and whose defaults from the
dataclass, so a new loss or CAM appears in ``simulate``, ``serve`` and the benchmark at once.
"""

from __future__ import annotations

import argparse
import inspect


def names(text: str) -> tuple[str, ...]:
    """A comma-separated list flag ("NV, MEL,BKL") as a tuple of its non-empty items."""
    return tuple(m.strip() for m in text.split(",") if m.strip())


def add_model_args(p, default_arch: str) -> None:
    p.add_argument(
        "--model",
        default=default_arch,
        help="small_cnn | skincare_vgg16 | efficientnet_lite0 | torchvision:NAME | timm:NAME",
    )
    p.add_argument("--layer", default=None, help="explanation layer (torchvision/timm models)")
    p.add_argument(
        "--weights",
        default="none",
        help="'imagenet' (skincare_vgg16: a download; efficientnet_lite0: shipped offline), "
        "'none', or a local weights file",
    )
    p.add_argument("--width", type=int, default=32, help="small_cnn / decoy_cnn width")


def build_model_from(args, num_classes: int):
    """The model the model flags ask for, and the ``arch_kwargs`` its checkpoint records."""
    from .models import build_model

    weights = None if args.weights in (None, "none") else args.weights
    kwargs = {"width": args.width} if args.model in ("small_cnn", "decoy_cnn") else {}
    model = build_model(args.model, num_classes, layers=args.layer, weights=weights, **kwargs)
    return model, kwargs


def add_feedback_args(p) -> None:
    """The FeedbackConfig flags; defaults and choices come from the dataclass and registries."""
    from .cam import CAM_METHODS
    from .losses import EXPLANATION_LOSSES
    from .objective import EXPLAIN_CLASSES, FeedbackConfig

    fb = FeedbackConfig()
    p.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=fb.lam,
        help="lambda of L = (1 - lambda) L_cls + lambda L_exp (eq. 4.1)",
    )
    p.add_argument(
        "--explanation-loss",
        choices=tuple(EXPLANATION_LOSSES),
        default=fb.explanation_loss,
        help="; ".join(
            f"{k}: {v.summary} ({v.needs} masks)" for k, v in EXPLANATION_LOSSES.items()
        ),
    )
    p.add_argument(
        "--surroundings-loss",
        choices=(*(k for k, v in EXPLANATION_LOSSES.items() if v.needs == "keep"), "none"),
        default=fb.surroundings_loss,
        help="decide from the lesion: a loss that learns from keep masks that what lies outside "
        "them must not decide (its scale calibrated like the ignore loss's); 'none' gives keep "
        "masks to the explanation loss alone (the thesis)",
    )
    p.add_argument(
        "--ignore-loss",
        choices=(*(k for k, v in EXPLANATION_LOSSES.items() if v.needs == "ignore"), "none"),
        default=fb.ignore_loss,
        help="a loss that learns from ignore masks, added to the explanation loss where an "
        "image has one (its scale calibrated so that its starting gradient equals the class "
        "loss's); 'none' leaves ignore masks unused",
    )
    p.add_argument(
        "--counterfactual-symmetries",
        action=argparse.BooleanOptionalAction,
        default=fb.counterfactual_symmetries,
        help="turn or mirror the regions the counterfactual terms move between images (a "
        "marked artifact, a lesion's surroundings) at random each step, so an artifact must "
        "not matter wherever and however it lies (docs/real-artifacts.md)",
    )
    p.add_argument(
        "--refit-bias",
        action=argparse.BooleanOptionalAction,
        default=fb.refit_bias,
        help="where feedback marks ignore regions, re-fit the decision's offsets on the "
        "training images with those regions filled after fine-tuning: the confounded class "
        "comes back, the artifact flips more predictions (docs/offsets.md)",
    )
    p.add_argument(
        "--auto-scale",
        action=argparse.BooleanOptionalAction,
        default=fb.auto_scale,
        help="scale the explanation loss so that its starting gradient equals the class "
        "loss's: lambda becomes the explanation share of the gradient (docs/shortcuts.md)",
    )
    p.add_argument("--explain-classes", choices=EXPLAIN_CLASSES, default=fb.explain_classes)
    p.add_argument("--cam", choices=tuple(CAM_METHODS), default=fb.cam)
    p.add_argument("--second-order", choices=("detached", "full"), default=fb.second_order)
    p.add_argument("--temperature", type=float, default=fb.temperature)
    p.add_argument("--clip-grad-norm", type=float, default=fb.clip_grad_norm)
    p.add_argument("--precision", choices=("fp32", "bf16"), default=fb.precision)


def feedback_config(args):
    from .objective import FeedbackConfig

    return FeedbackConfig(
        lam=args.lam,
        explanation_loss=args.explanation_loss,
        surroundings_loss=_none(args.surroundings_loss),
        ignore_loss=_none(args.ignore_loss),
        counterfactual_symmetries=args.counterfactual_symmetries,
        auto_scale=args.auto_scale,
        refit_bias=args.refit_bias,
        explain_classes=args.explain_classes,
        cam=args.cam,
        second_order=args.second_order,
        temperature=args.temperature,
        clip_grad_norm=args.clip_grad_norm,
        precision=args.precision,
    )


def command(sub, name: str, run) -> argparse.ArgumentParser:
    """Add the subcommand ``name``, which runs ``run(args)``. Its one-line help is the first
    paragraph of ``run``'s docstring and its description the whole docstring, so what a command
    does is written once, beside the code that does it."""
    doc = inspect.cleandoc(run.__doc__ or "")
    first = " ".join(doc.split("\n\n")[0].split())
    p = sub.add_parser(name, help=first, description=" ".join(doc.split()))
    p.set_defaults(func=run)
    return p


def _none(name: str) -> str | None:
    return None if name == "none" else name
