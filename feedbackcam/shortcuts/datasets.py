"""The benchmark's data sets by name: each builder and its schedule (the synthetic and pasted
sets in :mod:`.data`, the real-artifact and trap sets in :mod:`.isic_real`)."""

from __future__ import annotations

from pathlib import Path

from .config import DATASETS, TRAPS, BenchConfig, Schedule
from .data import ShortcutData, decoy_data, isic_data, synth_data
from .isic_real import isic_real_data, isic_trap_data


def load_data(
    name: str, seed: int, cfg: BenchConfig, cache: str | Path
) -> tuple[ShortcutData, Schedule]:
    """Data set ``name`` of ``seed`` and its schedule; ``cache``: where prepared data may go."""
    if name == "decoy":
        return decoy_data(seed, cfg.decoy_sizes), cfg.decoy
    if name in ("synth-patch", "synth-ruler"):
        return synth_data(seed, name.split("-")[1], cfg.synth_n), cfg.synth
    if name == "isic-bandaid":
        return isic_data(seed, cfg, cache), cfg.isic
    if name == "isic-real":
        return isic_real_data(seed, cfg, cache), cfg.isic_real
    if name in TRAPS:
        return isic_trap_data(seed, name.removeprefix("isic-trap-"), cfg, cache), cfg.trap
    raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")
