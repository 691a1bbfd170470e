"""Readers for the ISIC challenge data exactly as downloaded.

Three official layouts, each a row of :data:`feedbackcam.data.layouts.LAYOUTS` (which tells
them apart from the folder names):

* ``isic2019``: ``ISIC_2019_Training_Input/ISIC_*.jpg`` and ``ISIC_2019_Training_GroundTruth.csv``
  (one-hot ``MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK``); 8 classes, no masks.
* ``isic2018_task2``: ``ISIC2018_Task2_Training_Input/ISIC_*.jpg`` and
  ``ISIC2018_Task2_Training_GroundTruth_v3/ISIC_*_attribute_<name>.png``; the feedback mask is
  the union of the attribute masks. Task 2 has no labels: they are joined from a labels CSV
  (ISIC 2019 ground truth, ISIC 2017 Part 3, or an ISIC archive metadata CSV); classes
  ``NV, MEL, BKL``.
* ``isic2017``: ``ISIC-2017_{Training,Validation,Test_v2}_Data/ISIC_*.jpg`` with the Part 1
  lesion segmentations as feedback masks and the Part 3 CSVs as labels; classes ``NV, MEL, BKL``.

Ids are the canonical ``ISIC_xxxxxxx``: ISIC 2019's ``_downsampled`` suffix is dropped so that
``overlap_ids`` finds the same image across challenges. A reader never stops at the first bad
file (:mod:`feedbackcam.data.records`). Readers only list folders and parse CSVs;
`feedbackcam.data.check.check_dataset` also opens every file (decoding, mask sizes).
"""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from .records import (
    ATTRIBUTES,
    CLASSES_3,
    CLASSES_2019,
    DUPLICATE_ID,
    IMAGE_WITHOUT_LABEL,
    IMAGE_WITHOUT_MASK,
    LABEL_WITHOUT_IMAGE,
    MASK_WITHOUT_IMAGE,
    MISSING_ATTRIBUTE,
    MISSING_GROUND_TRUTH,
    UNEXPECTED_FILE,
    UNKNOWN_LABEL_FORMAT,
    UNMAPPED_DIAGNOSIS,
    UNUSABLE_LABEL,
    LabelTable,
    Problems,
    ReadResult,
    Record,
    check_root,
    read_csv,
)

__all__ = [
    "ISIC2017_SPLITS",
    "looks_isic2017",
    "looks_isic2018_task2",
    "looks_isic2019",
    "overlap_ids",
    "read_isic2017",
    "read_isic2018_task2",
    "read_isic2019",
    "read_labels_csv",
]

ISIC2017_SPLITS = ("Training", "Validation", "Test_v2")
MISSING_ATTRIBUTE_MODES = ("error", "empty")

_INPUT_2019 = "ISIC_2019_Training_Input"
_GT_2019 = "ISIC_2019_Training_GroundTruth.csv"
_INPUT_T2 = "ISIC2018_Task2_Training_Input"
_GT_T2 = "ISIC2018_Task2_Training_GroundTruth_v3"
_ID = re.compile(r"^(ISIC_\d{7})(?:_downsampled)?$")
_ATTRIBUTE_FILE = re.compile(r"^(ISIC_\d{7})_attribute_(\w+)\.png$")
_SEGMENTATION_FILE = re.compile(r"^(ISIC_\d{7})_segmentation\.png$")
_JPEG = (".jpg", ".jpeg")

# How ISIC 2019 grouped the archive's diagnoses into the three classes Task 2 images belong to.
_DIAGNOSIS_CLASS = {
    "nevus": "NV",
    "melanoma": "MEL",
    "seborrheic keratosis": "BKL",
    "solar lentigo": "BKL",
    "lichen planus like keratosis": "BKL",
    "lichenoid keratosis": "BKL",  # the archive's name for lichen planus-like keratosis
    "pigmented benign keratosis": "BKL",
}
_LABEL_FORMATS = {
    "isic2019": "image + one-hot MEL,NV,BCC,AK,BKL,DF,VASC,SCC[,UNK] (ISIC 2019 ground truth)",
    "isic2017": "image_id,melanoma,seborrheic_keratosis (ISIC 2017 Part 3 ground truth)",
    "archive": "isic_id,diagnosis (ISIC archive metadata, as `isic metadata download` writes)",
}


