"""Your own data: a folder of images with any ids, optional masks and a labels CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_isic import kinds, png_mask, truncate, write_csv

from feedbackcam.checkpoint import ModelSpec, save_checkpoint
from feedbackcam.cli import main
from feedbackcam.data.check import check_dataset
from feedbackcam.data.generic import UNKNOWN_CLASS, read_generic, read_generic_labels
from feedbackcam.data.layouts import detect_layout, read_dataset
from feedbackcam.data.prepared import load_prepared, load_prepared_ignore, prepare
from feedbackcam.data.records import (
    DUPLICATE_ID,
    IMAGE_WITHOUT_LABEL,
    LABEL_WITHOUT_IMAGE,
    MASK_SIZE_MISMATCH,
    UNREADABLE_IMAGE,
)
from feedbackcam.models import build_model

W, H = 24, 18  # not square: the readers must not assume it
CLASSES = ("NV", "MEL", "BKL")


def gid(i: int) -> str:
    return f"IMD{i:03d}"


def image(path: Path, seed: int, size=(W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def make_generic(root: Path, n: int = 24, *, export: bool = False, masked=None) -> Path:
    """``n`` images IMD001... (PNG and JPEG alternating), classes cycling NV, MEL, BKL, keep
    masks for ``masked`` ids (default: all but the last); ``export`` writes the app's export
    (extra CSV columns, ``ignore/`` masks for every third image)."""
    masked = range(1, n) if masked is None else masked
    rows = []
    for i in range(1, n + 1):
        suffix = ".png" if export or i % 2 else ".jpg"
        image(root / "images" / f"{gid(i)}{suffix}", seed=i)
        if i in masked:
            png_mask(root / "masks" / f"{gid(i)}.png", size=(W, H), box=(4, 3, 14, 12))
        if export and i % 3 == 0:
            png_mask(root / "ignore" / f"{gid(i)}.png", size=(W, H), box=(16, 0, 24, 6))
        label = CLASSES[i % 3]
        rows.append(
            [gid(i), label, "ana", "2026-11-28T08:00:00Z", "v3"] if export else [gid(i), label]
        )
    header = ["id", "label", "user", "created_at", "model_version"] if export else ["id", "label"]
    write_csv(root / "labels.csv", header, rows)
    return root


@pytest.fixture
def generic(tmp_path):
    return make_generic(tmp_path / "clinic")


@pytest.fixture
def generic_prepared(tmp_path, generic):
    """A prepared folder from the generic layout (24 images, 16 px), reusable by other tests."""
    return prepare(generic, tmp_path / "clinic-prepared", size=16, progress=False)


# ----------------------------------------------------------------------------- reading


def test_generic_layout_is_detected_and_read_with_any_ids(generic):
    assert detect_layout(generic) == "generic"
    result = read_dataset(generic)
    assert result.layout == "generic" and result.classes == CLASSES
    assert [r.id for r in result.records] == [gid(i) for i in range(1, 25)]
    assert {r.image.suffix for r in result.records} == {".png", ".jpg"}
    assert all(r.label == CLASSES[int(r.id[3:]) % 3] for r in result.records)
    assert [bool(r.masks) for r in result.records] == [True] * 23 + [False]
    assert len(result.usable()) == 24
    assert not [p for p in result.problems if p.severity == "error"]


def test_flat_folder_with_suffixed_masks_and_one_hot_labels(tmp_path):
    root = tmp_path / "flat"
    for i in (1, 2, 3):
        image(root / f"{gid(i)}.jpeg", seed=i)
        png_mask(root / f"{gid(i)}_segmentation.png", size=(W, H), box=(0, 0, 5, 5))
    png_mask(root / f"{gid(1)}_ignore.png", size=(W, H), box=(10, 10, 12, 12))
    write_csv(
        root / "gt.csv",
        ["image", "MEL", "NV", "UNK"],
        [[f"{gid(1)}.jpeg", 1, 0, 0], [gid(2), 0.0, 1.0, 0.0], [gid(3), 0, 0, 1]],
    )
    result = read_dataset(root)
    assert result.layout == "generic" and result.classes == ("MEL", "NV")
    by_id = {r.id: r for r in result.records}
    assert (by_id[gid(1)].label, by_id[gid(2)].label, by_id[gid(3)].label) == ("MEL", "NV", None)
    assert by_id[gid(1)].ignore and not by_id[gid(2)].ignore
    assert all(len(r.masks) == 1 for r in result.records)
    assert [r.id for r in result.usable()] == [gid(1), gid(2)]
    assert "UNK" in kinds(result.problems, "unusable label")[0].message


def test_images_in_subfolders_and_lower_case_isic_classes_as_ham10000_unzips(tmp_path):
    root = tmp_path / "ham"
    rows = []
    for i, dx in enumerate(["nv", "mel", "bkl", "nv", "akiec", "mel"]):
        part = "HAM10000_images_part_1" if i < 3 else "HAM10000_images_part_2"
        image(root / part / f"ISIC_{24306 + i:07d}.jpg", seed=i)
        rows.append([f"HAM_{i:07d}", f"ISIC_{24306 + i:07d}", dx, "histo", "45.0"])
    header = ["lesion_id", "image_id", "dx", "dx_type", "age"]
    write_csv(root / "HAM10000_metadata.csv", header, rows)
    result = read_dataset(root)
    assert result.layout == "generic" and result.classes == ("MEL", "NV", "AK", "BKL")
    assert len(result.usable()) == 6 and result.records[3].image.parent.name.endswith("part_2")
    result = read_dataset(root, classes=("nv", "mel", "bkl"))
    assert result.classes == ("NV", "MEL", "BKL") and len(result.usable()) == 5
    assert [p.id for p in kinds(result.problems, UNKNOWN_CLASS)] == ["ISIC_0024310"]


def test_the_apps_export_is_read_with_its_ignore_masks(tmp_path):
    root = make_generic(tmp_path / "export", n=9, export=True)
    result = read_dataset(root)
    assert result.classes == CLASSES and len(result.usable()) == 9
    assert [r.id for r in result.records if r.ignore] == [gid(3), gid(6), gid(9)]
    out = prepare(root, tmp_path / "p", size=12, progress=False)
    data = load_prepared(out)
    ignore, has_ignore = load_prepared_ignore(out)
    assert ignore.shape == data.masks.shape and ignore.max() == 1
    assert [data.ids[i] for i in np.flatnonzero(has_ignore)] == [gid(3), gid(6), gid(9)]
    # The ignore box is the top right corner, the keep box the upper left: apart.
    assert not (ignore.astype(bool) & data.masks.astype(bool)).any()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["ignore"] is True and meta["counts"]["with_ignore"] == 3
    assert (out / "meta.json").read_text().endswith("\n")
    (out / "ignore.npy").unlink()  # an incomplete folder is rebuilt, not taken as up to date
    assert prepare(root, out, size=12, progress=False) == out and (out / "ignore.npy").is_file()
    ckpt = save_checkpoint(
        tmp_path / "m.pt",
        build_model("small_cnn", 3, width=4),
        ModelSpec("small_cnn", CLASSES, ("features.relu4",), 12, {"width": 4}),
    )
    ev = tmp_path / "eval"
    assert main(["evaluate", "--model", str(ckpt), "--data", str(out), "--out", str(ev)]) == 0
    with open(ev / "predictions.csv", newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert all(rows[gid(i)]["ignore_share"] == "" for i in (1, 2, 4, 5, 7, 8))


def test_a_folder_without_ignore_masks_has_none(generic_prepared):
    assert load_prepared_ignore(generic_prepared) is None
    assert not (generic_prepared / "ignore.npy").exists()
    assert len(load_prepared(generic_prepared)) == 24


# ----------------------------------------------------------------------------- problems


def test_problems_are_listed_with_their_files(generic):
    png_mask(generic / "masks" / f"{gid(2)}.png", size=(W + 2, H), box=(0, 0, 4, 4))
    truncate(generic / "images" / f"{gid(4)}.jpg")
    (generic / "images" / f"{gid(5)}.png").unlink()  # its CSV row stays: a label without image
    image(generic / "images" / "IMD999.png", seed=9)  # an image without a label
    image(generic / "images" / f"{gid(7)}.jpg", seed=7)  # IMD007.png exists: duplicate id
    report = check_dataset(generic)
    names = {p.kind: p for p in report.errors}
    assert names[MASK_SIZE_MISMATCH].path.name == f"{gid(2)}.png"
    assert names[UNREADABLE_IMAGE].path.name == f"{gid(4)}.jpg"
    assert names[LABEL_WITHOUT_IMAGE].id == gid(5)
    assert names[LABEL_WITHOUT_IMAGE].path.name == "labels.csv"
    assert names[IMAGE_WITHOUT_LABEL].path.name == "IMD999.png"
    assert "labels.csv" in names[IMAGE_WITHOUT_LABEL].message
    assert names[DUPLICATE_ID].id == gid(7)
    assert report.n_usable == 24 - 4  # IMD002, 004, 007 and the unlabelled IMD999 out
    assert report.n_images == 24  # 23 original ones left + IMD999


def test_data_check_cli_fails_and_prepare_lists_the_excluded(generic, tmp_path, capsys):
    png_mask(generic / "masks" / f"{gid(2)}.png", size=(W + 2, H), box=(0, 0, 4, 4))
    image(generic / "images" / "IMD999.png", seed=9)
    assert main(["data", "check", str(generic)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and f"{gid(2)}.png" in out and "IMD999.png" in out
    assert (
        main(["data", "prepare", str(generic), "--size", "12", "--out", str(tmp_path / "p")]) == 0
    )
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["counts"]["images"] == 23 and meta["counts"]["excluded_ids"] == [gid(2), "IMD999"]


def test_unknown_classes_and_unreadable_labels(tmp_path, generic):
    table, classes = read_generic_labels(generic / "labels.csv", classes=("NV", "MEL"))
    assert classes == ("NV", "MEL")
    unknown = kinds(table.problems, UNKNOWN_CLASS)
    assert len(unknown) == 8 and all(p.path.name == "labels.csv" for p in unknown)
    assert "'BKL'" in unknown[0].message
    result = read_generic(generic, classes=("NV", "MEL"))
    assert len(result.usable()) == 16
    bad = write_csv(tmp_path / "bad.csv", ["name", "age"], [["IMD001", "40"]])
    result = read_generic(generic, bad)
    assert kinds(result.problems, "unknown label CSV format")[0].path == bad
    assert not result.usable()
    (generic / "labels.csv").unlink()
    write_csv(generic / "a.csv", ["id", "label"], [])
    write_csv(generic / "b.csv", ["id", "label"], [])
    msg = kinds(read_generic(generic).problems, "missing ground truth")[0].message
    assert "a.csv" in msg and "--labels" in msg


def test_layout_flags_are_checked(generic, capsys):
    assert main(["data", "check", str(generic), "--layout", "isic2017"]) == 2
    assert "ISIC 2017" in capsys.readouterr().err
    assert main(["data", "check", str(generic), "--layout", "isic2018-task2"]) == 1
    assert "layout isic2018_task2" in capsys.readouterr().out
    assert main(["data", "check", str(generic), "--attributes", "globules"]) == 2
    assert "--attributes" in capsys.readouterr().err
    assert main(["data", "check", str(generic), "--layout", "generic", "--classes", "NV,MEL"]) == 1
    assert "BKL" in capsys.readouterr().out


# ----------------------------------------------------------------------------- end to end


def test_generic_data_trains_and_evaluates_from_the_cli(generic, tmp_path, capsys):
    assert main(["data", "check", str(generic)]) == 0
    prepared = tmp_path / "prepared"
    assert main(["data", "prepare", str(generic), "--size", "16", "--out", str(prepared)]) == 0
    assert "prepared 24 image(s)" in capsys.readouterr().out
    data = load_prepared(prepared)
    assert data.class_counts() == {"NV": 8, "MEL": 8, "BKL": 8} and data.has_mask.sum() == 23
    run = tmp_path / "base"
    common = ["--model", "small_cnn", "--width", "4", "--epochs", "1", "--batch-size", "8"]
    assert main(["train-base", "--data", str(prepared), *common, "--out", str(run)]) == 0
    ev = tmp_path / "eval"
    args = ["evaluate", "--model", str(run / "model.pt"), "--data", str(prepared)]
    assert main([*args, "--out", str(ev)]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n_test"] == 24 and metrics["n_without_mask"] == 1


def test_simulate_runs_on_the_generic_layout_and_carries_ignore_masks(tmp_path):
    root = make_generic(tmp_path / "export", n=30, export=True)
    prepared = prepare(root, tmp_path / "p", size=16, progress=False)
    data = load_prepared(prepared, mmap=False)
    assert data.has_ignore is not None and data.has_ignore.sum() == 10
    out = tmp_path / "sim"
    argv = ["simulate", "--data", str(prepared), "--modes", "cls,combined", "--epochs", "1"]
    argv += ["--base-epochs", "1", "--batch-size", "8", "--width", "8", "--out", str(out)]
    assert main(argv) == 0
    assert (out / "results.json").is_file()


def test_evaluate_reports_per_artifact_reliance(tmp_path, capsys):
    """``evaluate --artifacts``: accuracy with and without each flagged artifact (matching the
    per-image predictions), and the flip rate when the data's marked regions are filled."""
    root = make_generic(tmp_path / "clinic", export=True)  # ignore masks on every third image
    out = prepare(root, tmp_path / "p", size=12, progress=False)
    flags = tmp_path / "flags.csv"
    rows = [f"{gid(i)},{int(i % 2 == 0)},{int(i % 5 == 0)}" for i in range(1, 21)]  # 21-24: none
    flags.write_text("image_id,ruler,ink\n" + "\n".join(rows) + "\n")
    torch.manual_seed(0)
    ckpt = save_checkpoint(
        tmp_path / "m.pt",
        build_model("small_cnn", 3, width=4),
        ModelSpec("small_cnn", CLASSES, ("features.relu4",), 12, {"width": 4}),
    )
    ev = tmp_path / "eval"
    args = ["evaluate", "--model", str(ckpt), "--data", str(out), "--out", str(ev)]
    assert main([*args, "--artifacts", str(flags)]) == 0
    assert "per-artifact reliance" in capsys.readouterr().out
    report = json.loads((ev / "artifacts.json").read_text())
    with open(ev / "predictions.csv", newline="") as f:
        correct = {r["id"]: r["correct"] == "1" for r in csv.DictReader(f)}
    assert report["annotated"] == 20 and report["not_annotated"] == 4
    ruler = report["artifacts"]["ruler"]
    with_ids = [gid(i) for i in range(1, 21) if i % 2 == 0]
    without = [gid(i) for i in range(1, 21) if i % 2]
    assert ruler["n_with"] == 10 and ruler["n_without"] == 10
    assert ruler["accuracy_with"] == pytest.approx(np.mean([correct[i] for i in with_ids]))
    assert ruler["accuracy_without"] == pytest.approx(np.mean([correct[i] for i in without]))
    marked = report["marked"]
    assert marked["n"] == 8 and 0.0 <= marked["flip_rate"] <= 1.0  # every third of 24
    assert sum(marked["flips_to"].values()) == round(marked["flip_rate"] * 8)
    flags.write_text("image_id,ruler\nIMD001,2\n")
    assert main([*args, "--artifacts", str(flags)]) == 2
    assert "row 2, column 'ruler'" in capsys.readouterr().err


