"""The dataset layouts feedbackcam reads, one row each: how to recognise a folder of that layout,
its reader, and the reader options it takes.

Adding a layout is one reader module (returning a :class:`~feedbackcam.data.records.ReadResult`)
plus one row of :data:`LAYOUTS`; ``feedbackcam data check|prepare --layout`` and
:func:`read_dataset` then know it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import generic, isic
from .records import ReadResult, check_root


@dataclass(frozen=True)
class Layout:
    """One dataset layout.

    Attributes:
        name: what ``--layout`` and ``ReadResult.layout`` call it.
        reader: ``reader(root, [labels_csv,] **options) -> ReadResult``.
        options: the reader's keyword options (``feedbackcam data`` refuses the others).
        labels_csv: the reader takes a labels CSV as its second argument.
        looks_like: ``looks_like(root) -> bool``, from the folder's names alone.
        expected: one line for the message of a folder no layout matches.
        fallback: only tried when no other layout matches (a generic folder of images).
    """

    name: str
    reader: Callable[..., ReadResult]
    options: tuple[str, ...]
    labels_csv: bool
    looks_like: Callable[[Path], bool]
    expected: str
    fallback: bool = False


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("isic2019", isic.read_isic2019, (), False, isic.looks_isic2019, isic.EXPECTED_2019),
        Layout(
            "isic2018_task2",
            isic.read_isic2018_task2,
            ("attributes", "missing_attribute"),
            True,
            isic.looks_isic2018_task2,
            isic.EXPECTED_T2,
        ),
        Layout(
            "isic2017",
            isic.read_isic2017,
            ("splits",),
            False,
            isic.looks_isic2017,
            isic.EXPECTED_2017,
        ),
        Layout(
            "generic",
            generic.read_generic,
            ("classes",),
            True,
            generic.looks_generic,
            "images/<id>.jpg|png (or images beside a CSV) + labels.csv "
            "[+ masks/<id>.png, ignore/<id>.png]",
            fallback=True,
        ),
    )
}


def get_layout(name: str) -> Layout:
    """The row of :data:`LAYOUTS` called ``name``; ``ValueError`` naming the known ones."""
    if name not in LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {name!r}")
    return LAYOUTS[name]


def detect_layout(root) -> str:
    """Which layout ``root`` holds, from its folder names: the one specific layout that matches
    (``"isic2019"``, ``"isic2018_task2"``, ``"isic2017"``), else a fallback (``"generic"``: an
    ``images/`` folder or image files beside a CSV; see `feedbackcam.data.generic`).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no layout (or more than one) matches; the message lists what is expected.
    """
    root = check_root(root)
    specific = [r for r in LAYOUTS.values() if not r.fallback]
    found = [r.name for r in specific if r.looks_like(root)]
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"{root}: holds several ISIC layouts {found}; pass layout= explicitly")
    for row in LAYOUTS.values():
        if row.fallback and row.looks_like(root):
            return row.name
    entries = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    width = max(len(name) for name in LAYOUTS) + 1
    expected = "".join(f"  {name + ':':<{width}} {r.expected}\n" for name, r in LAYOUTS.items())
    raise ValueError(
        f"{root}: no known layout. Expected one of:\n{expected}"
        f"found: {entries[:10]}{' ...' if len(entries) > 10 else ''}"
    )


def read_dataset(
    root, labels_csv=None, *, layout: str | None = None, ignore=None, **options
) -> ReadResult:
    """Detect the layout of ``root`` (unless given) and read it with its reader.

    ``options`` go to that reader (:attr:`Layout.options`: ``attributes``/``missing_attribute``
    for isic2018_task2, ``splits`` for isic2017, ``classes`` for generic). ``labels_csv``
    applies to the layouts whose reader takes one (isic2018_task2 and generic). ``ignore``: a
    folder of "must not matter" masks named by image id, for any layout
    (`feedbackcam.data.generic.with_ignore_folder`).
    """
    result = _read_layout(root, labels_csv, layout, options)
    return result if ignore is None else generic.with_ignore_folder(result, ignore)


def _read_layout(root, labels_csv, layout: str | None, options: dict) -> ReadResult:
    row = get_layout(detect_layout(root) if layout is None else layout)
    unknown = sorted(set(options) - set(row.options))
    if unknown:
        raise TypeError(
            f"options {unknown} do not apply to layout {row.name} "
            f"(it accepts {list(row.options) or 'none'})"
        )
    if row.labels_csv:
        return row.reader(root, labels_csv, **options)
    takes = [r.name for r in LAYOUTS.values() if r.labels_csv]
    if labels_csv is not None:
        raise ValueError(
            f"labels_csv only applies to {' and '.join(takes)}; {row.name} has its own labels"
        )
    return row.reader(root, **options)
