"""ISIC readers and checks, on tiny datasets built in the official layouts (incl. broken files)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feedbackcam.data.check import check_dataset, format_report
from feedbackcam.data.isic import overlap_ids, read_labels_csv
from feedbackcam.data.layouts import detect_layout, read_dataset
from feedbackcam.data.records import (
    ATTRIBUTES,
    CLASSES_3,
    CLASSES_2019,
    DUPLICATE_ID,
    IMAGE_WITHOUT_LABEL,
    IMAGE_WITHOUT_MASK,
    LABEL_WITHOUT_IMAGE,
    MASK_SIZE_MISMATCH,
    MASK_WITHOUT_IMAGE,
    MISSING_ATTRIBUTE,
    UNKNOWN_LABEL_FORMAT,
    UNMAPPED_DIAGNOSIS,
    UNREADABLE_IMAGE,
    UNREADABLE_MASK,
    UNUSABLE_LABEL,
)

W, H = 40, 30


def sid(i: int) -> str:
    return f"ISIC_{i:07d}"


def jpeg(path: Path, size=(W, H), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def png_mask(path: Path, size=(W, H), box=(5, 5, 20, 15)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    Image.fromarray(m).save(path)
    return path


def write_csv(path: Path, header, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def kinds(problems, kind):
    return [p for p in problems if p.kind == kind]


# ----------------------------------------------------------------------------- layouts


def onehot(label: str | None) -> list[str]:
    return ["1.0" if c == label else "0.0" for c in (*CLASSES_2019, "UNK")]


@pytest.fixture
def isic2019(tmp_path):
    root = tmp_path / "isic2019"
    inp = root / "ISIC_2019_Training_Input"
    labels = {1: "MEL", 2: "NV", 3: "BCC", 4: "SCC", 5: "UNK", 6: None, 9: "NV"}  # 9: no image
    for i in (1, 2, 3, 5, 6, 7):  # 7: no label row
        jpeg(inp / f"{sid(i)}.jpg", seed=i)
    jpeg(inp / f"{sid(4)}_downsampled.jpg", seed=4)
    (inp / "LICENSE.txt").write_text("CC-BY-NC")
    rows = [[sid(i) + ("_downsampled" if i == 4 else ""), *onehot(y)] for i, y in labels.items()]
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ["image", *CLASSES_2019, "UNK"], rows)
    write_csv(root / "ISIC_2019_Training_Metadata.csv", ["image", "age_approx"], [[sid(1), 50]])
    return root


def make_task2(root: Path, ids=(1, 2, 3, 4), missing=()) -> Path:
    """Task 2 layout; ``missing`` lists (id, attribute) files not written."""
    gt = root / "ISIC2018_Task2_Training_GroundTruth_v3"
    for i in ids:
        jpeg(root / "ISIC2018_Task2_Training_Input" / f"{sid(i)}.jpg", seed=i)
        for k, a in enumerate(ATTRIBUTES):
            if (i, a) not in missing:
                png_mask(gt / f"{sid(i)}_attribute_{a}.png", box=(k * 8, 0, k * 8 + 4, 4))
    return root


def make_isic2017(root: Path, splits=("Training",), labels=None) -> Path:
    """ISIC 2017 layout; ``labels`` maps id -> (melanoma, sk) per image."""
    labels = labels or {1: (0, 0), 2: (1, 0), 3: (0, 1), 4: (0, 0)}
    for n, split in enumerate(splits):
        rows = []
        for i, (mel, sk) in labels.items():
            j = i + 100 * n
            jpeg(root / f"ISIC-2017_{split}_Data" / f"{sid(j)}.jpg", seed=j)
            png_mask(root / f"ISIC-2017_{split}_Part1_GroundTruth" / f"{sid(j)}_segmentation.png")
            rows.append([sid(j), f"{mel:.1f}", f"{sk:.1f}"])
        write_csv(
            root / f"ISIC-2017_{split}_Part3_GroundTruth.csv",
            ["image_id", "melanoma", "seborrheic_keratosis"],
            rows,
        )
    return root


# ----------------------------------------------------------------------------- ISIC 2019


def test_isic2019_reader_labels_classes_and_reported_rows(isic2019):
    assert detect_layout(isic2019) == "isic2019"
    res = read_dataset(isic2019)
    assert res.layout == "isic2019"
    assert res.classes == CLASSES_2019 and "UNK" not in res.classes
    by_id = {r.id: r for r in res.records}
    # One record per image file; the _downsampled suffix is not part of the id.
    assert sorted(by_id) == [sid(i) for i in (1, 2, 3, 4, 5, 6, 7)]
    assert by_id[sid(4)].image.name == f"{sid(4)}_downsampled.jpg"
    assert {i: by_id[sid(i)].label for i in (1, 2, 3, 4)} == {1: "MEL", 2: "NV", 3: "BCC", 4: "SCC"}
    assert all(r.masks == () and r.source == "isic2019" for r in res.records)
    unusable = {p.id: p for p in kinds(res.problems, UNUSABLE_LABEL)}
    assert set(unusable) == {sid(5), sid(6)}  # UNK and all-zero rows are reported, not dropped
    assert "UNK" in unusable[sid(5)].message
    assert by_id[sid(5)].label is None and by_id[sid(6)].label is None
    [no_label] = kinds(res.problems, IMAGE_WITHOUT_LABEL)
    assert no_label.id == sid(7) and no_label.path == by_id[sid(7)].image
    [no_image] = kinds(res.problems, LABEL_WITHOUT_IMAGE)
    assert no_image.id == sid(9) and no_image.path.name == "ISIC_2019_Training_GroundTruth.csv"
    assert {r.id for r in res.usable()} == {sid(i) for i in (1, 2, 3, 4)}
    # The licence file and the metadata CSV are tolerated, not reported.
    assert not any("LICENSE" in str(p.path) or "Metadata" in str(p.path) for p in res.problems)


def test_isic2019_duplicate_id_reported_and_excluded(isic2019):
    jpeg(isic2019 / "ISIC_2019_Training_Input" / f"{sid(1)}_downsampled.jpg")
    res = read_dataset(isic2019)
    [dup] = kinds(res.problems, DUPLICATE_ID)
    assert dup.id == sid(1) and dup.severity == "error"
    assert sid(1) not in {r.id for r in res.usable()}


def test_overlap_ids_matches_canonical_ids_across_layouts(isic2019, tmp_path):
    task2 = make_task2(tmp_path / "t2", ids=(4, 7, 8))
    a, b = read_dataset(isic2019), read_dataset(task2)
    assert overlap_ids(a.records, b.records) == {sid(4), sid(7)}
    assert overlap_ids(b, a) == {sid(4), sid(7)}
    with pytest.raises(TypeError):
        overlap_ids(["ISIC_0000004"], a.records)


# ----------------------------------------------------------------------------- ISIC 2018 Task 2

LABEL_CSVS = {
    "isic2019": (
        ["image", *CLASSES_2019, "UNK"],
        [
            [sid(1), *onehot("NV")],
            [sid(2), *onehot("MEL")],
            [sid(3), *onehot("BKL")],
            [sid(4) + "_downsampled", *onehot("NV")],
            [sid(50), *onehot("BCC")],
        ],
    ),
    "isic2017": (
        ["image_id", "melanoma", "seborrheic_keratosis"],
        [
            [sid(1), "0.0", "0.0"],
            [sid(2), "1.0", "0.0"],
            [sid(3), "0.0", "1.0"],
            [sid(4), "0.0", "0.0"],
        ],
    ),
    "archive": (
        ["isic_id", "attribution", "benign_malignant", "diagnosis"],
        [
            [sid(1), "x", "benign", "nevus"],
            [sid(2), "x", "malignant", "melanoma"],
            [sid(3), "x", "benign", "seborrheic keratosis"],
            [sid(4), "x", "benign", "nevus"],
        ],
    ),
}


@pytest.mark.parametrize("fmt", sorted(LABEL_CSVS))
def test_task2_labels_joined_from_each_csv_format(tmp_path, fmt):
    root = make_task2(tmp_path / "t2")
    labels = write_csv(tmp_path / "labels.csv", *LABEL_CSVS[fmt])
    assert read_labels_csv(labels).format == fmt
    res = read_dataset(root, labels)
    assert res.layout == "isic2018_task2" and res.classes == CLASSES_3
    got = {r.id: r.label for r in res.records}
    assert got == {sid(1): "NV", sid(2): "MEL", sid(3): "BKL", sid(4): "NV"}
    # Rows for images outside Task 2 are expected (the CSV covers a larger set).
    assert not kinds(res.problems, LABEL_WITHOUT_IMAGE)
    assert not [p for p in res.problems if p.severity == "error"]


def test_archive_diagnoses_grouped_as_isic2019_and_unmapped_reported_with_counts(tmp_path):
    root = make_task2(tmp_path / "t2", ids=(1, 2, 3, 4, 5))
    rows = [
        [sid(1), "lichenoid keratosis"],
        [sid(2), "Solar lentigo"],
        [sid(3), "pigmented benign keratosis"],
        [sid(4), "basal cell carcinoma"],
        [sid(5), "Melanoma"],
        [sid(60), "basal cell carcinoma"],
        [sid(61), "dermatofibroma"],
    ]
    labels = write_csv(tmp_path / "meta.csv", ["isic_id", "diagnosis"], rows)
    res = read_dataset(root, labels)
    got = {r.id: r.label for r in res.records}
    assert got == {sid(1): "BKL", sid(2): "BKL", sid(3): "BKL", sid(4): None, sid(5): "MEL"}
    unmapped = {p.message.split(":")[0]: p for p in kinds(res.problems, UNMAPPED_DIAGNOSIS)}
    assert set(unmapped) == {"diagnosis 'basal cell carcinoma'", "diagnosis 'dermatofibroma'"}
    assert "2 rows" in unmapped["diagnosis 'basal cell carcinoma'"].message
    assert unmapped["diagnosis 'dermatofibroma'"].path == labels
    [no_label] = kinds(res.problems, IMAGE_WITHOUT_LABEL)
    assert no_label.id == sid(4) and "basal cell carcinoma" in no_label.message
    assert no_label.path.name == f"{sid(4)}.jpg"


def test_unknown_label_csv_format_reported_and_images_unlabelled(tmp_path):
    root = make_task2(tmp_path / "t2", ids=(1, 2))
    labels = write_csv(tmp_path / "odd.csv", ["name", "class"], [[sid(1), "NV"]])
    res = read_dataset(root, labels)
    [bad] = kinds(res.problems, UNKNOWN_LABEL_FORMAT)
    assert bad.path == labels and bad.severity == "error" and "isic_id" in bad.message
    assert {p.id for p in kinds(res.problems, IMAGE_WITHOUT_LABEL)} == {sid(1), sid(2)}
    assert res.usable() == ()
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_dataset(root, tmp_path / "nope.csv")


def test_task2_without_labels_csv_reports_every_image(tmp_path):
    res = read_dataset(make_task2(tmp_path / "t2", ids=(1, 2)))
    assert all(r.label is None for r in res.records)
    assert {p.id for p in kinds(res.problems, IMAGE_WITHOUT_LABEL)} == {sid(1), sid(2)}


def test_task2_masks_union_of_all_or_chosen_attributes(tmp_path):
    root = make_task2(tmp_path / "t2", ids=(1,))
    [rec] = read_dataset(root).records
    assert [p.name for p in rec.masks] == [f"{sid(1)}_attribute_{a}.png" for a in ATTRIBUTES]
    [rec] = read_dataset(root, attributes=["streaks", "globules"]).records
    assert [p.name for p in rec.masks] == [
        f"{sid(1)}_attribute_globules.png",
        f"{sid(1)}_attribute_streaks.png",
    ]
    with pytest.raises(ValueError, match="hairs"):
        read_dataset(root, attributes=["hairs"])


def test_missing_attribute_file_is_error_by_default_and_empty_on_request(tmp_path):
    root = make_task2(tmp_path / "t2", ids=(1, 2), missing={(2, "streaks"), (2, "globules")})
    labels = write_csv(tmp_path / "l.csv", *LABEL_CSVS["isic2017"])
    res = read_dataset(root, labels)
    missing = kinds(res.problems, MISSING_ATTRIBUTE)
    assert {p.path.name for p in missing} == {
        f"{sid(2)}_attribute_streaks.png",
        f"{sid(2)}_attribute_globules.png",
    }
    assert all(p.severity == "error" and p.id == sid(2) for p in missing)
    assert [r.id for r in res.usable()] == [sid(1)]

    res = read_dataset(root, labels, missing_attribute="empty")
    assert all(p.severity == "warning" for p in kinds(res.problems, MISSING_ATTRIBUTE))
    assert len(kinds(res.problems, MISSING_ATTRIBUTE)) == 2
    by_id = {r.id: r for r in res.records}
    assert len(by_id[sid(2)].masks) == 3 and [r.id for r in res.usable()] == [sid(1), sid(2)]
    # A subset that avoids the missing files has nothing to report.
    res = read_dataset(root, labels, attributes=["pigment_network"])
    assert not kinds(res.problems, MISSING_ATTRIBUTE)
    with pytest.raises(ValueError, match="missing_attribute"):
        read_dataset(root, labels, missing_attribute="skip")


# ----------------------------------------------------------------------------- ISIC 2017


def test_isic2017_reads_every_present_split_with_masks_and_sk_as_bkl(tmp_path):
    root = make_isic2017(tmp_path / "i17", splits=("Training", "Test_v2"))
    jpeg(root / "ISIC-2017_Training_Data" / "ISIC_0000001_superpixels.png")  # not an image
    write_csv(root / "ISIC-2017_Training_Data_metadata.csv", ["image_id", "age"], [[sid(1), 5]])
    assert detect_layout(root) == "isic2017"
    res = read_dataset(root)
    assert res.classes == CLASSES_3 and len(res.records) == 8
    by_id = {r.id: r for r in res.records}
    assert {i: by_id[sid(i)].label for i in (1, 2, 3, 4)} == {1: "NV", 2: "MEL", 3: "BKL", 4: "NV"}
    assert by_id[sid(2)].source == "isic2017_training"
    assert by_id[sid(102)].source == "isic2017_test_v2" and by_id[sid(102)].label == "MEL"
    assert by_id[sid(3)].masks == (
        root / "ISIC-2017_Training_Part1_GroundTruth" / f"{sid(3)}_segmentation.png",
    )
    assert res.problems == ()


def test_isic2017_missing_mask_label_and_image_reported_with_files(tmp_path):
    root = make_isic2017(tmp_path / "i17")
    (root / "ISIC-2017_Training_Part1_GroundTruth" / f"{sid(1)}_segmentation.png").unlink()
    jpeg(root / "ISIC-2017_Training_Data" / f"{sid(8)}.jpg")  # no label row
    png_mask(root / "ISIC-2017_Training_Part1_GroundTruth" / f"{sid(8)}_segmentation.png")
    (root / "ISIC-2017_Training_Data" / f"{sid(4)}.jpg").unlink()  # label row, no image
    res = read_dataset(root)
    [no_mask] = kinds(res.problems, IMAGE_WITHOUT_MASK)
    assert no_mask.id == sid(1) and no_mask.severity == "warning"
    [no_label] = kinds(res.problems, IMAGE_WITHOUT_LABEL)
    assert no_label.path == root / "ISIC-2017_Training_Data" / f"{sid(8)}.jpg"
    [no_image] = kinds(res.problems, LABEL_WITHOUT_IMAGE)
    assert (
        no_image.id == sid(4) and no_image.path.name == "ISIC-2017_Training_Part3_GroundTruth.csv"
    )
    [orphan_mask] = kinds(res.problems, MASK_WITHOUT_IMAGE)
    assert orphan_mask.path.name == f"{sid(4)}_segmentation.png"
    # A warning keeps the image; an error does not.
    assert {r.id for r in res.usable()} == {sid(1), sid(2), sid(3)}


# ----------------------------------------------------------------------------- layout, options


def test_detect_layout_error_lists_expected_layouts(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError) as err:
        detect_layout(tmp_path)
    for expected in ("ISIC_2019_Training_Input", "ISIC2018_Task2_Training_Input", "ISIC-2017_"):
        assert expected in str(err.value)
    assert "images" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        detect_layout(tmp_path / "nowhere")


def test_read_dataset_rejects_options_of_other_layouts(tmp_path, isic2019):
    root = make_isic2017(tmp_path / "i17")
    with pytest.raises(TypeError, match="attributes"):
        read_dataset(root, attributes=["streaks"])
    with pytest.raises(ValueError, match="labels_csv"):
        read_dataset(isic2019, labels_csv=isic2019 / "ISIC_2019_Training_GroundTruth.csv")


# ----------------------------------------------------------------------------- file checks


@pytest.fixture
def broken2017(tmp_path):
    root = make_isic2017(tmp_path / "i17", labels={i: (i % 2, 0) for i in range(1, 9)})
    data, gt = root / "ISIC-2017_Training_Data", root / "ISIC-2017_Training_Part1_GroundTruth"
    truncate(data / f"{sid(1)}.jpg")
    (data / f"{sid(2)}.jpg").write_bytes(b"this is not a JPEG")
    png_mask(gt / f"{sid(3)}_segmentation.png", size=(20, 20))
    (gt / f"{sid(4)}_segmentation.png").write_bytes(b"\x89PNG broken")
    return root


def test_check_reports_broken_files_with_their_paths(broken2017):
    data = broken2017 / "ISIC-2017_Training_Data"
    gt = broken2017 / "ISIC-2017_Training_Part1_GroundTruth"
    report = check_dataset(broken2017, workers=2)
    unreadable = {p.path: p for p in kinds(report.problems, UNREADABLE_IMAGE)}
    assert set(unreadable) == {data / f"{sid(1)}.jpg", data / f"{sid(2)}.jpg"}
    assert "truncated" in unreadable[data / f"{sid(1)}.jpg"].message
    [mismatch] = kinds(report.problems, MASK_SIZE_MISMATCH)
    assert mismatch.path == gt / f"{sid(3)}_segmentation.png" and "20x20" in mismatch.message
    [bad_mask] = kinds(report.problems, UNREADABLE_MASK)
    assert bad_mask.path == gt / f"{sid(4)}_segmentation.png"
    assert report.n_images == 8 and report.n_with_masks == 8 and report.n_usable == 4
    assert report.class_counts == {"NV": 4, "MEL": 4, "BKL": 0}
    assert report.usable_counts == {"NV": 2, "MEL": 2, "BKL": 0}  # 1..4 left out
    # A truncated JPEG has a valid header: only decoding finds it.
    shallow = check_dataset(broken2017, decode=False)
    assert data / f"{sid(1)}.jpg" not in {p.path for p in kinds(shallow.problems, UNREADABLE_IMAGE)}


def test_format_report_lists_class_counts_and_every_problem_file(broken2017):
    text = format_report(check_dataset(broken2017))
    lines = text.splitlines()
    assert any(line.split()[:3] == ["NV", "4", "50.0%"] for line in lines)
    assert any(line.split()[:3] == ["MEL", "4", "50.0%"] for line in lines)
    for i in (1, 2):
        assert str(broken2017 / "ISIC-2017_Training_Data" / f"{sid(i)}.jpg") in text
    for i in (3, 4):
        assert f"{sid(i)}_segmentation.png" in text
    assert UNREADABLE_IMAGE in text and MASK_SIZE_MISMATCH in text
    assert lines[-1].startswith("FAILED")
    clean = format_report(check_dataset(make_isic2017(broken2017.parent / "clean")))
    assert clean.splitlines()[-1] == "OK" and "problems" not in clean
    with pytest.raises(TypeError):
        format_report("not a report")
