"""Self-describing checkpoints: everything needed to rebuild, explain and fine-tune a model.

A checkpoint records the architecture, class names, explanation layer(s), input size, input
normalisation and the config that trained it, so ``simulate``, ``explain`` and ``serve`` load it
with no extra flags. Writes are atomic: a failed save never leaves a truncated file in place of a
good one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .fileio import write_atomic
from .models import SelfExplaining, build_model

FORMAT = "feedbackcam-checkpoint"
VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    classes: tuple[str, ...]
    layers: tuple[str, ...]
    input_size: int
    arch_kwargs: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: str | Path,
    model: SelfExplaining,
    spec: ModelSpec,
    *,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` and its description to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": spec.arch,
        "arch_kwargs": dict(spec.arch_kwargs),
        "classes": list(spec.classes),
        "layers": list(spec.layers),
        "input_size": spec.input_size,
        "mean": model.mean.flatten().tolist(),
        "std": model.std.flatten().tolist(),
        "config": config or {},
        "metrics": metrics or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    return write_atomic(path, lambda f: torch.save(payload, f))


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[SelfExplaining, ModelSpec, dict[str, Any]]:
    """Rebuild a model from a checkpoint; return (model, spec, the whole payload)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "Weights only load failed" in first:  # torch's advice (weights_only=False) is unsafe
            first = "it holds objects other than tensors and plain values; those are not loaded"
        raise ValueError(f"{path}: not a readable checkpoint ({first[:200]})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a feedbackcam checkpoint (no '{FORMAT}' header)")
    spec = ModelSpec(
        arch=payload["arch"],
        classes=tuple(payload["classes"]),
        layers=tuple(payload["layers"]),
        input_size=int(payload["input_size"]),
        arch_kwargs=dict(payload.get("arch_kwargs", {})),
    )
    model = build_model(spec.arch, len(spec.classes), layers=spec.layers, **spec.arch_kwargs)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit {spec.arch} ({err})") from err
    return model, spec, payload
