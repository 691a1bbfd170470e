import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from feedbackcam.data.dataset import ArrayDataset
from feedbackcam.evaluate import (
    counterfactual_flip_rate,
    counterfactual_report,
    evaluate,
    predict_classes,
    predictions_rows,
    write_predictions,
    write_saliency_maps,
)
from feedbackcam.explain import explain
from feedbackcam.metrics import jaccard_per_image


def _data(n=10, size=32, seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, 8:24, 8:24] = 1
    has = np.ones(n, bool)
    has[:3] = False
    return ArrayDataset(
        rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        masks,
        rng.integers(0, 3, n),
        has,
        tuple(f"img{i}" for i in range(n)),
        ("NV", "MEL", "BKL"),
    )


def test_evaluate_scores_every_image_and_excludes_those_without_masks(tiny_model):
    data = _data()
    ev = evaluate(tiny_model, data, batch_size=4)
    s = ev.summary()
    assert s["n_test"] == 10 and s["n_without_mask"] == 3 and ev.jaccard.n == 7
    assert ev.probs.shape == (10, 3) and np.allclose(ev.probs.sum(1), 1, atol=1e-5)
    pred = ev.probs.argmax(1)
    assert s["accuracy"] == pytest.approx((pred == data.labels).mean())
    assert ev.explained.shape == (10, 32, 32) and ev.explained.dtype == bool
    # batch size does not change the result
    again = evaluate(tiny_model, data, batch_size=10)
    assert np.array_equal(again.explained, ev.explained)


def test_explain_restores_the_training_mode_and_leaves_no_graph(tiny_model):
    tiny_model.train()
    x = torch.rand(2, 3, 32, 32)
    ex = explain(tiny_model, x, targets=1)
    assert tiny_model.training
    assert not ex.saliency.requires_grad and ex.targets.tolist() == [1, 1]
    assert ex.saliency.shape == (2, 32, 32) and float(ex.saliency.max()) <= 1
    assert not x.requires_grad  # the caller's tensor is not modified


def test_explain_works_for_a_frozen_model(tiny_model):
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    ex = explain(tiny_model, torch.rand(1, 3, 32, 32))
    assert ex.saliency.shape == (1, 32, 32)


def test_array_dataset_validates_shapes():
    data = _data()
    with pytest.raises(ValueError, match="masks"):
        ArrayDataset(
            data.images, data.masks[:, :8], data.labels, data.has_mask, data.ids, data.classes
        )
    with pytest.raises(ValueError, match="labels"):
        ArrayDataset(
            data.images, data.masks, data.labels + 5, data.has_mask, data.ids, data.classes
        )
    sub = data.subset([2, 5])
    assert sub.ids == ("img2", "img5") and len(sub) == 2


# ----------------------------------------------------------------------------- per-image outputs


def test_predictions_rows_are_one_per_image_and_match_the_metrics(tiny_model, tmp_path):
    data = _data(n=12)
    data.masks[5] = 0  # has a mask, but an empty one: not scored, like no mask
    ev = evaluate(tiny_model, data, batch_size=5, keep_saliency=True)
    path = write_predictions(tmp_path / "predictions.csv", ev, data)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == list(data.ids)
    probs = np.array([[float(r[f"p_{c}"]) for c in data.classes] for r in rows])
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5) and np.allclose(probs, ev.probs, atol=1e-6)
    assert [r["predicted"] for r in rows] == [data.classes[k] for k in ev.probs.argmax(1)]
    assert [r["label"] for r in rows] == [data.classes[k] for k in data.labels]
    assert sum(int(r["correct"]) for r in rows) == round(ev.classification.accuracy * 12)
    expected = jaccard_per_image(ev.explained, data.masks, data.has_mask).values
    scored = [float(r["jaccard"]) for r in rows if r["jaccard"] != ""]
    assert np.allclose(scored, expected, atol=1e-6)
    assert [i for i, r in enumerate(rows) if r["jaccard"] == ""] == [0, 1, 2, 5]
    assert path.read_text().endswith("\n")
    maps = write_saliency_maps(tmp_path / "maps", ev, data.ids)
    assert [p.name for p in maps] == [f"img{i}.png" for i in range(12)]
    with Image.open(maps[3]) as png:
        saved = np.asarray(png)
    assert saved.shape == (32, 32) and saved.dtype == np.uint8
    assert np.array_equal(saved >= 128, ev.explained[3])  # threshold 0.5 of the max
    with pytest.raises(ValueError, match="keep_saliency"):
        write_saliency_maps(tmp_path / "m2", evaluate(tiny_model, data), data.ids)


