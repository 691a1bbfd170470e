"""Reading your own data: a folder of images, optional masks, and a labels CSV.

The layout every clinic set and most public sets (HAM10000, Derm7pt, BCN20000) have after
unzipping, and the one the app's export writes::

    images/<id>.jpg|.jpeg|.png      any ids (IMD002, 0001, lesion-17...); or the images directly
                                    in the folder, beside the CSV
    masks/<id>.png                  optional keep masks (what should matter); also accepted:
                                    masks/<id>_mask.png, masks/<id>_segmentation.png, and
                                    <id>_mask.png / <id>_segmentation.png beside the images
    ignore/<id>.png                 optional "must not matter" masks (or <id>_ignore.png)
    labels.csv                      an id column and a class column, or one-hot class columns

The id column is the first of ``id, image, image_id, isic_id, image_name, filename``, the class
column the first of ``label, class, dx, diagnosis, target`` (names matched case-insensitively;
an id may carry its image extension). Without a class column, the columns whose every value
is a number in [0, 1] are one-hot classes (an ``UNK`` column marks unknown rows, as in ISIC
2019). Other columns (the export's ``user, created_at, model_version``) are ignored. ISIC class
names are matched case-insensitively, so HAM10000's ``nv, mel, bkl, bcc, df, vasc`` read as
``NV, MEL...`` (and ``akiec`` as ``AK``) and line up with ISIC-trained models. Several
mask files for one id are combined (union), as ISIC 2018 Task 2's attribute masks are.

Like the ISIC readers, `read_generic` never stops at the first problem: every image gets a
`Record`, and everything unusable a `Problem` naming its file.
"""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from . import records as rec
from .records import LabelTable, Problems, ReadResult, Record, check_root, read_csv

__all__ = [
    "ID_COLUMNS",
    "IMAGE_SUFFIXES",
    "LABEL_COLUMNS",
    "UNKNOWN_CLASS",
    "looks_generic",
    "read_generic",
    "read_generic_labels",
    "with_ignore_folder",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ID_COLUMNS = ("id", "image", "image_id", "isic_id", "image_name", "filename")
LABEL_COLUMNS = ("label", "class", "dx", "diagnosis", "target")
UNKNOWN_CLASS = "unknown class"

# Lower-case spellings of the ISIC class names (HAM10000's dx column) -> the ISIC name.
_ISIC_NAMES = {c.lower(): c for c in rec.CLASSES_2019} | {"akiec": "AK"}
_MASK_SUFFIX = re.compile(r"^(.+)_(mask|segmentation|ignore)$")
# Files that sit beside images in a flat folder without being data.
_SIDE_FILES = (".csv", ".txt", ".md", ".json", ".yaml", ".yml", ".pdf", ".html")


def looks_generic(root) -> bool:
    """Whether ``root`` holds an ``images/`` folder with an image, or images (in it or in its
    subfolders, e.g. HAM10000's two parts) beside a CSV."""
    root = Path(root)
    if (root / "images").is_dir():
        return any(_is_image(p) for p in _files(root / "images", root))
    has_csv = any(p.suffix.lower() == ".csv" and p.is_file() for p in root.iterdir())
    return has_csv and any(_is_image(p) for p in _files(root, root))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _strip_image_suffix(name: str) -> str:
    stem, dot, suffix = name.rpartition(".")
    return stem if dot and f".{suffix.lower()}" in IMAGE_SUFFIXES else name


def _files(folder: Path, root: Path):
    """Files under ``folder`` in sorted order, subfolders included; hidden entries and the
    ``masks/`` and ``ignore/`` folders of ``root`` left out."""
    skip = {root / "masks", root / "ignore"}
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(here, d) not in skip)
        yield from (Path(here, f) for f in sorted(files) if not f.startswith("."))


# ----------------------------------------------------------------------------- files


def _scan(root: Path, problems: Problems):
    """(id -> image, id -> keep mask files, id -> ignore mask files)."""
    folder = root / "images" if (root / "images").is_dir() else root
    images: dict[str, Path] = {}
    masks: defaultdict[str, list[Path]] = defaultdict(list)
    ignore: defaultdict[str, list[Path]] = defaultdict(list)
    for path in _files(folder, root):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            if folder != root or path.suffix.lower() not in _SIDE_FILES:
                problems.add(path, None, rec.UNEXPECTED_FILE, "not a JPEG or PNG image", "warning")
            continue
        m = _MASK_SUFFIX.match(path.stem)
        if m:  # <id>_mask.png beside the images is a mask, not an image of its own
            (ignore if m.group(2) == "ignore" else masks)[m.group(1)].append(path)
            continue
        key = path.stem
        if key in images:
            first = images[key].relative_to(root)
            problems.add(path, key, rec.DUPLICATE_ID, f"same id as {first}; both left out")
        else:
            images[key] = path
    for name, found in (("masks", masks), ("ignore", ignore)):
        if (root / name).is_dir():
            for key, paths in _mask_files(root / name, problems).items():
                found[key].extend(paths)
    return images, masks, ignore