# ----------------------------------------------------------------------------- helpers


def _canonical_id(name: str) -> str | None:
    m = _ID.match(name)
    return m.group(1) if m else None


def _list_images(folder: Path, problems: Problems) -> dict[str, Path]:
    """ISIC id -> JPEG in ``folder``; other files (licences, superpixels) are not images."""
    images: dict[str, Path] = {}
    if not folder.is_dir():
        problems.add(folder, None, MISSING_GROUND_TRUTH, "image folder missing")
        return images
    for path in sorted(folder.iterdir()):
        # Hidden files (".DS_Store", macOS "._ISIC_..." forks) are archive debris, not data.
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in _JPEG:
            continue
        key = _canonical_id(path.stem)
        if key is None:
            problems.add(path, None, UNEXPECTED_FILE, "JPEG not named ISIC_<7 digits>", "warning")
        elif key in images:
            problems.add(path, key, DUPLICATE_ID, f"same id as {images[key].name}; both left out")
        else:
            images[key] = path
    return images


def _flag(value: str) -> bool:
    return float(value) >= 0.5


def _join(images, labels, masks, source, label_file, problems, *, orphans=True, reasons=None):
    """Records for ``images``, reporting images without a label and (if ``orphans``) label
    rows without an image."""
    reasons = reasons or {}
    records = []
    for key, image in images.items():
        if key not in labels:
            why = f"no row for it in {label_file.name}" if label_file else "no labels CSV given"
            problems.add(image, key, IMAGE_WITHOUT_LABEL, why)
        elif labels[key] is None and key in reasons:
            problems.add(image, key, IMAGE_WITHOUT_LABEL, reasons[key])
        records.append(Record(key, image, labels.get(key), masks.get(key, ()), source))
    if orphans:
        for key in sorted(set(labels) - set(images)):
            problems.add(label_file, key, LABEL_WITHOUT_IMAGE, f"no image file {key}.jpg")
    return records


# ----------------------------------------------------------------------------- labels CSV


def _diagnosis_class(text: str) -> str | None:
    d = " ".join(re.sub(r"[-_]", " ", text.lower()).split())
    if d in _DIAGNOSIS_CLASS:
        return _DIAGNOSIS_CLASS[d]
    # The archive's newer vocabulary ("Melanoma, NOS", "Melanoma in situ") in diagnosis_3.
    return "MEL" if d.startswith("melanoma") else None


def _label_format(cols: set[str]) -> str | None:
    if {"image", "MEL", "NV", "BKL"} <= cols:
        return "isic2019"
    if {"image_id", "melanoma", "seborrheic_keratosis"} <= cols:
        return "isic2017"
    if "isic_id" in cols and {"diagnosis", "diagnosis_3"} & cols:
        return "archive"
    return None


def _row_label(fmt: str, row: dict[str, str], header: list[str], classes: tuple[str, ...]):
    """(class or None, why not, unmapped group) for one labels-CSV row; a row with a group has
    a valid class or diagnosis outside ``classes``, reported once per group."""
    if fmt == "isic2019":
        cols = [c for c in (*CLASSES_2019, "UNK") if c in header]
        try:
            hot = [c for c in cols if row.get(c) and _flag(row[c])]
        except ValueError:
            return None, f"non-numeric one-hot value in {[row.get(c) for c in cols]}", None
        if hot == ["UNK"]:
            return None, "labelled UNK (unknown class)", None
        if len(hot) != 1:
            return None, f"one-hot row has {len(hot)} classes set ({', '.join(hot)})", None
        if hot[0] not in classes:
            return None, f"class {hot[0]} is not one of {classes}", f"class {hot[0]}"
        return hot[0], "", None
    if fmt == "isic2017":
        try:
            mel, sk = _flag(row["melanoma"]), _flag(row["seborrheic_keratosis"])
        except ValueError:
            return None, "non-numeric melanoma/seborrheic_keratosis value", None
        if mel and sk:
            return None, "flagged both melanoma and seborrheic keratosis", None
        return ("MEL" if mel else "BKL" if sk else "NV"), "", None
    dx = row.get("diagnosis" if "diagnosis" in header else "diagnosis_3", "")
    name = _diagnosis_class(dx)
    if name is None:
        group = f"diagnosis {dx!r}" if dx else "empty diagnosis"
        return None, f"diagnosis {dx!r} maps to none of {classes}", group
    return name, "", None