def test_ignore_share_is_the_explanations_share_on_the_ignore_mask(tiny_model):
    data = _data(n=6)
    ev = evaluate(tiny_model, data)
    ignore = np.zeros_like(data.masks)
    ignore[1:4, :, :16] = 1  # the left half, for images 1-3
    rows = predictions_rows(ev, data, ignore)
    for i, row in enumerate(rows):
        if i in (1, 2, 3):
            e = ev.explained[i]
            assert float(row["ignore_share"]) == pytest.approx(e[:, :16].sum() / e.sum())
        else:
            assert row["ignore_share"] == ""
    assert "ignore_share" not in predictions_rows(ev, data)[0]


def test_summary_names_the_classes_the_average_sensitivity_is_over(tiny_model):
    data = _data()
    data.labels[:] = np.arange(10) % 2  # no BKL
    s = evaluate(tiny_model, data).summary()
    assert s["avg_sensitivity_classes"] == ["NV", "MEL"] and s["absent_classes"] == ["BKL"]
    assert s["avg_sensitivity"] == pytest.approx(
        np.mean([s["sensitivity"]["NV"], s["sensitivity"]["MEL"]])
    )


def _sharp(model):
    """An untrained model predicts one class for all noise images; a larger head makes the
    predictions (and so flips) depend on the input."""
    with torch.no_grad():
        model.model.fc.weight.mul_(200)
        model.model.fc.bias.zero_()
    return model


def _counterfactual(data, order):
    """The same images (ids reordered) with the upper-left quarter painted black."""
    images = np.array(data.images[order])
    images[:, :16, :16] = 0
    ids = tuple(data.ids[i] for i in order)
    return ArrayDataset(
        images, data.masks[order], data.labels[order], data.has_mask[order], ids, data.classes
    )


def test_counterfactual_report_agrees_with_the_flip_rate(tiny_model):
    data = _data(n=40, seed=1)
    order = np.random.default_rng(0).permutation(40)
    other = _counterfactual(data, order)
    _sharp(tiny_model)
    report = counterfactual_report(tiny_model, data, other, names=("a", "b"), batch_size=7)
    aligned = other.subset(np.argsort(order))  # back in data's id order
    assert aligned.ids == data.ids
    direct = counterfactual_flip_rate(tiny_model, data.images, aligned.images)
    assert report["flip_rate"] == pytest.approx(direct) and report["n"] == 40
    assert report["n_flips"] == round(direct * 40) > 0
    assert sum(n for row in report["flips"].values() for n in row.values()) == report["n_flips"]
    assert len(report["flipped_ids"]) == report["n_flips"] and report["label_mismatches"] == 0
    before = predict_classes(tiny_model, data.images)
    assert report["accuracy"]["a"] == pytest.approx((before == data.labels).mean())
    with pytest.raises(ValueError, match="folder-a.*folder-b"):
        counterfactual_report(
            tiny_model, data, other.subset(range(39)), names=("folder-a", "folder-b")
        )


def test_evaluate_cli_writes_predictions_maps_and_counterfactual(tmp_path, capsys):
    from feedbackcam.checkpoint import ModelSpec, save_checkpoint
    from feedbackcam.cli import main
    from feedbackcam.data.prepared import save_prepared
    from feedbackcam.models import build_model

    torch.manual_seed(0)
    model = _sharp(build_model("small_cnn", 3, width=8))
    spec = ModelSpec("small_cnn", ("NV", "MEL", "BKL"), ("features.relu4",), 32, {"width": 8})
    ckpt = save_checkpoint(tmp_path / "m.pt", model, spec)
    data = _data(n=40, seed=1)
    order = np.random.default_rng(0).permutation(40)
    a = save_prepared(data, tmp_path / "a")
    b = save_prepared(_counterfactual(data, order), tmp_path / "b")
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(ckpt), "--data", str(a), "--out", str(out)]
    assert main([*args, "--save-maps", "--counterfactual", str(b)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "counterfactual.json").read_text())
    aligned = _counterfactual(data, np.arange(40))
    direct = counterfactual_flip_rate(model, data.images, aligned.images)
    assert report["flip_rate"] == pytest.approx(direct)
    assert f"flip rate {direct:.3f}" in printed and "average sensitivity" in printed
    assert len((out / "predictions.csv").read_text().splitlines()) == 41
    assert len(list((out / "maps").glob("*.png"))) == 40
    for name in ("table.md", "metrics.json", "predictions.csv", "counterfactual.json"):
        assert (out / name).read_text().endswith("\n") or name.endswith(".json"), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["avg_sensitivity_classes"] == ["NV", "MEL", "BKL"]
    c = save_prepared(data.subset(range(30)), tmp_path / "c")
    assert main([*args, "--counterfactual", str(c)]) == 2
    err = capsys.readouterr().err
    assert str(a) in err and str(c) in err and "same ids" in err
