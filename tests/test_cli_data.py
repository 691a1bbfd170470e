"""The ISIC command line end to end on tiny datasets in the official layouts."""

import json

import pytest
from test_isic import make_isic2017, png_mask, sid, truncate

from feedbackcam.checkpoint import load_checkpoint
from feedbackcam.cli import main
from feedbackcam.data.prepared import load_prepared, load_prepared_ignore, save_prepared
from feedbackcam.data.synth import SynthConfig, as_array_dataset, make_synthderm


def test_data_check_lists_problems_with_their_files_and_fails(tmp_path, capsys):
    root = make_isic2017(tmp_path / "isic2017")
    assert main(["data", "check", str(root)]) == 0
    assert "OK" in capsys.readouterr().out
    broken = sorted((root / "ISIC-2017_Training_Data").glob("ISIC_*.jpg"))[0]
    truncate(broken)
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert broken.name in out and "FAILED" in out


def test_data_prepare_then_train_base_then_evaluate(tmp_path, capsys):
    labels = {i: ((1, 0), (0, 1), (0, 0), (0, 0))[i % 4] for i in range(1, 41)}
    root = make_isic2017(tmp_path / "isic2017", labels=labels)
    tiny = tmp_path / "tiny"
    assert (
        main(
            [
                "data",
                "prepare",
                str(make_isic2017(tiny)),
                "--size",
                "32",
                "--out",
                str(tmp_path / "tiny-prepared"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train-base",
                "--data",
                str(tmp_path / "tiny-prepared"),
                "--model",
                "small_cnn",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "too few" in capsys.readouterr().err
    prepared = tmp_path / "prepared"
    assert main(["data", "prepare", str(root), "--size", "32", "--out", str(prepared)]) == 0
    data = load_prepared(prepared)
    assert data.images.shape[1:] == (32, 32, 3)
    run = tmp_path / "base"
    args = [
        "train-base",
        "--data",
        str(prepared),
        "--model",
        "small_cnn",
        "--width",
        "8",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--out",
        str(run),
    ]
    assert main(args) == 0
    for name in ("model.pt", "config.json", "history.csv", "table.md", "metrics.json"):
        assert (run / name).is_file(), name
    model, spec, payload = load_checkpoint(run / "model.pt")
    assert spec.classes == data.classes and spec.input_size == 32
    assert "| Class |" in (run / "table.md").read_text()
    ev_dir = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(run / "model.pt"),
                "--data",
                str(prepared),
                "--out",
                str(ev_dir),
            ]
        )
        == 0
    )
    metrics = json.loads((ev_dir / "metrics.json").read_text())
    assert metrics["n_test"] == len(data)
    assert {"accuracy", "jaccard_mean", "jaccard_sd", "isic_jaccard", "per_class"} <= set(metrics)


@pytest.fixture
def prepared_synth(tmp_path):
    ds = as_array_dataset(make_synthderm(SynthConfig(n=80, size=32, seed=3)))
    return save_prepared(ds, tmp_path / "synth-prepared")


def test_simulate_on_a_prepared_folder_carves_a_base_set(tmp_path, prepared_synth):
    out = tmp_path / "sim"
    assert (
        main(
            [
                "simulate",
                "--data",
                str(prepared_synth),
                "--modes",
                "cls,exp",
                "--epochs",
                "1",
                "--base-epochs",
                "1",
                "--batch-size",
                "8",
                "--width",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"cls", "exp"}
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["n_base"] + config["data"]["n_feedback"] == 80


def test_simulate_with_a_base_model_of_more_classes_aligns_labels_by_name(
    tmp_path, prepared_synth, capsys
):
    from feedbackcam.checkpoint import ModelSpec, save_checkpoint
    from feedbackcam.models import build_model

    classes = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
    ckpt = save_checkpoint(
        tmp_path / "isic2019.pt",
        build_model("small_cnn", 8, width=8),
        ModelSpec("small_cnn", classes, ("features.relu4",), 32, {"width": 8}),
    )
    half = save_prepared(load_prepared(prepared_synth).subset(range(40)), tmp_path / "half")
    out = tmp_path / "sim"
    args = [
        "simulate",
        "--data",
        str(prepared_synth),
        "--base-model",
        str(ckpt),
        "--modes",
        "combined",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--overlap",
        str(half),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    sens = results["baseline"]["sensitivity"]
    assert set(sens) == set(classes)
    assert sens["BCC"] is None and sens["NV"] is not None  # absent classes are not scored
    splits = json.loads((out / "splits.json").read_text())
    overlap = set(load_prepared(half).ids)
    assert not overlap & (set(splits["val"]) | set(splits["test"]))
    assert overlap <= set(splits["train"])
    args[args.index(str(half))] = str(prepared_synth)  # everything overlaps: nothing to test on
    assert main(args) == 2
    assert "too few to simulate" in capsys.readouterr().err


def test_cli_errors_name_the_problem_without_a_traceback(tmp_path, capsys):
    assert (
        main(["simulate", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


def test_an_ignore_folder_joins_an_isic_layout_in_check_and_prepare(tmp_path, capsys):
    """ISIC 2017 as downloaded has no ignore masks; a clinician's strokes kept in a folder of
    their own (<id>.png or <id>_ignore.png) join it, the keep masks stay, a stroke naming no
    image is a warning naming its file, and preparing again without the folder drops them."""
    root = make_isic2017(tmp_path / "i17")  # 40 x 30 images sid(1..4)
    marks = tmp_path / "marks"
    png_mask(marks / f"{sid(2)}.png", box=(0, 0, 10, 10))  # top left
    png_mask(marks / f"{sid(3)}_ignore.png", box=(30, 20, 40, 30))  # bottom right
    png_mask(marks / f"{sid(99)}.png")
    assert main(["data", "check", str(root), "--ignore", str(marks)]) == 0
    out = capsys.readouterr().out
    assert "with ignore masks: 2" in out and f"{sid(99)}.png" in out
    prepared = tmp_path / "prepared"
    args = ["data", "prepare", str(root), "--size", "20", "--out", str(prepared)]
    assert main([*args, "--ignore", str(marks)]) == 0
    assert "2 with ignore masks" in capsys.readouterr().out
    data = load_prepared(prepared)
    ignore, has_ignore = load_prepared_ignore(prepared)
    row = {i: k for k, i in enumerate(data.ids)}
    assert [data.ids[k] for k in range(len(data.ids)) if has_ignore[k]] == [sid(2), sid(3)]
    assert ignore[row[sid(2)]][0, 0] == 1 and ignore[row[sid(2)]][-1, -1] == 0
    assert ignore[row[sid(3)]][-1, -1] == 1 and ignore[row[sid(3)]][0, 0] == 0
    assert not ignore[row[sid(1)]].any() and data.has_mask.all()
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["settings"]["options"]["ignore"] == str(marks.resolve())
    assert main(args) == 0  # other settings: rebuilt without them
    assert load_prepared_ignore(prepared) is None


def test_an_ignore_folder_that_names_no_image_is_an_error_naming_it(tmp_path, capsys):
    root = make_isic2017(tmp_path / "i17")
    marks = tmp_path / "marks"
    png_mask(marks / "lesion-17.png")
    out = tmp_path / "prepared"
    for folder, words in (
        (marks, ["names an image", "lesion-17", sid(1)]),
        (tmp_path / "no", ["does not exist"]),
    ):
        assert main(["data", "prepare", str(root), "--ignore", str(folder), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(folder) in err and all(w in err for w in words) and "Traceback" not in err
    assert not out.exists()
