"""BatchNorm folded into the convolution before it, while its statistics are frozen.

A BatchNorm layer in eval mode is a per-channel affine map, y = (x - mean) / sqrt(var + eps) *
gamma + beta, and a convolution followed by one is a single convolution with its kernel scaled
and a bias added. On a CPU the BatchNorm pass is memory-bound work of its own (about a quarter
of EfficientNet-Lite0's forward at 224 px; docs/benchmarks.md, the app's update). Feedback
fine-tuning runs with the statistics frozen (``FeedbackConfig.freeze_batchnorm``) and every
evaluation pass in eval mode, so both can run the folded network (on a CPU:
:func:`folded_batchnorm`).

The fold here is differentiable: the scaled kernel is computed from the convolution's weight
and the BatchNorm's gamma and beta in every forward, so gradients reach the same parameters
as before and an optimizer steps them as it would the unfolded network; the model's modules
are swapped only inside :func:`folded_batchnorm` and put back after it, so names, state dicts
and checkpoints never see the fold. A BatchNorm back in train mode (batch statistics) runs
unfolded.

What is folded: a ``Conv2d`` (or timm's ``Conv2dSame``; not a subclass that transforms its
weight) whose output goes straight into a ``BatchNorm2d`` (or timm's ``BatchNormAct2d``), found
by tracing one forward, with neither being, or containing, a layer named in ``keep`` (the
explanation layers: their outputs are what the CAM differentiates) nor carrying a hook of its
own. The folded network's outputs are compared with the unfolded ones on the traced input; if
they differ (a convolution's output also used elsewhere), nothing is folded.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call

log = logging.getLogger(__name__)


def folded_weights(
    weight: Tensor,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    gamma: Tensor | None,
    beta: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The (weight, bias) of the convolution ``weight``, ``bias`` followed by a BatchNorm with
    running ``mean`` and ``var``, ``eps``, and affine ``gamma``, ``beta`` (None: 1 and 0), as
    differentiable functions of all of them."""
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = gamma * scale
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), shift


def _activation_after(norm: nn.Module) -> list[nn.Module] | None:
    """What ``norm`` applies after normalising ([] for a plain BatchNorm2d, [drop, act] for
    timm's BatchNormAct2d); None for a kind this module does not know how to fold."""
    if type(norm) is nn.BatchNorm2d:
        return []
    if type(norm).__name__ == "BatchNormAct2d" and hasattr(norm, "drop") and hasattr(norm, "act"):
        return [norm.drop, norm.act]
    return None


