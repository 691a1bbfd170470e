"""Prepared folders: arrays, index, exclusions, idempotence, atomicity and loading."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feedbackcam.data import decode
from feedbackcam.data.dataset import ArrayDataset
from feedbackcam.data.prepared import load_prepared, prepare, prepared_sources

W, H = 40, 30
ATTRS = ("globules", "milia_like_cyst", "negative_network", "pigment_network", "streaks")


def sid(i: int) -> str:
    return f"ISIC_{i:07d}"


def jpeg(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
    return path


def png_mask(path: Path, box, size=(W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    Image.fromarray(m).save(path)
    return path


LABELS = {1: (0, 0), 2: (1, 0), 3: (0, 1), 4: (0, 0), 5: (1, 0), 6: (0, 1), 7: (0, 0)}
BOX = (0, 0, 20, 15)  # the left half of the top half: a quarter of the image


@pytest.fixture
def root(tmp_path):
    """ISIC 2017 layout: 7 labelled images with masks except 7, one truncated image (3), one
    image without a label (8)."""
    root = tmp_path / "isic2017"
    data, gt = root / "ISIC-2017_Training_Data", root / "ISIC-2017_Training_Part1_GroundTruth"
    for i in (*LABELS, 8):
        jpeg(data / f"{sid(i)}.jpg", seed=i)
        if i != 7:
            png_mask(gt / f"{sid(i)}_segmentation.png", BOX)
    raw = (data / f"{sid(3)}.jpg").read_bytes()
    (data / f"{sid(3)}.jpg").write_bytes(raw[: len(raw) // 2])
    with open(root / "ISIC-2017_Training_Part3_GroundTruth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "melanoma", "seborrheic_keratosis"])
        w.writerows([sid(i), float(m), float(s)] for i, (m, s) in LABELS.items())
    return root


KEPT = [sid(i) for i in (1, 2, 4, 5, 6, 7)]


def read_index(out: Path) -> list[dict]:
    with open(out / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_prepare_writes_arrays_index_and_meta(root, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    out = prepare(root, tmp_path / "p", size=16, progress=False, workers=2)
    assert out == tmp_path / "p"
    assert sorted(p.name for p in out.iterdir()) == [
        "images.npy",
        "index.csv",
        "masks.npy",
        "meta.json",
    ]
    images, masks = np.load(out / "images.npy"), np.load(out / "masks.npy")
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    assert masks.shape == (6, 16, 16) and masks.dtype == np.uint8
    rows = read_index(out)
    assert [r["id"] for r in rows] == KEPT
    assert [r["label"] for r in rows] == ["NV", "MEL", "NV", "MEL", "BKL", "NV"]
    assert [int(r["label_index"]) for r in rows] == [0, 1, 0, 1, 2, 0]
    assert [r["has_mask"] for r in rows] == ["1"] * 5 + ["0"]
    assert {(r["source"], r["width"], r["height"]) for r in rows} == {
        ("isic2017_training", "40", "30")
    }
    # Row i of the arrays is image i of the index: compare with that file decoded afresh.
    for i, r in enumerate(rows):
        with Image.open(root / "ISIC-2017_Training_Data" / f"{r['id']}.jpg") as im:
            ref = np.asarray(im.convert("RGB").resize((16, 16), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(images[i], ref)
    # Nearest-neighbour keeps masks binary and the box a quarter of the image.
    assert set(np.unique(masks)) == {0, 1}
    assert masks[:5].mean(axis=(1, 2)).tolist() == [0.25] * 5
    assert masks[5].sum() == 0  # no mask file: zeros, has_mask 0

    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "feedbackcam-prepared" and meta["version"] == 1
    assert meta["classes"] == ["NV", "MEL", "BKL"] and meta["size"] == 16
    assert meta["resample"] == "nearest" and meta["layout"] == "isic2017"
    assert meta["counts"]["images"] == 6 and meta["counts"]["excluded"] == 2
    assert meta["counts"]["per_class"] == {"NV": 3, "MEL": 2, "BKL": 1}
    assert meta["counts"]["excluded_ids"] == [sid(3), sid(8)]
    problems = {(Path(p["path"]).name, p["kind"]) for p in meta["problems"] if p["path"]}
    assert (f"{sid(3)}.jpg", "unreadable image") in problems  # truncated: left out, listed
    assert (f"{sid(8)}.jpg", "image without label") in problems
    assert f"{sid(3)}.jpg" in caplog.text and f"{sid(8)}.jpg" in caplog.text  # and printed


def test_nearest_picks_source_pixels_bilinear_blends(root, tmp_path):
    src = root / "ISIC-2017_Training_Data" / f"{sid(1)}.jpg"
    with Image.open(src) as im:
        colours = {tuple(c) for c in np.asarray(im.convert("RGB")).reshape(-1, 3)}

    def first_image(resample):
        out = prepare(root, tmp_path / resample, size=24, image_resample=resample, progress=False)
        return load_prepared(out).images[0].reshape(-1, 3)

    assert all(tuple(c) in colours for c in first_image("nearest"))
    assert not all(tuple(c) in colours for c in first_image("bilinear"))
    bilinear_masks = load_prepared(tmp_path / "bilinear").masks
    assert set(np.unique(bilinear_masks)) == {0, 1}  # masks stay nearest whatever the images


def test_task2_mask_is_union_of_chosen_attributes(tmp_path):
    root = tmp_path / "t2"
    jpeg(root / "ISIC2018_Task2_Training_Input" / f"{sid(1)}.jpg", seed=1)
    gt = root / "ISIC2018_Task2_Training_GroundTruth_v3"
    for k, a in enumerate(ATTRS):  # five disjoint 8x30 columns
        png_mask(gt / f"{sid(1)}_attribute_{a}.png", (k * 8, 0, k * 8 + 8, H))
    labels = tmp_path / "labels.csv"
    labels.write_text(f"isic_id,diagnosis\n{sid(1)},melanoma\n")
    full = load_prepared(prepare(root, tmp_path / "all", size=W, labels_csv=labels, progress=False))
    assert full.masks[0].all() and full.labels.tolist() == [1]
    out = prepare(
        root,
        tmp_path / "two",
        size=W,
        labels_csv=labels,
        attributes=["globules", "streaks"],
        progress=False,
    )
    cols = load_prepared(out).masks[0].any(axis=0)
    assert cols[:8].all() and cols[32:].all() and not cols[8:32].any()


def test_second_call_does_no_work(root, tmp_path, monkeypatch):
    out = prepare(root, tmp_path / "p", size=16, progress=False)
    mtime = (out / "images.npy").stat().st_mtime_ns

    def boom(*args):
        raise AssertionError("decoder called")

    monkeypatch.setattr(decode, "load_record", boom)
    assert prepare(root, tmp_path / "p", size=16, progress=False) == out
    assert (out / "images.npy").stat().st_mtime_ns == mtime
    # A changed source file (new mtime) is work again.
    src = root / "ISIC-2017_Training_Data" / f"{sid(1)}.jpg"
    src.touch()
    with pytest.raises(AssertionError, match="decoder called"):
        prepare(root, tmp_path / "p", size=16, progress=False)


def test_other_settings_replace_the_folder(root, tmp_path):
    out = prepare(root, tmp_path / "p", size=16, progress=False)
    prepare(root, out, size=20, progress=False)
    assert load_prepared(out).images.shape == (6, 20, 20, 3)
    assert json.loads((out / "meta.json").read_text())["size"] == 20
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def interrupt_on_third_call(monkeypatch):
    calls = []
    real = decode.load_record

    def flaky(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(decode, "load_record", flaky)
    return calls


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".p.")]


def test_interrupted_first_run_leaves_nothing_that_looks_complete(root, tmp_path, monkeypatch):
    calls = interrupt_on_third_call(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prepare(root, tmp_path / "p", size=16, progress=False, workers=1)
    assert len(calls) >= 3
    assert not (tmp_path / "p").exists()
    assert not any((p / "meta.json").exists() for p in leftovers(tmp_path))


def test_interrupted_rebuild_keeps_the_old_complete_set(root, tmp_path, monkeypatch):
    out = prepare(root, tmp_path / "p", size=16, progress=False)
    before = np.load(out / "images.npy")
    interrupt_on_third_call(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prepare(root, out, size=20, progress=False, workers=1)
    ds = load_prepared(out)
    assert ds.size == 16
    np.testing.assert_array_equal(ds.images, before)
    assert leftovers(tmp_path) == []


def test_stale_tmp_of_a_dead_run_is_ignored_and_removed(root, tmp_path):
    stale = tmp_path / ".p.tmp-999999999"
    stale.mkdir()
    (stale / "images.npy").write_bytes(b"half")
    out = prepare(root, tmp_path / "p", size=16, progress=False)
    assert len(load_prepared(out)) == 6 and not stale.exists()


def test_refuses_to_replace_a_folder_it_did_not_write(root, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        prepare(root, out, size=16, progress=False)
    assert (out / "notes.txt").read_text() == "keep me"


def test_bad_arguments_and_nothing_usable(root, tmp_path):
    with pytest.raises(ValueError, match="size"):
        prepare(root, tmp_path / "p", size=0)
    with pytest.raises(ValueError, match="image_resample"):
        prepare(root, tmp_path / "p", image_resample="bicubic")
    (root / "ISIC-2017_Training_Part3_GroundTruth.csv").write_text(
        "image_id,melanoma,seborrheic_keratosis\n"
    )
    with pytest.raises(ValueError, match="no usable image"):
        prepare(root, tmp_path / "p", size=16, progress=False)
    assert not (tmp_path / "p").exists()


def test_load_prepared_is_the_arrays_memory_mapped(root, tmp_path):
    out = prepare(root, tmp_path / "p", size=16, progress=False)
    ds = load_prepared(out)
    assert isinstance(ds, ArrayDataset)
    assert isinstance(ds.images, np.memmap) and isinstance(ds.masks, np.memmap)
    np.testing.assert_array_equal(ds.images, np.load(out / "images.npy"))
    np.testing.assert_array_equal(ds.masks, np.load(out / "masks.npy"))
    assert ds.ids == tuple(KEPT) and ds.classes == ("NV", "MEL", "BKL")
    assert ds.labels.tolist() == [0, 1, 0, 1, 2, 0]
    assert ds.has_mask.tolist() == [True] * 5 + [False]
    ds.images[0] = 0  # copy-on-write: the file is untouched
    assert np.load(out / "images.npy")[0].any()
    in_ram = load_prepared(out, mmap=False)
    assert not isinstance(in_ram.images, np.memmap)
    np.testing.assert_array_equal(in_ram.images, np.load(out / "images.npy"))
    assert prepared_sources(out).tolist() == ["isic2017_training"] * 6


def test_load_prepared_errors_name_the_folder(root, tmp_path):
    out = prepare(root, tmp_path / "p", size=16, progress=False)
    rows = (out / "index.csv").read_text().splitlines()
    (out / "index.csv").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(ValueError, match=str(out)):
        load_prepared(out)
    (out / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{out}.*meta.json"):
        load_prepared(out)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_prepared(tmp_path / "nowhere")


def test_mask_problems_exclude_the_image_and_are_listed(root, tmp_path):
    gt = root / "ISIC-2017_Training_Part1_GroundTruth"
    png_mask(gt / f"{sid(5)}_segmentation.png", BOX, size=(20, 20))
    (gt / f"{sid(6)}_segmentation.png").write_bytes(b"not a png")
    out = prepare(root, tmp_path / "p", size=16, progress=False)
    assert load_prepared(out).ids == tuple(sid(i) for i in (1, 2, 4, 7))
    meta = json.loads((out / "meta.json").read_text())
    kinds = {Path(p["path"]).name: p["kind"] for p in meta["problems"] if p["path"]}
    assert kinds[f"{sid(5)}_segmentation.png"] == "mask size differs from its image"
    assert kinds[f"{sid(6)}_segmentation.png"] == "unreadable mask"