def _parse_labels(path: Path, classes: tuple[str, ...], formats: Sequence[str]) -> LabelTable:
    problems = Problems()
    try:
        header, rows = read_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problems.add(path, None, UNKNOWN_LABEL_FORMAT, f"cannot read CSV: {exc}")
        return LabelTable(path, None, {}, {}, tuple(problems))
    fmt = _label_format(set(header))
    if fmt not in formats:
        expected = "; ".join(_LABEL_FORMATS[f] for f in formats)
        msg = f"header {header[:8]} matches no accepted labels format; expected: {expected}"
        problems.add(path, None, UNKNOWN_LABEL_FORMAT, msg)
        return LabelTable(path, None, {}, {}, tuple(problems))
    id_col = {"isic2019": "image", "isic2017": "image_id", "archive": "isic_id"}[fmt]
    table: dict[str, str | None] = {}
    reasons: dict[str, str] = {}
    unmapped: defaultdict[str, list[str]] = defaultdict(list)
    for row in rows:
        key = _canonical_id(row.get(id_col, ""))
        if key is None:
            problems.add(path, None, UNUSABLE_LABEL, f"bad id {row.get(id_col)!r}")
            continue
        name, reason, group = _row_label(fmt, row, header, classes)
        if group is not None:
            unmapped[group].append(key)
        elif name is None:
            problems.add(path, key, UNUSABLE_LABEL, reason)
        if key not in table:
            table[key] = name
            if reason:
                reasons[key] = reason
        elif table[key] != name:
            msg = f"listed twice with different labels ({table[key]}, {name}); label dropped"
            problems.add(path, key, DUPLICATE_ID, msg)
            table[key], reasons[key] = None, "conflicting duplicate rows"
        else:
            problems.add(path, key, DUPLICATE_ID, "listed twice", "warning")
    for what, keys in sorted(unmapped.items(), key=lambda kv: -len(kv[1])):
        msg = f"{what}: {len(keys)} rows not in {'/'.join(classes)} (e.g. {', '.join(keys[:3])})"
        problems.add(path, None, UNMAPPED_DIAGNOSIS, msg, "warning")
    return LabelTable(path, fmt, table, reasons, tuple(problems))


def _ground_truth(
    path: Path, classes: tuple[str, ...], fmt: str, problems: Problems, missing: str
) -> dict[str, str | None]:
    """id -> class of a layout's own ground-truth CSV (format ``fmt``); its problems, or
    ``missing`` if there is no such file, added to ``problems``."""
    if not path.is_file():
        problems.add(path, None, MISSING_GROUND_TRUTH, missing)
        return {}
    table = _parse_labels(path, classes, (fmt,))
    problems.extend(table.problems)
    return table.labels


