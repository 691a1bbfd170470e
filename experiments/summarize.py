"""Markdown table of confounder.py runs (mean and SD over seeds), with the counterfactual
patch reliance of shortcut_reliance.py. Usage: python experiments/summarize.py RUNS_DIR..."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

COLUMNS = [
    ("accuracy", "test accuracy"),
    ("misleads", "accuracy where the patch misleads"),
    ("sens_MEL", "MEL sensitivity"),
    ("jaccard", "mean Jaccard"),
    ("flip_rate", "predictions decided by the patch"),
]


def main() -> None:
    rows: dict[str, list[dict]] = defaultdict(list)
    for folder in map(Path, sys.argv[1:]):
        reliance = {}
        if (folder / "reliance.json").exists():
            for r in json.loads((folder / "reliance.json").read_text()):
                reliance[(r["seed"], r["setting"])] = r
        for line in (folder / "log.jsonl").read_text().splitlines():
            r = json.loads(line)
            key = (r["seed"], r["setting"].replace(" ", "_"))
            r |= {"flip_rate": reliance.get(key, {}).get("flip_rate", np.nan)}
            rows[r["setting"]].append(r)
    print("| setting | seeds | " + " | ".join(label for _, label in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for setting, rs in rows.items():
        seeds = sorted({r["seed"] for r in rs})
        cells = []
        for key, _ in COLUMNS:
            v = np.array([r[key] for r in rs], dtype=float)
            cells.append(
                "n/a" if np.isnan(v).all() else f"{np.nanmean(v):.2f} ± {np.nanstd(v):.2f}"
            )
        print(f"| {setting} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
