"""Checking a dataset: every file opened, every problem listed with its file.

`check_dataset` reads a dataset with the reader of its layout (`feedbackcam.data.layouts`: the
ISIC layouts, or your own images, masks and labels CSV), then opens each image and mask
(decoding them fully finds truncated files) and compares mask and image sizes; `format_report`
prints class counts (the thesis' Figure 5.3) and the problems.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .layouts import read_dataset
from .records import (
    CONFLICTING_LABELS,
    MASK_SIZE_MISMATCH,
    UNREADABLE_IMAGE,
    UNREADABLE_MASK,
    Problem,
    Problems,
    Record,
)


@dataclass(frozen=True, eq=False)
class CheckReport:
    """Result of `check_dataset`. ``class_counts`` counts labelled images (thesis Figure 5.3),
    ``usable_counts`` those a prepared set would keep; ``source_counts`` splits the former by
    source."""

    root: Path
    layout: str
    classes: tuple[str, ...]
    class_counts: dict[str, int]
    usable_counts: dict[str, int]
    source_counts: dict[str, dict[str, int]]
    n_images: int
    n_with_masks: int
    n_usable: int
    problems: tuple[Problem, ...]
    n_with_ignore: int = 0

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")


# ----------------------------------------------------------------------------- file checks


def _probe(path: Path, decode: bool) -> tuple[tuple[int, int] | None, str | None]:
    try:
        with Image.open(path) as im:
            if decode:
                im.load()  # decoding is what finds a truncated file; open() reads the header
            return im.size, None
    # Pillow signals a malformed file with many types (OSError, SyntaxError, struct.error,
    # DecompressionBombError...); for a data check any of them means "cannot use this file".
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def inspect_record(record: Record, *, decode: bool = True) -> list[Problem]:
    """Open a record's image and masks (keep and ignore): unreadable/truncated files (when
    ``decode``, by decoding them fully) and masks whose size differs from the image's."""
    problems = Problems()
    size, error = _probe(record.image, decode)
    if error:
        problems.add(record.image, record.id, UNREADABLE_IMAGE, error)
    for mask in (*record.masks, *record.ignore):
        msize, error = _probe(mask, decode)
        if error:
            problems.add(mask, record.id, UNREADABLE_MASK, error)
        elif size is not None and msize != size:
            msg = f"mask is {msize[0]}x{msize[1]}, image {size[0]}x{size[1]}"
            problems.add(mask, record.id, MASK_SIZE_MISMATCH, msg)
    return list(problems)


def conflicting_labels(records: Sequence[Record], pool=None) -> list[Problem]:
    """A warning for every labelled image whose file is byte-identical to another's with a
    different label (the same image given two classes, e.g. an export of contradictory
    feedback): kept, but a model would learn both answers."""
    labelled = [r for r in records if r.label is not None]

    def digest(record: Record) -> str | None:
        try:
            return hashlib.sha256(Path(record.image).read_bytes()).hexdigest()
        except OSError:
            return None  # unreadable: reported by the file check

    digests = list(pool.map(digest, labelled) if pool is not None else map(digest, labelled))
    groups: defaultdict[str, list[Record]] = defaultdict(list)
    for record, d in zip(labelled, digests, strict=True):
        if d is not None:
            groups[d].append(record)
    problems = Problems()
    for group in groups.values():
        if len({r.label for r in group}) < 2:
            continue
        for record in group:
            others = ", ".join(f"{o.id} ({o.label})" for o in group if o is not record)
            message = f"labelled {record.label}; the same image is {others}: resolve which is right"
            problems.add(record.image, record.id, CONFLICTING_LABELS, message, "warning")
    return list(problems)