class FoldedConv(nn.Module):
    """``conv`` then ``norm``, run as one convolution while ``norm`` is in eval mode."""

    def __init__(self, conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv, self.norm = conv, norm
        self._after = _activation_after(norm) or []

    def forward(self, x: Tensor) -> Tensor:
        norm, conv = self.norm, self.conv
        if norm.training:  # batch statistics: nothing to fold
            return norm(conv(x))
        w, b = folded_weights(
            conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
            norm.weight, norm.bias,
        )  # fmt: skip
        y = functional_call(conv, {"weight": w, "bias": b}, (x,))
        for module in self._after:
            y = module(y)
        return y


def _plain_conv(conv: nn.Module) -> bool:
    """A convolution whose output is linear in its ``weight`` and ``bias`` as they are: torch's
    ``Conv2d`` and timm's ``Conv2dSame`` (which pads first). A subclass may transform its
    weight (timm's ``StdConv2d`` standardises it, which would undo the fold): left alone."""
    return type(conv) is nn.Conv2d or (
        type(conv).__name__ == "Conv2dSame" and isinstance(conv, nn.Conv2d)
    )


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _touches(name: str, keep: Iterable[str]) -> bool:
    """True when ``name`` is one of ``keep`` or holds one of them."""
    return any(k == name or k.startswith(name + ".") for k in keep)


# A pair is folded only where it saves work: the fold scales the convolution's kernel (and, in
# training, back-propagates through that) in every forward, where BatchNorm passes over the
# activations. Measured on the 2-core CPU (docs/benchmarks.md): the fold made a step 12-24 %
# slower for ResNet18 at batch 1 (224 px) or batch 4 (64 px), where kernels outweigh
# activations, and 15-25 % faster for Lite0 at 224 px, batch 13-32.
ACTIVATIONS_PER_WEIGHT = 4  # a batch's BatchNorm activations against the kernel's weights
MIN_ACTIVATIONS = 1 << 17  # below this a pair's own call overhead outweighs the pass saved


def foldable_pairs(
    net: nn.Module, example: Tensor, keep: Iterable[str] = (), rows: int | None = None
) -> list[tuple]:
    """(conv name, norm name) for each convolution of ``net`` whose output goes straight into a
    BatchNorm it can fold (module docstring) and where folding saves work on batches of
    ``rows`` images (default: ``example``'s; see ACTIVATIONS_PER_WEIGHT), traced on one forward
    of ``example`` without gradients (the modules' train/eval modes restored after)."""
    return _traced_pairs(net, example, keep, rows)[0]


def _traced_pairs(
    net: nn.Module, example: Tensor, keep: Iterable[str], rows: int | None
) -> tuple[list[tuple], list[Tensor]]:
    """:func:`foldable_pairs`, and the traced forward's outputs (:func:`_outputs`): the
    unfolded model's, which the fold is checked against."""
    keep = tuple(keep)
    rows = example.shape[0] if rows is None else rows
    modules = dict(net.named_modules())
    seen: list[tuple[str, Tensor, Tensor]] = []
    handles = [
        m.register_forward_hook(lambda _m, i, o, name=name: seen.append((name, i[0], o)))
        for name, m in modules.items()
        if isinstance(m, nn.Conv2d | nn.BatchNorm2d)
    ]
    modes = {m: m.training for m in net.modules()}
    try:
        net.eval()
        with torch.no_grad():
            outputs = _outputs(net, example)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    conv_of = {id(out): name for name, _, out in seen if isinstance(modules[name], nn.Conv2d)}
    calls: dict[str, int] = {}
    for name, _, _ in seen:
        calls[name] = calls.get(name, 0) + 1
    pairs = []
    for name, inp, out in seen:
        norm = modules[name]
        conv_name = conv_of.get(id(inp))
        if conv_name is None or not isinstance(norm, nn.BatchNorm2d):
            continue
        conv = modules[conv_name]
        activations = out[0].numel() * rows
        if (
            activations < max(MIN_ACTIVATIONS, ACTIVATIONS_PER_WEIGHT * conv.weight.numel())
            or not _plain_conv(conv)
            or _activation_after(norm) is None
            or not norm.track_running_stats
            or norm.running_mean is None
            or calls[name] != 1
            or calls[conv_name] != 1
            or _hooked(conv)
            or _hooked(norm)
            or _touches(name, keep)
            or _touches(conv_name, keep)
        ):
            continue
        pairs.append((conv_name, name))
    return pairs, outputs


def _set(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, attr, module)


def _outputs(model: nn.Module, example: Tensor) -> list[Tensor]:
    out = model(example)
    if isinstance(out, Tensor):
        return [out]
    return [t for part in out for t in (part if isinstance(part, tuple) else (part,))]


@contextlib.contextmanager
def folded_batchnorm(model: nn.Module, example: Tensor) -> Iterator[int]:
    """Inside, ``model`` (a :class:`~feedbackcam.self_explaining.SelfExplaining`; anything else,
    e.g. a DistributedDataParallel wrapper, is left alone) runs each foldable convolution and
    BatchNorm pair as one convolution while the BatchNorm is in eval mode; yields how many
    pairs. ``example``: a batch of the images it will see (one is traced; its size decides
    where folding saves work, :func:`foldable_pairs`). On the way out,
    even after an error, every module is back where it was.

    The swap edits ``model``'s module tree for the duration: a model other threads use must be
    held for all of it (the app's served model is used only under ``Served.lock``).

    CPU only: there BatchNorm is memory-bound passes of its own; on an accelerator it is one
    cheap kernel and the fold's per-layer arithmetic would be several (not measured there, so
    an accelerator's model runs as it is)."""
    layers = getattr(model, "layers", None)
    net = getattr(model, "model", None)
    if (
        layers is None
        or not isinstance(net, nn.Module)
        or example.device.type != "cpu"
        or not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # e.g. VGG16
    ):
        yield 0
        return
    probe = example[:1].detach()
    keep = tuple(f"model.{k}" for k in layers)
    pairs, before = _traced_pairs(model, probe, keep, example.shape[0])
    modules = dict(model.named_modules())
    originals = [(c, modules[c], n, modules[n]) for c, n in pairs]
    try:
        if originals and not _same_outputs(model, probe, originals, before):
            log.warning("folding BatchNorm changed %s's outputs; it runs unfolded", type(net))
            _restore(model, originals)
            originals = []
        yield len(originals)
    finally:
        _restore(model, originals)


def _same_outputs(
    model: nn.Module, probe: Tensor, originals: list[tuple], before: list[Tensor]
) -> bool:
    """Fold ``originals`` into ``model`` and say whether its outputs on ``probe`` (eval mode,
    no gradients) are ``before``, the unfolded model's, to float rounding."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            for conv_name, conv, norm_name, norm in originals:
                _set(model, conv_name, FoldedConv(conv, norm))
                _set(model, norm_name, nn.Identity())
            after = _outputs(model, probe)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return len(before) == len(after) and all(_close(a, b) for a, b in zip(before, after))


def _close(a: Tensor, b: Tensor) -> bool:
    a, b = a.float(), b.float()
    scale = float(a.abs().max()) if a.numel() else 0.0
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1e-6))


def _restore(model: nn.Module, originals: list[tuple]) -> None:
    for conv_name, conv, norm_name, norm in originals:
        _set(model, conv_name, conv)
        _set(model, norm_name, norm)
