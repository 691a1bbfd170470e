"""Prepared folders: every image decoded once, resized and stored as memory-mappable arrays.

A prepared folder holds::

    images.npy  (N, S, S, 3) uint8
    masks.npy   (N, S, S)    uint8, 0/1 (union of the record's mask files; zeros if none)
    ignore.npy  (N, S, S)    uint8, 0/1, only when some image has "must not matter" masks
                (generic layout's ignore/, or `prepare(..., ignore=FOLDER)` for any layout,
                `data prepare --ignore`); meta.json's "ignore" flag says it is there, an
                all-zero row means none (`load_prepared_ignore`)
    index.csv   id,label,label_index,has_mask,source,width,height  (row i describes array row i;
                width/height are the original image's)
    meta.json   format "feedbackcam-prepared", version, classes, size, resample, layout, source
                root, reader options, counts, source fingerprint and every problem found

``meta.json`` is written last, inside a temporary sibling folder that is renamed into place only
when complete, so a folder with a ``meta.json`` is always a complete one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..fileio import jsonable, write_json
from . import decode
from .check import format_problems
from .dataset import ArrayDataset
from .layouts import read_dataset
from .records import (
    Problem,
    ReadResult,
)

__all__ = [
    "FORMAT",
    "VERSION",
    "load_prepared",
    "load_prepared_ignore",
    "prepare",
    "prepared_sources",
    "read_prepared_meta",
    "save_prepared",
]

FORMAT = "feedbackcam-prepared"
VERSION = 1
INDEX_COLUMNS = ("id", "label", "label_index", "has_mask", "source", "width", "height")
_META_KEYS = ("format", "version", "classes", "size", "resample", "layout", "counts", "settings")
# Records decoded per batch of thread work: bounds memory whatever the data set size.
_CHUNK = 256

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- bookkeeping


def _fingerprint(result: ReadResult) -> dict:
    """Sizes and mtimes of every file the prepared set depends on."""
    paths = {p for r in result.records for p in (r.image, *r.masks, *r.ignore)}
    paths |= {p for p in result.label_files if p.is_file()}
    digest = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        digest.update(
            f"{p.relative_to(result.root) if p.is_relative_to(result.root) else p}"
            f"\t{st.st_size}\t{st.st_mtime_ns}\n".encode()
        )
    return {"files": len(paths), "sha256": digest.hexdigest()}


def _problem_dict(p: Problem) -> dict:
    return {k: jsonable(v) for k, v in asdict(p).items()}


def read_prepared_meta(path) -> dict:
    """The ``meta.json`` of a prepared folder, checked for format, version and keys.

    Raises:
        FileNotFoundError: the folder or its ``meta.json`` is missing (an interrupted
            `prepare` never leaves one).
        ValueError: ``meta.json`` is unreadable, of another format/version, or incomplete.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path, got {type(path).__name__}")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: prepared folder does not exist")
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{folder}: not a complete prepared folder (meta.json missing); run prepare again"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder}: meta.json is unreadable ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{folder}: meta.json is not a {FORMAT!r} file")
    if meta.get("version") != VERSION:
        raise ValueError(
            f"{folder}: prepared format version {meta.get('version')}, "
            f"this code reads version {VERSION}; run prepare again"
        )
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{folder}: meta.json is incomplete, missing {missing}")
    return meta