def _mask_files(folder: Path, problems: Problems) -> defaultdict[str, list[Path]]:
    """id -> the mask files of ``folder`` (``<id>.png``, or ``<id>_mask|_segmentation|
    _ignore.png``); a file that is not an image is a warning."""
    found: defaultdict[str, list[Path]] = defaultdict(list)
    for path in _files(folder, folder):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            problems.add(path, None, rec.UNEXPECTED_FILE, "not a PNG or JPEG mask", "warning")
            continue
        m = _MASK_SUFFIX.match(path.stem)
        found[m.group(1) if m else path.stem].append(path)
    return found


def _find_labels_csv(root: Path, problems: Problems) -> Path | None:
    if (root / "labels.csv").is_file():
        return root / "labels.csv"
    csvs = sorted(p for p in root.glob("*.csv") if not p.name.startswith("."))
    if len(csvs) == 1:
        return csvs[0]
    why = (
        f"several CSVs ({', '.join(p.name for p in csvs)}) and none named labels.csv; pass --labels"
        if csvs
        else "no labels.csv (an id column and a class column); pass --labels"
    )
    problems.add(root / "labels.csv", None, rec.MISSING_GROUND_TRUTH, why)
    return None


# ----------------------------------------------------------------------------- labels CSV


def _pick(header: list[str], names: tuple[str, ...]) -> str | None:
    lower = {h.lower(): h for h in header}
    return next((lower[n] for n in names if n in lower), None)


def _is_fraction(value: str) -> bool:
    try:
        return 0 <= float(value) <= 1
    except ValueError:
        return False


def _class_name(name: str) -> str:
    return _ISIC_NAMES.get(name.lower(), name)


def _infer_classes(names) -> tuple[str, ...]:
    """ISIC class names in the ISIC order (so models trained on ISIC data line up), then the
    rest alphabetically."""
    names = set(names)
    canonical = rec.CLASSES_3 if names <= set(rec.CLASSES_3) else rec.CLASSES_2019
    return tuple(c for c in canonical if c in names) + tuple(sorted(names - set(canonical)))


