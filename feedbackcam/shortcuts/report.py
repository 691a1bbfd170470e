"""The benchmark's outputs: the summary tables (mean ± SD over seeds), the efficiency plot, the
raw rows as CSV, and the default-loss rule's table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..fileio import write_csv, write_text
from .rules import DEFAULT_CANDIDATES, choose_default

METRICS = ("acc", "acc_clean", "acc_misleads", "flip_rate", "wr_gradcam", "wr_inputgrad", "jaccard")


def _stat(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], float)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _fmt(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    m, sd = _stat(values)
    if math.isnan(m):
        return "–"
    return f"{m * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def _group(rows: list[dict], **match) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            groups.setdefault((r["method"], r["mask"], r["fraction"]), []).append(r)
    return groups


# Class order of a data set's rows written before rows carried their "classes" (the ISIC 2017
# reader's order and SynthDerm's CLASSES).
DATASET_CLASSES = {
    "isic-bandaid": ("NV", "MEL", "BKL"),
    "synth-patch": ("NV", "MEL", "BKL"),
    "synth-ruler": ("NV", "MEL", "BKL"),
}


def _classes(r: dict) -> tuple[str, ...]:
    return tuple(r.get("classes") or DATASET_CLASSES.get(r["dataset"], ()))


def _class_table(main: dict[tuple, list[dict]], name: str) -> list[str]:
    """Per-class scores of class ``name`` on the clean test images (ISIC: melanoma's
    sensitivity and one-vs-rest AUC), where the rows know their classes."""
    groups = {k: rs for k, rs in main.items() if all(name in _classes(r) for r in rs)}
    if not groups:
        return []

    def of(r: dict, key: str):
        return r[key][_classes(r).index(name)] if r.get(key) else None

    lines = [
        "",
        f"{name} on the clean test images (the confounder removed), and average sensitivity:",
        "",
        f"| method | λ | {name} AUC, clean | {name} sensitivity, clean "
        f"| {name} sensitivity, with confounder | avg sensitivity | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, _, _), rs in groups.items():
        lam = rs[0]["lam"]
        lines.append(
            f"| {method} | {'' if lam is None else lam} "
            f"| {_fmt([of(r, 'auc_clean') for r in rs])} "
            f"| {_fmt([of(r, 'sens_clean') for r in rs])} | {_fmt([of(r, 'sens') for r in rs])} "
            f"| {_fmt([r.get('avg_sens') for r in rs])} | {len(rs)} |"
        )
    return lines


def _real_artifact_tables(main: dict[tuple, list[dict]]) -> list[str]:
    """For data sets whose rows know the class the confounder stands for and the images'
    annotated artifacts (isic-real, the trap splits): how often it turns other classes into
    that class, every class's sensitivity and AUC on the clean test images, and each model's
    accuracy with and without every annotated artifact."""
    rows = [r for rs in main.values() for r in rs]
    if not rows or not any("flip_to_target" in r for r in rows):
        return []

    def per_class(rs, key):
        values = np.array([r[key] for r in rs if r.get(key)], dtype=float)
        if not len(values):
            return "–"
        return " / ".join(f"{m:.2f}" for m in np.nanmean(values, axis=0))

    classes = " / ".join(_classes(rows[0])) or "classes"
    lines = [
        "",
        "On the clean test images (no pasted artifact), per class "
        f"({classes}), how often a pasted artifact turns another class into the one it "
        "stood for in training, and how far it pushes them towards it (mean change of that "
        "class's log-odds; independent of the class's offset); *region filled*: the same flip "
        "with the artifact's region holding the image's median colour instead (a change with "
        "no object in it: what the artifact adds is the difference):",
        "",
        "| method | λ | flip to that class | the same, region filled | push (log-odds) "
        "| sensitivity, clean | AUC, clean | avg sensitivity, clean | n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, _, _), rs in main.items():
        lam = rs[0]["lam"]
        lines.append(
            f"| {method} | {'' if lam is None else lam} "
            f"| {_fmt([r.get('flip_to_target') for r in rs])} "
            f"| {_fmt([r.get('flip_to_target_filled') for r in rs])} "
            f"| {_fmt([r.get('target_shift') for r in rs])} | {per_class(rs, 'sens_clean')} "
            f"| {per_class(rs, 'auc_clean')} | {_fmt([r.get('avg_sens_clean') for r in rs])} "
            f"| {len(rs)} |"
        )
    names = [n for n in rows[0].get("by_artifact", {}) if n != "annotated"]
    if names:
        lines += [
            "",
            "Accuracy on the clean test images with / without each annotated artifact "
            "(a model that reads an artifact differs most between the two):",
            "",
            "| method | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for (method, _, _), rs in main.items():
            cells = []
            for n in names:
                pairs = np.array(
                    [r["by_artifact"][n][:2] for r in rs if n in r.get("by_artifact", {})]
                )
                cells.append(
                    "–"
                    if not len(pairs)
                    else f"{np.nanmean(pairs[:, 0]):.2f} / {np.nanmean(pairs[:, 1]):.2f}"
                )
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(rows: list[dict]) -> str:
    """Mean ± SD over seeds: main table, controls, efficiency and the tuning trials."""
    lines = []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        main = _group(rows, dataset=ds, phase="main")
        ceil = {
            r["seed"]: r["acc"]
            for r in rows
            if r["dataset"] == ds and r["method"] == "no-confounder"
        }
        seeds = sorted({r["seed"] for r in rows if r["dataset"] == ds and r["phase"] == "main"})
        lines += [f"## {ds}", "", f"seeds {seeds}; mean ± SD over seeds.", ""]
        lines += [
            "| method | λ | test acc | % of ceiling | acc, clean test | avg sensitivity "
            "| acc where it misleads | flip rate | WR Grad-CAM | WR input grad | Jaccard (keep) "
            "| n |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (method, _, _), rs in main.items():
            share = [r["acc"] / ceil[r["seed"]] for r in rs if r["seed"] in ceil]
            lam = rs[0]["lam"]
            lines.append(
                f"| {method} | {'' if lam is None else lam} | {_fmt([r['acc'] for r in rs])} "
                f"| {_fmt(share, 100, 1)} | {_fmt([r['acc_clean'] for r in rs])} "
                f"| {_fmt([r.get('avg_sens') for r in rs])} "
                f"| {_fmt([r['acc_misleads'] for r in rs])} "
                f"| {_fmt([r['flip_rate'] for r in rs])} "
                f"| {_fmt([r['wr_gradcam'] for r in rs], 1, 1)} "
                f"| {_fmt([r['wr_inputgrad'] for r in rs], 1, 1)} "
                f"| {_fmt([r['jaccard'] for r in rs])} | {len(rs)} |"
            )
        lines += _class_table(main, "MEL")
        lines += _real_artifact_tables(main)
        base = {r["seed"]: r for r in rows if r["dataset"] == ds and r["method"] == "baseline"}
        true = {
            (r["method"], r["seed"]): r for r in rows if r["dataset"] == ds and r["phase"] == "main"
        }
        for phase, title in (("control", "Controls"), ("efficiency", "Efficiency")):
            groups = _group(rows, dataset=ds, phase=phase)
            if not groups:
                continue
            lines += [
                "",
                f"### {title}",
                "",
                "| method | masks | share with feedback | test acc | flip rate "
                "| share of the true-mask gain: acc | : flip rate | n |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for (method, mask, fraction), rs in groups.items():
                gains = {"acc": [], "flip_rate": []}
                for r in rs:
                    t, b0 = true.get((method, r["seed"])), base.get(r["seed"])
                    if t is None or b0 is None:
                        continue
                    for k in gains:
                        full = t[k] - b0[k]
                        if abs(full) > 1e-9:
                            gains[k].append((r[k] - b0[k]) / full)
                lines.append(
                    f"| {method} | {mask} | {fraction:g} | {_fmt([r['acc'] for r in rs])} "
                    f"| {_fmt([r['flip_rate'] for r in rs])} | {_fmt(gains['acc'], 100, 0)} % "
                    f"| {_fmt(gains['flip_rate'], 100, 0)} % | {len(rs)} |"
                )
        tune = [r for r in rows if r["dataset"] == ds and r["phase"] == "tune"]
        if tune:
            lines += [
                "",
                f"### Tuning (seed {tune[0]['seed']}, validation split only)",
                "",
                "| method | λ | loss scale | val acc | val avg sensitivity, filled "
                "| val flip rate |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {r['method']} | {r['lam']} | {r['loss_scale']:.3g} | {r['val_acc']:.3f} "
                f"| {_fmt([r.get('val_avg_sens_filled')])} | {r['val_flip']:.3f} |"
                for r in tune
            ]
        lines.append("")
    return "\n".join(lines)


def efficiency_plot(rows: list[dict], path: Path) -> Path | None:
    """Test accuracy and flip rate against the share of images with feedback, per data set."""
    eff = [r for r in rows if r["phase"] == "efficiency"]
    if not eff:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in eff))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ds in datasets:
        for method in dict.fromkeys(r["method"] for r in eff if r["dataset"] == ds):
            # only the seeds that have efficiency runs, so every point averages the same seeds
            seeds = {r["seed"] for r in eff if r["dataset"] == ds and r["method"] == method}
            same = [r for r in rows if r["dataset"] == ds and r["seed"] in seeds]
            pts = [
                r
                for r in same
                if r["method"] == method
                and r["phase"] in ("efficiency", "main")
                and r["mask"] == "ignore"
            ]
            base = [r for r in same if r["method"] == "baseline"]
            label = f"{ds}: {method} (seeds {sorted(seeds)})"
            fracs = sorted({r["fraction"] for r in pts} - {0.0})
            for ax, k in zip(axes, ("acc", "flip_rate")):
                stats = [_stat([r[k] for r in pts if r["fraction"] == f]) for f in fracs]
                xs = [0.0, *fracs]
                b = _stat([r[k] for r in base])
                ys = [b[0], *[s[0] for s in stats]]
                es = [b[1], *[s[1] for s in stats]]
                line = ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
                none = [r[k] for r in pts if r["fraction"] == 0.0]
                if none:  # fine-tuned with no strokes at all (its keep masks only)
                    m, e = _stat(none)
                    ax.errorbar(
                        [0.0],
                        [m],
                        yerr=[e],
                        marker="s",
                        mfc="none",
                        capsize=3,
                        color=line.lines[0].get_color(),
                        label=f"{label}, no ignore masks",
                    )
    for ax, title in zip(axes, ("test accuracy", "flip rate (confounder decides)")):
        ax.set_xscale("symlog", linthresh=0.05)
        ax.set_xticks([0, 0.05, 0.1, 0.25, 1.0], ["0\n(baseline)", "5 %", "10 %", "25 %", "100 %"])
        ax.set_xlabel("share of confounded images with an ignore mask")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    # below the plots, one line a curve: long labels never cover a curve or a title
    below = 0.06 * len(labels) + 0.02
    fig.set_figheight(fig.get_figheight() * (1 + below))
    fig.legend(handles, labels, loc="lower center", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, below / (1 + below), 1, 1))
    from ..report import save_png  # matplotlib only when a plot is drawn

    return save_png(fig, path, dpi=120)


def write_outputs(rows: list[dict], out: Path) -> None:
    """``runs.csv`` (every row), ``summary.md`` and ``efficiency.png`` in ``out``."""
    write_csv(out / "runs.csv", rows, list(dict.fromkeys(k for r in rows for k in r)))
    write_text(out / "summary.md", summary_markdown(rows))
    efficiency_plot(rows, out / "efficiency.png")


def default_choice_markdown(rows: list[dict], candidates=DEFAULT_CANDIDATES) -> str:
    """:func:`choose_default`'s table and verdict, as markdown."""
    winner, table = choose_default(rows, tuple(candidates))
    lines = [
        "| data set | method | validation flip rate | filled-validation score | guard floor | "
        "classes below the reference's floor | keeps its classes |",
        "|---|---|---|---|---|---|---|",
    ]
    for ds, per in table.items():
        for m, v in per.items():
            flip = "–" if v["flip"] is None or math.isnan(v["flip"]) else f"{v['flip']:.3f}"
            lost = ", ".join(v.get("classes") or []) or "none"
            lines.append(
                f"| {ds} | {m} | {flip} | {v['score']:.4f} | {v['floor']:.4f} | {lost} | "
                f"{'yes' if v['passes'] else 'no'} |"
            )
    lines += ["", f"Default by this rule: **{winner or 'none'}**."]
    return "\n".join(lines) + "\n"


def default_choice_from(folder: str | Path) -> str:
    """:func:`default_choice_markdown` of every ``folder/*/runs.jsonl`` (a benchmark output
    each), under the product's protocol: fine-tuning is class-weighted (``simulate``'s default),
    so a data set's rows come from the folders run with ``--class-weighted`` where it has any,
    and from the others where it has none (on the class-balanced data sets the weights are 1 and
    the protocols agree).

    Raises:
        ValueError: no benchmark output to choose from in ``folder``.
    """
    weighted, plain = [], []
    for runs in sorted(Path(folder).glob("*/runs.jsonl")):
        config = runs.parent / "config.json"
        is_weighted = config.exists() and json.loads(config.read_text()).get("class_weighted")
        rows = [json.loads(line) for line in runs.read_text().splitlines()]
        (weighted if is_weighted else plain).extend(rows)
    if not weighted and not plain:
        raise ValueError(f"{folder}: no */runs.jsonl to choose from")
    have = {r["dataset"] for r in weighted}
    rows = weighted + [r for r in plain if r["dataset"] not in have]
    return default_choice_markdown(rows)
