"""What every dataset reader returns, and what readers share: records, problems, and the
label table of a CSV.

A reader (one module per layout: :mod:`~feedbackcam.data.isic` for the ISIC challenge layouts,
:mod:`~feedbackcam.data.generic` for any folder of images and a CSV) never stops at the first bad
file: it returns every :class:`Record` it could build and a :class:`Problem` for everything it
could not use, so nothing is dropped silently. :mod:`~feedbackcam.data.layouts` is the table of
layouts that ties readers to folder names.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# The classes of ISIC 2019 (8, without UNK) and of the three-class ISIC 2017 / 2018 Task 2 sets.
CLASSES_2019 = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
CLASSES_3 = ("NV", "MEL", "BKL")
# ISIC 2018 Task 2's dermoscopic attributes (its feedback masks; SynthDerm draws the same five).
ATTRIBUTES = ("globules", "milia_like_cyst", "negative_network", "pigment_network", "streaks")

# Problem kinds.
IMAGE_WITHOUT_LABEL = "image without label"
LABEL_WITHOUT_IMAGE = "label without image"
IMAGE_WITHOUT_MASK = "image without mask"
MASK_WITHOUT_IMAGE = "mask without image"
MISSING_ATTRIBUTE = "missing attribute file"
MISSING_GROUND_TRUTH = "missing ground truth"
MASK_SIZE_MISMATCH = "mask size differs from its image"
UNREADABLE_IMAGE = "unreadable image"
UNREADABLE_MASK = "unreadable mask"
UNUSABLE_LABEL = "unusable label"
UNMAPPED_DIAGNOSIS = "unmapped diagnosis"
UNKNOWN_LABEL_FORMAT = "unknown label CSV format"
DUPLICATE_ID = "duplicate id"
UNEXPECTED_FILE = "unexpected file"
CONFLICTING_LABELS = "the same image with another label"


@dataclass(frozen=True)
class Record:
    """One image: canonical id, image file, class name (None if unknown), the mask files whose
    union is its feedback mask (empty: no mask), where it came from, and the files whose union
    marks what must not matter (``ignore``: the generic layout's ``ignore/``, or a folder given
    with any layout, `feedbackcam.data.generic.with_ignore_folder`)."""

    id: str
    image: Path
    label: str | None
    masks: tuple[Path, ...]
    source: str
    ignore: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Problem:
    """Something a reader or check could not use. ``severity`` is ``"error"`` (the image is left
    out of a prepared set) or ``"warning"`` (it is kept)."""

    path: Path | None
    id: str | None
    kind: str
    message: str
    severity: str = "error"

    def __post_init__(self) -> None:
        if self.severity not in ("error", "warning"):
            raise ValueError(f"severity must be 'error' or 'warning', got {self.severity!r}")


@dataclass(frozen=True)
class ReadResult:
    """What a reader found: records (one per image file, labelled or not), the class names,
    problems, the layout, and the reader options and label files that shaped the result."""

    records: tuple[Record, ...]
    classes: tuple[str, ...]
    problems: tuple[Problem, ...]
    layout: str
    root: Path
    label_files: tuple[Path, ...] = ()
    options: tuple[tuple[str, object], ...] = ()

    def usable(self, problems: Iterable[Problem] = ()) -> tuple[Record, ...]:
        """Records with a label and no error-level problem (in ``self.problems`` or
        ``problems``): the ones a prepared set keeps."""
        bad = {p.id for p in (*self.problems, *problems) if p.severity == "error"}
        return tuple(r for r in self.records if r.label is not None and r.id not in bad)


@dataclass(frozen=True)
class LabelTable:
    """A labels CSV for Task 2: its detected format, id -> class (None: no usable class) and
    why a row has no class."""

    path: Path
    format: str | None
    labels: dict[str, str | None]
    reasons: dict[str, str]
    problems: tuple[Problem, ...]


# ----------------------------------------------------------------------------- helpers


class Problems(list):
    """Problems collected while reading; ``add`` keeps each report on one line."""

    def add(self, path, id, kind, message, severity="error") -> None:
        self.append(Problem(path, id, kind, message, severity))


def check_root(root) -> Path:
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path, got {type(root).__name__}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder does not exist")
    return root


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    # utf-8-sig: CSVs saved by Excel start with a byte-order mark that would rename column 1.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        return header, [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]