def read_generic_labels(path, classes=None) -> tuple[LabelTable, tuple[str, ...]]:
    """Read a generic labels CSV: (id -> class table, the classes).

    Args:
        path: The CSV (format: see the module docstring).
        classes: The class names and their order; a row of another class is an error. Default:
            the classes the CSV names (ISIC names in ISIC order, others alphabetically).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``classes`` is empty or has duplicates.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: labels CSV does not exist")
    if classes is not None:
        classes = tuple(_class_name(c) for c in classes)
        if not classes or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be distinct names, got {classes}")
    problems = Problems()
    try:
        header, rows = read_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problems.add(path, None, rec.UNKNOWN_LABEL_FORMAT, f"cannot read CSV: {exc}")
        return LabelTable(path, None, {}, {}, tuple(problems)), classes or ()
    id_col = _pick(header, ID_COLUMNS)
    label_col = _pick(header, LABEL_COLUMNS)
    hot = []
    if label_col is None:
        hot = [h for h in header if h != id_col and rows and all(_is_fraction(r[h]) for r in rows)]
    if id_col is None or (label_col is None and not hot):
        msg = (
            f"header {header[:8]} has no id column ({'/'.join(ID_COLUMNS)}) "
            f"and class column ({'/'.join(LABEL_COLUMNS)}) or one-hot class columns"
        )
        problems.add(path, None, rec.UNKNOWN_LABEL_FORMAT, msg)
        return LabelTable(path, None, {}, {}, tuple(problems)), classes or ()
    raw: dict[str, str | None] = {}
    for row in rows:
        key = _strip_image_suffix(row.get(id_col, ""))
        if not key:
            problems.add(path, None, rec.UNUSABLE_LABEL, f"row without an id in column {id_col!r}")
            continue
        if label_col is not None:
            name = _class_name(row[label_col]) if row.get(label_col) else None
            if name is None:
                problems.add(path, key, rec.UNUSABLE_LABEL, f"empty {label_col!r}")
        else:
            on = [h for h in hot if float(row[h]) >= 0.5]
            name = _class_name(on[0]) if len(on) == 1 and on[0] != "UNK" else None
            if name is None:
                why = "labelled UNK (unknown class)" if on == ["UNK"] else f"{len(on)} classes set"
                problems.add(path, key, rec.UNUSABLE_LABEL, f"one-hot row: {why}")
        if key not in raw:
            raw[key] = name
        elif raw[key] != name:
            msg = f"listed twice with different labels ({raw[key]}, {name}); label dropped"
            problems.add(path, key, rec.DUPLICATE_ID, msg)
            raw[key] = None
        else:
            problems.add(path, key, rec.DUPLICATE_ID, "listed twice", "warning")
    if classes is None:
        found = (
            [_class_name(h) for h in hot if h != "UNK"]
            if label_col is None
            else set(raw.values()) - {None}
        )
        classes = tuple(found) if label_col is None else _infer_classes(found)
    table: dict[str, str | None] = {}
    for key, name in raw.items():
        if name is not None and name not in classes:
            msg = f"class {name!r} is not one of {', '.join(classes)}"
            problems.add(path, key, UNKNOWN_CLASS, msg)
            name = None
        table[key] = name
    fmt = f"generic ({id_col}, {label_col or 'one-hot ' + '/'.join(classes)})"
    return LabelTable(path, fmt, table, {}, tuple(problems)), classes


# ----------------------------------------------------------------------------- reader


def read_generic(root, labels_csv=None, *, classes=None) -> ReadResult:
    """Read a folder of images, optional keep/ignore masks and a labels CSV (module docstring).

    Args:
        root: The folder.
        labels_csv: The labels CSV; default ``root/labels.csv``, or the only CSV in ``root``.
        classes: Class names in label-index order (default: those the CSV names).

    Images without a label, label rows without an image, duplicate ids and labels outside
    ``classes`` are errors; masks without an image and images without a mask (when some have
    one) are warnings. ``Record.source`` is ``"generic"``.
    """
    root = check_root(root)
    if labels_csv is not None and not isinstance(labels_csv, (str, os.PathLike)):
        raise TypeError(f"labels_csv must be a path, got {type(labels_csv).__name__}")
    problems = Problems()
    images, masks, ignore = _scan(root, problems)
    if not images:
        where = root / "images" if (root / "images").is_dir() else root
        problems.add(where, None, rec.MISSING_GROUND_TRUTH, "no JPEG or PNG image found")
    label_file = Path(labels_csv) if labels_csv is not None else _find_labels_csv(root, problems)
    labels: dict[str, str | None] = {}
    if label_file is not None:
        table, classes = read_generic_labels(label_file, classes)
        problems.extend(table.problems)
        labels = table.labels
    elif classes is not None:
        classes = tuple(classes)
    for found, what in ((masks, "mask"), (ignore, "ignore mask")):
        for key in sorted(found.keys() - images.keys()):
            msg = f"no image {key}.jpg/.png for this {what}"
            problems.add(found[key][0], key, rec.MASK_WITHOUT_IMAGE, msg, "warning")
    unmasked = sorted(images.keys() - masks.keys())
    if masks and unmasked:
        # Masks are optional here, so one line, not one per image.
        msg = f"{len(unmasked)} image(s) have no keep mask (e.g. {', '.join(unmasked[:3])})"
        problems.add(None, None, rec.IMAGE_WITHOUT_MASK, msg, "warning")
    records = []
    for key, image in images.items():
        if label_file is not None and key not in labels:
            problems.add(image, key, rec.IMAGE_WITHOUT_LABEL, f"no row for it in {label_file.name}")
        keep, drop = tuple(masks.get(key, ())), tuple(ignore.get(key, ()))
        records.append(Record(key, image, labels.get(key), keep, "generic", drop))
    for key in sorted(labels.keys() - images.keys()):
        problems.add(
            label_file, key, rec.LABEL_WITHOUT_IMAGE, f"no image file {key}.jpg/.jpeg/.png"
        )
    return ReadResult(
        tuple(records),
        tuple(classes or ()),
        tuple(problems),
        "generic",
        root,
        (label_file,) if label_file is not None else (),
        (("classes", tuple(classes or ())),),
    )


def with_ignore_folder(result: ReadResult, folder) -> ReadResult:
    """``result`` (any layout's) with the "must not matter" masks of ``folder`` added: a clinician's
    ignore strokes kept apart from the data set as downloaded (ISIC 2017 and the 25 patch masks of
    its artifact annotations, say). ``<id>.png`` or ``<id>_ignore.png`` (also ``_mask``,
    ``_segmentation``; JPEG too) joins the ignore masks of the image with that id (a union with
    the ones it has); the folder is recorded in ``result.options`` as ``ignore``.

    A mask whose id no image has is a warning naming its file; a file that is not an image, too.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: ``folder`` holds no mask, or none of its masks names an image of ``result``
            (the message gives examples of both kinds of id, the usual cause being a naming
            mismatch).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: ignore-mask folder does not exist")
    problems = Problems()
    found = _mask_files(folder, problems)
    if not found:
        raise ValueError(f"{folder}: no PNG or JPEG ignore mask in it")
    ids = {r.id for r in result.records}
    stray = sorted(found.keys() - ids)
    if len(stray) == len(found):
        raise ValueError(
            f"{folder}: none of its {len(found)} ignore mask(s) names an image of "
            f"{result.root} (masks: {', '.join(stray[:3])}; images: "
            f"{', '.join(sorted(ids)[:3]) or 'none'}); name each <id>.png after its image"
        )
    for key in stray:
        msg = f"no image {key} in {result.root} for this ignore mask"
        problems.add(found[key][0], key, rec.MASK_WITHOUT_IMAGE, msg, "warning")
    records = tuple(
        replace(r, ignore=r.ignore + tuple(found[r.id])) if r.id in found else r
        for r in result.records
    )
    return replace(
        result,
        records=records,
        problems=result.problems + tuple(problems),
        options=result.options + (("ignore", str(folder.resolve())),),
    )