def check_dataset(
    root,
    labels_csv=None,
    *,
    layout: str | None = None,
    decode: bool = True,
    workers: int | None = None,
    progress: bool = False,
    **options,
) -> CheckReport:
    """Read ``root`` and open every file it references; count classes and collect problems.

    Args:
        root: Dataset folder in an official ISIC layout or the generic one (see
            `detect_layout`).
        labels_csv: Labels for isic2018_task2 (see `read_labels_csv`) or generic (see
            `feedbackcam.data.generic`).
        decode: Decode every image and mask fully (finds truncated files); ``False`` only reads
            headers (sizes).
        workers: Threads opening files (Pillow decodes outside the GIL); default ``min(8, cpus)``.
        progress: Show a tqdm bar.
        **options: Reader options (`read_dataset`).
    """
    result = read_dataset(root, labels_csv, layout=layout, **options)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        found = pool.map(lambda r: inspect_record(r, decode=decode), result.records)
        file_problems = [
            p
            for ps in tqdm(found, total=len(result.records), disable=not progress, desc="check")
            for p in ps
        ]
        file_problems += conflicting_labels(result.records, pool)
    usable = result.usable(file_problems)
    counts = Counter(r.label for r in result.records if r.label is not None)
    by_source: defaultdict[str, Counter] = defaultdict(Counter)
    for r in result.records:
        if r.label is not None:
            by_source[r.source][r.label] += 1
    usable_counts = Counter(r.label for r in usable)
    return CheckReport(
        root=result.root,
        layout=result.layout,
        classes=result.classes,
        class_counts={c: counts[c] for c in result.classes},
        usable_counts={c: usable_counts[c] for c in result.classes},
        source_counts={s: {c: n[c] for c in result.classes} for s, n in sorted(by_source.items())},
        n_images=len(result.records),
        n_with_masks=sum(bool(r.masks) for r in result.records),
        n_usable=len(usable),
        problems=(*result.problems, *file_problems),
        n_with_ignore=sum(bool(r.ignore) for r in result.records),
    )


def format_problems(problems: Sequence[Problem], limit: int | None = None) -> str:
    """One line per problem (severity, kind, id, file, message), grouped by kind; at most
    ``limit`` lines per kind (``None``: all)."""
    by_kind: defaultdict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        by_kind[p.kind].append(p)
    lines = []
    for kind, ps in sorted(by_kind.items(), key=lambda kv: (kv[1][0].severity, kv[0])):
        lines.append(f"{ps[0].severity.upper()}: {kind} ({len(ps)})")
        for p in ps if limit is None else ps[:limit]:
            where = str(p.path) if p.path is not None else "-"
            lines.append(f"  {p.id or '-':<13} {where}: {p.message}")
        if limit is not None and len(ps) > limit:
            lines.append(f"  ... and {len(ps) - limit} more")
    return "\n".join(lines)


def format_report(report: CheckReport, limit: int | None = None) -> str:
    """A readable text report: totals, a class-count table (per source when several) and every
    problem with its file (at most ``limit`` per kind), then a one-line verdict."""
    if not isinstance(report, CheckReport):
        raise TypeError(f"report must be a CheckReport, got {type(report).__name__}")
    sources = list(report.source_counts) if len(report.source_counts) > 1 else []
    total = sum(report.class_counts.values())
    head = ["class", *sources, "images", "share", "usable"]
    rows = []
    for c in report.classes:
        n = report.class_counts[c]
        share = f"{100 * n / total:.1f}%" if total else "-"
        per_source = [str(report.source_counts[s][c]) for s in sources]
        rows.append([c, *per_source, str(n), share, str(report.usable_counts[c])])
    unlabelled = report.n_images - total
    rows.append(
        [
            "total",
            *[str(sum(report.source_counts[s].values())) for s in sources],
            str(total),
            "100.0%" if total else "-",
            str(report.n_usable),
        ]
    )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    table = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        )
        for row in [head, *rows]
    ]
    n_err, n_warn = len(report.errors), len(report.warnings)
    ignore = f"  with ignore masks: {report.n_with_ignore}" if report.n_with_ignore else ""
    lines = [
        f"dataset: {report.root} (layout {report.layout})",
        f"images: {report.n_images}  with masks: {report.n_with_masks}{ignore}  "
        f"unlabelled: {unlabelled}  usable: {report.n_usable}",
        "",
        *table,
        "",
    ]
    if report.problems:
        lines += [
            f"problems: {n_err} errors, {n_warn} warnings",
            format_problems(report.problems, limit),
            "",
        ]
    verdict = (
        f"FAILED: {n_err} errors (images with errors are left out of a prepared set)"
        if n_err
        else f"OK ({n_warn} warnings)"
        if n_warn
        else "OK"
    )
    lines.append(verdict)
    return "\n".join(lines)