def test_an_ignore_folder_adds_to_the_ignore_masks_a_folder_has(tmp_path):
    """The export's own ignore/ and a folder given with ``ignore=``: each image's masks are the
    union of both (the app's strokes and a clinician's later ones), a file that is not an image
    in the folder is a warning naming it."""
    root = make_generic(tmp_path / "g", n=9, export=True)  # ignore/ on 3, 6, 9
    more = tmp_path / "more"
    png_mask(more / f"{gid(3)}.png", size=(W, H), box=(0, 12, 4, 18))
    png_mask(more / f"{gid(4)}_ignore.png", size=(W, H), box=(0, 12, 4, 18))
    (more / "notes.txt").write_text("strokes of 2026-12-05")
    result = read_dataset(root, ignore=more)
    by_id = {r.id: r for r in result.records}
    assert [p.parent.name for p in by_id[gid(3)].ignore] == ["ignore", "more"]
    assert [p.parent.name for p in by_id[gid(4)].ignore] == ["more"]
    assert [r.id for r in result.records if r.ignore] == [gid(i) for i in (3, 4, 6, 9)]
    assert any(p.path == more / "notes.txt" and p.severity == "warning" for p in result.problems)
    out = prepare(root, tmp_path / "p", size=12, progress=False, ignore=more)
    ignore, has_ignore = load_prepared_ignore(out)
    ids = load_prepared(out).ids
    row = ids.index(gid(3))
    assert ignore[row][0, -1] == 1 and ignore[row][-1, 0] == 1  # both boxes