def is_prepared(folder: Path) -> bool:
    """Whether ``folder`` was written by `prepare` (any version), so it may be replaced."""
    try:
        return json.loads((folder / "meta.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _is_up_to_date(out: Path, settings: dict, fingerprint: dict) -> bool:
    try:
        meta = read_prepared_meta(out)
    except (FileNotFoundError, ValueError):
        return False
    names = ("images.npy", "masks.npy", "index.csv") + (
        ("ignore.npy",) if meta.get("ignore") else ()
    )
    files_there = all((out / n).is_file() for n in names)
    return files_there and meta["settings"] == settings and meta.get("fingerprint") == fingerprint


def _remove_stale_tmp(out: Path) -> None:
    """Remove temporary folders left by killed runs (their pid no longer exists)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue  # another user's or another live run's folder: not ours to remove


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    # rename() cannot replace a non-empty folder: move the old one aside first, so `out` is
    # always either the old complete set or the new complete set (or briefly absent).
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _shrink(path: Path, n: int) -> None:
    """Rewrite an .npy memmap keeping its first ``n`` rows (some records failed to decode)."""
    full = np.load(path, mmap_mode="r")
    tmp = path.with_suffix(".shrink.npy")
    small = np.lib.format.open_memmap(tmp, mode="w+", dtype=full.dtype, shape=(n, *full.shape[1:]))
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        small[start:stop] = full[start:stop]
    small.flush()
    del small, full
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- prepare


def _build(
    tmp: Path,
    result: ReadResult,
    settings: dict,
    fingerprint: dict,
    *,
    size,
    resample,
    progress,
    workers,
) -> tuple[dict, list[Problem]]:
    records = result.usable()
    n = len(records)
    images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (n, size, size, 3))
    masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (n, size, size))
    # Only sets with "must not matter" masks get an ignore.npy: older readers never see one.
    with_ignore = any(r.ignore for r in records)
    ignore = (
        np.lib.format.open_memmap(tmp / "ignore.npy", "w+", np.uint8, (n, size, size))
        if with_ignore
        else None
    )
    problems = list(result.problems)
    rows = []
    k = 0
    bar = tqdm(total=n, disable=not progress, desc="prepare", unit="img")
    with bar, ThreadPoolExecutor(workers) as pool:
        for start in range(0, n, _CHUNK):
            chunk = records[start : start + _CHUNK]
            # Looked up at call time (not bound here) so tests can replace the decoder.
            loaded = pool.map(lambda r: decode.load_record(r, size, resample), chunk)
            for record, (item, found) in zip(chunk, loaded):
                bar.update()
                if item is None:
                    problems.extend(found)
                    continue
                image, mask, drop, width, height = item
                images[k], masks[k] = image, mask
                if ignore is not None:
                    ignore[k] = drop
                label_index = result.classes.index(record.label)
                rows.append(
                    (
                        record.id,
                        record.label,
                        label_index,
                        int(bool(record.masks)),
                        record.source,
                        width,
                        height,
                    )
                )
                k += 1
    images.flush()
    masks.flush()
    n_ignore = 0
    if ignore is not None:
        ignore.flush()
        n_ignore = int(ignore[:k].reshape(k, -1).any(axis=1).sum())
    del images, masks, ignore
    if k == 0:
        decode_errors = problems[len(result.problems) :]
        raise ValueError(
            f"{result.root}: none of the {n} usable images could be decoded:\n"
            + format_problems(decode_errors, limit=5)
        )
    if k < n:
        _shrink(tmp / "images.npy", k)
        _shrink(tmp / "masks.npy", k)
        if with_ignore:
            _shrink(tmp / "ignore.npy", k)
    with open(tmp / "index.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(INDEX_COLUMNS)
        writer.writerows(rows)
    per_class = Counter(row[1] for row in rows)
    kept = {row[0] for row in rows}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "classes": list(result.classes),
        "size": size,
        "resample": resample,
        "mask_resample": "nearest",
        "layout": result.layout,
        "source_root": str(result.root.resolve()),
        "settings": settings,
        "counts": {
            "images": k,
            "with_mask": sum(row[3] for row in rows),
            "with_ignore": n_ignore,
            "per_class": {c: per_class[c] for c in result.classes},
            "records_read": len(result.records),
            "excluded": len(result.records) - k,
            "excluded_ids": sorted(r.id for r in result.records if r.id not in kept),
        },
        "fingerprint": fingerprint,
        "ignore": with_ignore,
        "problems": [_problem_dict(p) for p in problems],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # Written last: its presence marks the folder complete.
    write_json(tmp / "meta.json", meta)
    return meta, problems


def prepare(
    root,
    out,
    *,
    size: int = 227,
    labels_csv=None,
    image_resample: str = "nearest",
    progress: bool = True,
    layout: str | None = None,
    workers: int | None = None,
    **options,
) -> Path:
    """Decode a dataset once into a prepared folder (format: see the module docstring).

    Images are squashed to ``size`` x ``size`` (nearest-neighbour by default, as in the thesis);
    masks are always resized nearest-neighbour and stay 0/1. Records with an error-level problem
    (unreadable image or mask, no label, mask size mismatch...) are left out of the arrays and
    listed in ``meta.json`` and in a logged warning. The build happens in
    ``out.parent / f".{out.name}.tmp-<pid>"`` and is renamed into place when complete. If
    ``out`` already holds a complete set with the same settings and the same source files
    (sizes and mtimes), it is returned without any work; with other settings it is replaced.

    Args:
        root: Dataset folder in an official ISIC layout or the generic one
            (`feedbackcam.data.layouts.detect_layout`).
        out: Prepared folder to create.
        size: Side of the stored images in pixels (the thesis' AlexNet input is 227).
        labels_csv: Labels for ISIC 2018 Task 2 (`feedbackcam.data.isic.read_labels_csv`) or
            the generic layout (default there: ``root/labels.csv``).
        image_resample: ``"nearest"`` or ``"bilinear"``.
        progress: Show a tqdm bar.
        layout: Force a layout instead of detecting it.
        workers: Decoding threads; default ``min(8, cpus)``.
        **options: Reader options (`feedbackcam.data.layouts.read_dataset`).

    Returns:
        ``out`` as a `Path`.

    Raises:
        ValueError: bad ``size``/``image_resample``, or no usable image in ``root``.
        FileExistsError: ``out`` exists and is not a prepared folder (never overwritten).
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if image_resample not in decode.RESAMPLE:
        raise ValueError(
            f"image_resample must be one of {tuple(decode.RESAMPLE)}, got {image_resample!r}"
        )
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a folder path, got {type(out).__name__}")
    out = Path(out).absolute()
    size = int(size)
    result = read_dataset(root, labels_csv, layout=layout, **options)
    settings = {
        "size": size,
        "resample": image_resample,
        "layout": result.layout,
        "labels_csv": str(result.label_files[0].resolve())
        if result.layout in ("isic2018_task2", "generic") and result.label_files
        else None,
        "options": {k: jsonable(v) for k, v in result.options},
    }
    fingerprint = _fingerprint(result)
    if _is_up_to_date(out, settings, fingerprint):
        return out
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not is_prepared(out)):
        raise FileExistsError(f"{out}: exists and is not a prepared folder; refusing to replace it")
    if not result.usable():
        errors = [p for p in result.problems if p.severity == "error"]
        raise ValueError(
            f"{result.root}: no usable image to prepare ({len(errors)} errors):\n"
            + format_problems(errors, limit=5)
        )
    workers = workers or min(8, os.cpu_count() or 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    decode.check_room(size, len(result.records), workers, out.parent)
    _remove_stale_tmp(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta, problems = _build(
            tmp,
            result,
            settings,
            fingerprint,
            size=size,
            resample=image_resample,
            progress=progress,
            workers=workers,
        )
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    excluded = meta["counts"]["excluded"]
    if problems:
        log.warning(
            "%s: %d of %d images left out; problems (all in %s):\n%s",
            result.root,
            excluded,
            meta["counts"]["records_read"],
            out / "meta.json",
            format_problems(problems, limit=10),
        )
    return out


# ----------------------------------------------------------------------------- loading


def _read_index(folder: Path) -> list[dict[str, str]]:
    path = folder / "index.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: index.csv missing")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != INDEX_COLUMNS:
            raise ValueError(
                f"{folder}: index.csv columns {reader.fieldnames}, expected {list(INDEX_COLUMNS)}"
            )
        return list(reader)


def load_prepared(path, mmap: bool = True) -> ArrayDataset:
    """Load a prepared folder as an `ArrayDataset`.

    Args:
        path: Folder written by `prepare`.
        mmap: Memory-map the arrays copy-on-write (``np.load(mmap_mode="c")``): nothing is read
            until used, and in-memory writes never reach the files. ``False`` reads them into RAM.

    Raises:
        FileNotFoundError: the folder, ``meta.json`` or an array is missing.
        ValueError: ``meta.json`` is incomplete or the arrays disagree with the index.
    """
    meta = read_prepared_meta(path)
    folder = Path(path)
    arrays = {}
    for name in ("images", "masks"):
        file = folder / f"{name}.npy"
        if not file.is_file():
            raise FileNotFoundError(f"{folder}: {file.name} missing")
        try:
            arrays[name] = np.load(file, mmap_mode="c" if mmap else None)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder}: {file.name} is unreadable ({exc})") from exc
    rows = _read_index(folder)
    classes = tuple(meta["classes"])
    n, s = len(rows), meta["size"]
    expected = {"images": (n, s, s, 3), "masks": (n, s, s)}
    for name, shape in expected.items():
        if arrays[name].shape != shape or arrays[name].dtype != np.uint8:
            raise ValueError(
                f"{folder}: {name}.npy is {arrays[name].dtype} "
                f"{arrays[name].shape}, index.csv and meta.json say uint8 {shape}"
            )
    if meta["counts"].get("images") != n:
        raise ValueError(
            f"{folder}: index.csv has {n} rows, meta.json counts {meta['counts'].get('images')}"
        )
    try:
        labels = np.array([int(r["label_index"]) for r in rows], dtype=np.int64)
        has_mask = np.array([r["has_mask"] == "1" for r in rows], dtype=bool)
    except ValueError as exc:
        raise ValueError(f"{folder}: index.csv has a non-integer label_index ({exc})") from exc
    bad = [
        r["id"]
        for r, y in zip(rows, labels)
        if not 0 <= y < len(classes) or classes[y] != r["label"]
    ]
    if bad:
        raise ValueError(
            f"{folder}: index.csv labels disagree with classes {classes} for {bad[:5]}"
        )
    ignore = load_prepared_ignore(folder, mmap=mmap)
    return ArrayDataset(
        arrays["images"],
        arrays["masks"],
        labels,
        has_mask,
        tuple(r["id"] for r in rows),
        classes,
        *(ignore if ignore is not None else (None, None)),
    )


def load_prepared_ignore(path, mmap: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
    """The "must not matter" masks of a prepared folder: (ignore (N, S, S) uint8 0/1,
    has_ignore (N,) bool), or ``None`` for a folder without them (an ISIC layout prepared
    without ``--ignore``).

    Raises:
        FileNotFoundError: meta.json says there are ignore masks but ``ignore.npy`` is missing.
        ValueError: ``ignore.npy`` is unreadable or its shape disagrees with the index.
    """
    meta = read_prepared_meta(path)
    folder = Path(path)
    if not meta.get("ignore"):
        return None
    file = folder / "ignore.npy"
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: meta.json lists ignore masks but ignore.npy is missing")
    try:
        ignore = np.load(file, mmap_mode="c" if mmap else None)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder}: ignore.npy is unreadable ({exc})") from exc
    n, s = meta["counts"]["images"], meta["size"]
    if ignore.shape != (n, s, s) or ignore.dtype != np.uint8:
        raise ValueError(
            f"{folder}: ignore.npy is {ignore.dtype} {ignore.shape}, expected uint8 {(n, s, s)}"
        )
    return ignore, ignore.reshape(n, -1).any(axis=1)


def prepared_sources(path) -> np.ndarray:
    """Where each row of a prepared folder came from (``Record.source``), as a str array."""
    read_prepared_meta(path)
    return np.array([r["source"] for r in _read_index(Path(path))], dtype=str)


def save_prepared(
    data: ArrayDataset, out, *, layout: str = "arrays", source: str = "arrays"
) -> Path:
    """Write an in-memory `ArrayDataset` (e.g. SynthDerm) as a prepared folder, atomically.

    For data that did not come from an ISIC layout: benchmarks and tests use it to run the
    prepared-data path end to end.
    """
    out = Path(out)
    if out.exists() and not is_prepared(out):
        raise FileExistsError(f"{out}: exists and is not a prepared folder; not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        np.save(tmp / "images.npy", np.ascontiguousarray(data.images, dtype=np.uint8))
        np.save(tmp / "masks.npy", (np.asarray(data.masks) > 0).astype(np.uint8))
        with_ignore = data.ignore is not None and bool(np.asarray(data.has_ignore).any())
        if with_ignore:
            ignore = (np.asarray(data.ignore) > 0) & np.asarray(data.has_ignore)[:, None, None]
            np.save(tmp / "ignore.npy", ignore.astype(np.uint8))
        with open(tmp / "index.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(INDEX_COLUMNS)
            for i, ident in enumerate(data.ids):
                y = int(data.labels[i])
                writer.writerow(
                    [
                        ident,
                        data.classes[y],
                        y,
                        int(bool(data.has_mask[i])),
                        source,
                        data.size,
                        data.size,
                    ]
                )
        counts = Counter(data.classes[int(y)] for y in data.labels)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "classes": list(data.classes),
            "size": data.size,
            "resample": "none",
            "layout": layout,
            "settings": {"size": data.size, "layout": layout},
            "counts": {
                "images": len(data),
                "with_mask": int(np.asarray(data.has_mask).sum()),
                "with_ignore": int(np.asarray(data.has_ignore).sum()) if with_ignore else 0,
                "per_class": {c: counts.get(c, 0) for c in data.classes},
                "records_read": len(data),
                "excluded": 0,
                "excluded_ids": [],
            },
            "ignore": with_ignore,
            "problems": [],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(tmp / "meta.json", meta)  # last: marks completion
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
