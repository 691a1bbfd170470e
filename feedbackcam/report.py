"""Tables and plots of simulation results, in the style of the thesis' Tables 5.1-5.4."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .fileio import write_atomic  # noqa: E402

MODE_TITLES = {"cls": "Classification loss", "exp": "Explanation loss", "combined": "Combined loss"}
MODE_COLOURS = {"cls": "tab:blue", "exp": "tab:orange", "combined": "tab:green"}


NO_IMPROVEMENT = "no epoch improved on the baseline"


def _fmt(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _with_ci(r: dict, key: str) -> str:
    ci = (r.get("ci") or {}).get(key)
    text = _fmt(r.get(key))
    return text if not ci else f"{text} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _mark_best(cells: list[str], values: list[float | None], higher: bool = True) -> list[str]:
    """Bold the best value of a row (ties all bold, unless all are equal); None never wins."""
    known = [v for v in values if v is not None]
    if len(set(known)) < 2:  # nothing to tell apart
        return cells
    best = max(known) if higher else min(known)
    return [f"**{c}**" if v is not None and v == best else c for c, v in zip(cells, values)]


def simulation_table(results: dict[str, Any], classes: Sequence[str]) -> str:
    """Markdown table: one column per model (baseline, then each mode), rows as the thesis.

    Accuracy, average sensitivity and mean Jaccard carry their 95 % bootstrap interval where
    the results have one; the best value of each row is bold; a mode whose best epoch is 0 says
    that no epoch improved on the baseline (its numbers are the baseline's).
    """
    columns = [("Baseline", results["baseline"])] + [
        (MODE_TITLES.get(mode, mode), run) for mode, run in results["runs"].items()
    ]
    head = "| | " + " | ".join(name for name, _ in columns) + " |"
    rule = "|---|" + "---|" * len(columns)

    def row(name, key, cell, higher=True):
        values = [r.get(key) for _, r in columns]
        return (name, _mark_best([cell(r) for _, r in columns], values, higher))

    rows = [
        row("Accuracy [95 % CI]", "accuracy", lambda r: _with_ci(r, "accuracy")),
        row(
            "Mean (SD) Jaccard index [95 % CI]",
            "jaccard_mean",
            lambda r: f"{_with_ci(r, 'jaccard_mean')} ({_fmt(r['jaccard_sd'])})",
        ),
        row("ISIC Task 2 Jaccard", "isic_jaccard", lambda r: _fmt(r.get("isic_jaccard"))),
        (
            f"Per-class sensitivity [{', '.join(classes)}]",
            [
                "[" + ", ".join(_fmt(r["sensitivity"].get(c)) for c in classes) + "]"
                for _, r in columns
            ],
        ),
        row(
            "Average sensitivity [95 % CI]",
            "avg_sensitivity",
            lambda r: _with_ci(r, "avg_sensitivity"),
        ),
    ]
    for group in results["baseline"].get("groups", {}):
        values = [r["groups"][group]["accuracy"] for _, r in columns]
        rows.append((f"Accuracy, {group}", _mark_best([_fmt(v) for v in values], values)))
    if all("patch_flip_rate" in r for _, r in columns):
        rows.append(
            row(
                "Predictions changed by removing the patch",
                "patch_flip_rate",
                lambda r: _fmt(r["patch_flip_rate"]),
                higher=False,
            )
        )
    rows.append(("Best epoch", ["-"] + [_best_epoch(r) for _, r in columns[1:]]))
    rows.append(("Test images", [str(r["n_test"]) for _, r in columns]))
    body = "\n".join(f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows)
    return f"{head}\n{rule}\n{body}\n"


def _best_epoch(run: dict) -> str:
    epoch = run.get("best_epoch")
    if epoch is None:
        return "-"
    rejected = run.get("guard_rejected_epochs") or 0
    guard = f"; {rejected} failed the collapse guard" if rejected else ""
    return f"0 ({NO_IMPROVEMENT}{guard})" if epoch == 0 else f"{epoch}{guard.replace(';', ',')}"


def _line_panel(ax, series: dict, baseline, baseline_label: str, xlabel: str, ylabel: str):
    """One line per mode (``series``: mode -> (x, y)), a dashed baseline, integer x ticks."""
    for mode, (xs, ys) in series.items():
        ax.plot(
            xs,
            ys,
            marker="o",
            ms=3,
            label=MODE_TITLES.get(mode, mode),
            color=MODE_COLOURS.get(mode),
        )
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", lw=1, label=baseline_label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def simulation_plots(history: list[dict[str, Any]], results: dict[str, Any], out: Path) -> list:
    """Loss, accuracy and mean Jaccard vs epoch (one line per mode); vs slice if sliced.

    Validation curves start at epoch 0, the baseline on the same validation set, which the
    dashed line repeats: every point of a curve is comparable with it.
    """
    out = Path(out)
    written = []
    full = [row for row in history if row.get("slice", 0) == 0]
    for key, label, name in [
        ("train_loss", "train loss", "loss.png"),
        ("val_accuracy", "val accuracy", "accuracy.png"),
        ("val_jaccard_mean", "val mean Jaccard", "jaccard.png"),
    ]:
        if not full:
            break
        fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
        series = {}
        for mode in results["runs"]:
            rows = [r for r in full if r["mode"] == mode and r.get(key) is not None]
            series[mode] = ([r["epoch"] for r in rows], [r[key] for r in rows])
        start = [r[key] for r in full if r["epoch"] == 0 and r.get(key) is not None]
        base = start[0] if key != "train_loss" and start else None
        _line_panel(ax, series, base, "baseline (val, epoch 0)", "epoch", label)
        fig.tight_layout()
        written.append(save_png(fig, out / name))
    sliced = {m: r["slices"] for m, r in results["runs"].items() if "slices" in r}
    if sliced:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
        for ax, key, label in [
            (axes[0], "accuracy", "test accuracy"),
            (axes[1], "jaccard_mean", "test mean Jaccard"),
        ]:
            series = {
                m: ([r["slice"] for r in rows], [r[key] for r in rows])
                for m, rows in sliced.items()
            }
            _line_panel(ax, series, results["baseline"][key], "baseline (test)", "slice", label)
        fig.tight_layout()
        written.append(save_png(fig, out / "slices.png"))
    return written


def _overlay(ax, image, saliency, mask=None, threshold: float = 0.5, width: float = 0.8) -> None:
    """One image with its saliency (jet, 45 %), the explanation's contour at ``threshold``
    (yellow) and, if given and not empty, the feedback mask's contour (white)."""
    ax.imshow(image)
    ax.imshow(saliency, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    if mask is not None and mask.any():
        ax.contour(mask, levels=[0.5], colors="white", linewidths=width)
    if saliency.max() >= threshold:
        ax.contour(saliency, levels=[threshold], colors="yellow", linewidths=width)


def save_png(fig, path: Path, dpi: float | None = None) -> Path:
    """Write ``fig`` to ``path`` as PNG atomically (at ``dpi``, default the figure's) and
    close it."""
    try:
        return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def overlay_grid(
    images: np.ndarray,
    masks: np.ndarray,
    saliencies: dict[str, np.ndarray],
    titles: Sequence[str],
    path: Path,
    threshold: float = 0.5,
    predictions: dict[str, Sequence[str]] | None = None,
) -> Path:
    """Rows = images; columns = each model's saliency over the image, with the feedback mask's
    contour (white) and the explanation's 50 % contour (yellow); ``predictions`` (per model, per
    image) are written in each cell."""
    names = list(saliencies)
    n = len(images)
    fig, axes = plt.subplots(
        n, len(names) + 1, figsize=(1.9 * (len(names) + 1), 1.9 * n), dpi=100, squeeze=False
    )
    for i in range(n):
        axes[i, 0].imshow(images[i])
        axes[i, 0].contour(masks[i], levels=[0.5], colors="white", linewidths=0.8)
        axes[i, 0].set_ylabel(titles[i], fontsize=7)
        for j, name in enumerate(names, 1):
            _overlay(axes[i, j], images[i], saliencies[name][i], masks[i], threshold)
            if predictions is not None:
                axes[i, j].text(
                    0.03,
                    0.03,
                    predictions[name][i],
                    transform=axes[i, j].transAxes,
                    fontsize=8,
                    color="white",
                    bbox={"facecolor": "black", "alpha": 0.6, "pad": 1},
                )
    for j, name in enumerate(["image + feedback mask"] + names):
        axes[0, j].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return save_png(fig, Path(path))


def overlay_png(
    image: np.ndarray, saliency: np.ndarray, path: Path, title: str = "", threshold: float = 0.5
) -> Path:
    """Save one image with its saliency (jet, 45 %) and the explanation's 50 % contour."""
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    _overlay(ax, image, saliency, threshold=threshold, width=1)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    return save_png(fig, Path(path))


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def provenance() -> dict[str, str | None]:
    """When and by what a result was made: UTC time, package version, git commit (if any)."""
    import datetime
    import subprocess

    from . import __version__

    commit = None
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if done.returncode == 0:
            commit = done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {"date": now, "version": __version__, "commit": commit}


def _cell(text: str) -> str:
    """A table cell: markdown **bold** becomes <strong>."""
    if text.startswith("**") and text.endswith("**") and len(text) > 4:
        return f"<td><strong>{html.escape(text[2:-2])}</strong></td>"
    return f"<td>{html.escape(text)}</td>"


def html_report(
    title: str,
    intro: str,
    table_md: str,
    images: Sequence[tuple[str, Path]],
    notes: Sequence[str] = (),
    footer: dict[str, str | None] | None = None,
) -> str:
    """A self-contained HTML page (images inlined as base64), with a provenance footer."""
    lines = [ln for ln in table_md.strip().splitlines() if not ln.startswith("|---")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    thead = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    tbody = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in cells[1:])
    made = footer if footer is not None else provenance()
    footer_html = html.escape(
        f"Made {made['date']} by feedbackcam {made['version']}"
        + (f", git commit {made['commit']}" if made.get("commit") else ", outside a git checkout")
        + "."
    )
    figures = "".join(
        f"<figure>{_img_tag(p, cap)}<figcaption>{html.escape(cap)}</figcaption></figure>"
        for cap, p in images
    )
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
th {{ background: #f3f3f3; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
figcaption {{ font-size: 13px; color: #555; max-width: 560px; }}
img {{ max-width: 100%; }}
footer {{ margin-top: 2em; font-size: 13px; color: #555; border-top: 1px solid #ddd; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(intro)}</p>
<table><thead><tr>{thead}</tr></thead><tbody>{tbody}</tbody></table>
<ul>{note_html}</ul>
{figures}
<footer>{footer_html}</footer>
</body></html>
"""


def cluster_sheet(
    images: np.ndarray,
    saliency: np.ndarray,
    keep: np.ndarray | None,
    rows: Sequence[tuple[str, Sequence[int]]],
    path: Path,
    per_row: int = 6,
    threshold: float = 0.5,
) -> Path:
    """One row per cluster: its title and up to ``per_row`` of its images (indices into
    ``images``), each with its saliency (jet, 45 %), the explanation's 50 % contour (yellow)
    and the keep mask's contour (white). ``saliency`` holds the shown images' maps, in the
    order of ``rows``' indices, flattened. Written atomically."""
    path = Path(path)
    n = max(len(rows), 1)
    fig, axes = plt.subplots(n, per_row, figsize=(1.6 * per_row, 1.75 * n), dpi=100, squeeze=False)
    shown = 0
    for r, (title, members) in enumerate(rows):
        for j in range(per_row):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(members):
                ax.axis("off")
                continue
            i = members[j]
            mask = None if keep is None else keep[i]
            _overlay(ax, images[i], saliency[shown], mask, threshold, width=0.7)
            shown += 1
        axes[r, 0].set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    return save_png(fig, path)