def read_labels_csv(path) -> LabelTable:
    """Read a labels CSV for ISIC 2018 Task 2, detecting its format from the header.

    Formats: ISIC 2019 ground truth (``image`` + one-hot columns), ISIC 2017 Part 3
    (``image_id,melanoma,seborrheic_keratosis``; neither = NV, SK -> BKL) or ISIC archive
    metadata (``isic_id`` + ``diagnosis``, or ``diagnosis_3`` in the archive's newer exports;
    nevus -> NV, melanoma -> MEL, seborrheic keratosis / solar lentigo / lichen planus-like
    keratosis / pigmented benign keratosis -> BKL). Rows of other classes or diagnoses are
    reported once per class/diagnosis with their count; an unknown header is reported too.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"labels_csv must be a path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: labels CSV does not exist")
    return _parse_labels(path, CLASSES_3, tuple(_LABEL_FORMATS))


# ----------------------------------------------------------------------------- readers


def looks_isic2019(root: Path) -> bool:
    """``root`` holds the ISIC 2019 training input folder or its ground-truth CSV."""
    return (root / _INPUT_2019).is_dir() or (root / _GT_2019).is_file()


def looks_isic2018_task2(root: Path) -> bool:
    """``root`` holds the ISIC 2018 Task 2 input or ground-truth folder."""
    return (root / _INPUT_T2).is_dir() or (root / _GT_T2).is_dir()


def looks_isic2017(root: Path) -> bool:
    """``root`` holds an ISIC 2017 ``..._Data`` folder of any split."""
    return any((root / f"ISIC-2017_{s}_Data").is_dir() for s in ISIC2017_SPLITS)


# What each layout expects, for the message of a folder that matches none.
EXPECTED_2019 = f"{_INPUT_2019}/ISIC_*.jpg + {_GT_2019}"
EXPECTED_T2 = f"{_INPUT_T2}/ISIC_*.jpg + {_GT_T2}/ISIC_*_attribute_*.png"
EXPECTED_2017 = (
    "ISIC-2017_{Training,Validation,Test_v2}_Data/ISIC_*.jpg + ..._Part1_GroundTruth/ + "
    "..._Part3_GroundTruth.csv"
)


def read_isic2019(root) -> ReadResult:
    """Read the ISIC 2019 training layout (8 classes, no masks; UNK rows are reported)."""
    root = check_root(root)
    problems = Problems()
    folder, gt = root / _INPUT_2019, root / _GT_2019
    images = _list_images(folder, problems)
    labels = _ground_truth(gt, CLASSES_2019, "isic2019", problems, "ground-truth CSV missing")
    records = _join(images, labels, {}, "isic2019", gt, problems, orphans=folder.is_dir())
    return ReadResult(tuple(records), CLASSES_2019, tuple(problems), "isic2019", root, (gt,))


def _check_attributes(attributes) -> tuple[str, ...]:
    attributes = (attributes,) if isinstance(attributes, str) else tuple(attributes)
    bad = [a for a in attributes if a not in ATTRIBUTES]
    if not attributes or bad:
        raise ValueError(f"attributes must be a non-empty subset of {ATTRIBUTES}, got {bad or ()}")
    return tuple(a for a in ATTRIBUTES if a in attributes)


def read_isic2018_task2(
    root, labels_csv=None, *, attributes: Sequence[str] = ATTRIBUTES, missing_attribute="error"
) -> ReadResult:
    """Read the ISIC 2018 Task 2 training layout, labels joined from ``labels_csv``.

    Args:
        root: Folder holding ``ISIC2018_Task2_Training_Input`` and ``..._GroundTruth_v3``.
        labels_csv: A labels CSV in any format `read_labels_csv` knows; without one every
            image is reported as unlabelled.
        attributes: The attribute masks whose union is the feedback mask.
        missing_attribute: ``"error"``: a missing attribute file is an error (the image is left
            out of a prepared set); ``"empty"``: it counts as an empty mask (warning).
    """
    root = check_root(root)
    attributes = _check_attributes(attributes)
    if missing_attribute not in MISSING_ATTRIBUTE_MODES:
        raise ValueError(
            f"missing_attribute must be one of {MISSING_ATTRIBUTE_MODES}, got {missing_attribute!r}"
        )
    severity = "error" if missing_attribute == "error" else "warning"
    problems = Problems()
    gt = root / _GT_T2
    images = _list_images(root / _INPUT_T2, problems)
    found: defaultdict[str, dict[str, Path]] = defaultdict(dict)
    if gt.is_dir():
        for path in sorted(gt.iterdir()):
            m = _ATTRIBUTE_FILE.match(path.name)
            if m and m.group(2) in ATTRIBUTES:
                found[m.group(1)][m.group(2)] = path
            elif not path.name.startswith(".") and path.suffix.lower() == ".png":
                problems.add(path, None, UNEXPECTED_FILE, "not an attribute mask", "warning")
    else:
        problems.add(gt, None, MISSING_GROUND_TRUTH, "attribute mask folder missing", severity)
    masks: dict[str, tuple[Path, ...]] = {}
    for key, image in images.items():
        have = found.get(key, {})
        for a in attributes:
            if a not in have:
                expected = gt / f"{key}_attribute_{a}.png"
                problems.add(expected, key, MISSING_ATTRIBUTE, f"{a} mask missing", severity)
        masks[key] = tuple(have[a] for a in attributes if a in have)
        if not masks[key]:
            problems.add(image, key, IMAGE_WITHOUT_MASK, "no attribute mask file", "warning")
    for key in sorted(set(found) - set(images)):
        first = next(iter(found[key].values()))
        problems.add(first, key, MASK_WITHOUT_IMAGE, f"no image {key}.jpg", "warning")

    if labels_csv is None:
        msg = "Task 2 has no labels and no labels CSV was given; pass one in any of: "
        problems.add(None, None, MISSING_GROUND_TRUTH, msg + "; ".join(_LABEL_FORMATS.values()))
        table = LabelTable(Path(), None, {}, {}, ())
    else:
        table = read_labels_csv(labels_csv)
        problems.extend(table.problems)
    label_file = table.path if labels_csv is not None else None
    # The labels CSV usually covers far more images than Task 2 (ISIC 2019: 25,331), so rows
    # without an image here are expected, not a problem.
    records = _join(
        images,
        table.labels,
        masks,
        "isic2018_task2",
        label_file,
        problems,
        orphans=False,
        reasons=table.reasons,
    )
    options = (("attributes", attributes), ("missing_attribute", missing_attribute))
    return ReadResult(
        tuple(records),
        CLASSES_3,
        tuple(problems),
        "isic2018_task2",
        root,
        (label_file,) if label_file else (),
        options,
    )


def read_isic2017(root, *, splits: Sequence[str] = ISIC2017_SPLITS) -> ReadResult:
    """Read whichever ISIC 2017 splits exist under ``root`` (lesion masks, classes NV/MEL/BKL).

    ``Record.source`` is ``isic2017_training``, ``isic2017_validation`` or ``isic2017_test_v2``.
    """
    root = check_root(root)
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    bad = [s for s in splits if s not in ISIC2017_SPLITS]
    if not splits or bad:
        raise ValueError(f"splits must be a non-empty subset of {ISIC2017_SPLITS}, got {bad}")
    present = [s for s in splits if (root / f"ISIC-2017_{s}_Data").is_dir()]
    if not present:
        expected = [f"ISIC-2017_{s}_Data" for s in splits]
        raise ValueError(f"{root}: none of the ISIC 2017 folders {expected} exists")
    problems = Problems()
    records: list[Record] = []
    label_files = []
    seen: dict[str, Path] = {}
    for split in present:
        prefix = f"ISIC-2017_{split}"
        images = _list_images(root / f"{prefix}_Data", problems)
        for key in [k for k in images if k in seen]:
            msg = f"also in {seen[key].parent.name}; both left out"
            problems.add(images.pop(key), key, DUPLICATE_ID, msg)
        seen.update(images)
        gt_csv = root / f"{prefix}_Part3_GroundTruth.csv"
        label_files.append(gt_csv)
        labels = _ground_truth(gt_csv, CLASSES_3, "isic2017", problems, "Part 3 CSV missing")
        mask_dir = root / f"{prefix}_Part1_GroundTruth"
        masks: dict[str, tuple[Path, ...]] = {}
        if mask_dir.is_dir():
            for path in sorted(mask_dir.iterdir()):
                m = _SEGMENTATION_FILE.match(path.name)
                if m:
                    masks[m.group(1)] = (path,)
            for key in images.keys() - masks.keys():
                msg = f"no {key}_segmentation.png"
                problems.add(images[key], key, IMAGE_WITHOUT_MASK, msg, "warning")
            for key in sorted(masks.keys() - images.keys()):
                msg = f"no image {key}.jpg"
                problems.add(masks[key][0], key, MASK_WITHOUT_IMAGE, msg, "warning")
        else:
            msg = "Part 1 mask folder missing"
            problems.add(mask_dir, None, MISSING_GROUND_TRUTH, msg, "warning")
        source = f"isic2017_{split.lower()}"
        records += _join(images, labels, masks, source, gt_csv, problems)
    return ReadResult(
        tuple(records),
        CLASSES_3,
        tuple(problems),
        "isic2017",
        root,
        tuple(label_files),
        (("splits", splits),),
    )


def overlap_ids(a_records: Iterable[Record], b_records: Iterable[Record]) -> set[str]:
    """Ids present in both record collections (e.g. Task 2 images inside ISIC 2019)."""
    ids = []
    for name, records in (("a_records", a_records), ("b_records", b_records)):
        if isinstance(records, ReadResult):
            records = records.records
        records = list(records)
        if not all(isinstance(r, Record) for r in records):
            raise TypeError(f"{name} must hold Record objects")
        ids.append({r.id for r in records})
    return ids[0] & ids[1]
