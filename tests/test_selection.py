"""Model selection that cannot keep a collapsed classifier, epoch 0 in the open, warnings, and
feedback splits that cannot leak the base model's training images."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from feedbackcam import simulate
from feedbackcam.checkpoint import ModelSpec
from feedbackcam.cli import main
from feedbackcam.models import build_model
from feedbackcam.objective import FeedbackConfig
from feedbackcam.selection import (
    class_scores,
    drops,
    independent_margins,
    noise_margins,
    run_warnings,
)
from feedbackcam.shortcuts import BenchConfig
from feedbackcam.simulate import SimulationConfig
from feedbackcam.simulation_data import SynthSetup, synth_simulation_data

SPEC = ModelSpec("small_cnn", ("NV", "MEL", "BKL"), ("features.relu4",), 32, {"width": 8})


@pytest.fixture
def prepared_synth(tmp_path):
    from feedbackcam.data.prepared import save_prepared
    from feedbackcam.data.synth import SynthConfig, as_array_dataset, make_synthderm

    ds = as_array_dataset(make_synthderm(SynthConfig(n=150, size=32, seed=3)))
    return save_prepared(ds, tmp_path / "synth-prepared")


@pytest.fixture(scope="module")
def tiny_data():
    data, _ = synth_simulation_data(SynthSetup(size=32, n_base=60, n_feedback=80))
    return data


def _make_model():
    torch.manual_seed(0)
    return build_model("small_cnn", 3, width=8)


class _Eval:
    """A validation result: Jaccard rises every epoch while the classifier collapses."""

    def __init__(self, jaccard, avg_sensitivity):
        self.jaccard = type("J", (), {"mean": jaccard})()
        self.classification = type(
            "C", (), {"accuracy": 0.5, "avg_sensitivity": avg_sensitivity, "per_class": {}}
        )()

    def summary(self, **_):
        return {"accuracy": 0.5, "avg_sensitivity": self.classification.avg_sensitivity}


@pytest.mark.parametrize(("guard", "expected"), [(0.05, 1), (None, 3)])
def test_the_guard_rejects_collapsed_epochs_and_the_unguarded_flag_keeps_them(
    monkeypatch, tiny_data, guard, expected
):
    # epochs 0..3: Jaccard 0.2, 0.3, 0.5, 0.7; average sensitivity 0.6, 0.58, 0.34, 0.33
    evals = iter([_Eval(0.2, 0.6), _Eval(0.3, 0.58), _Eval(0.5, 0.34), _Eval(0.7, 0.33)])
    monkeypatch.setattr(simulate, "evaluate", lambda *a, **k: next(evals))
    cfg = SimulationConfig(
        epochs=3,
        batch_size=8,
        optimizer="adam",
        lr=1e-3,
        guard_tolerance=guard,
        guard_confidence=None,  # the fake evaluations carry no per-image predictions
        feedback=FeedbackConfig(lam=1.0),
    )
    history = []
    _, best_epoch, _ = simulate.fine_tune(
        _make_model(),
        tiny_data.feedback.tensors(),
        np.arange(40),
        tiny_data.feedback.subset(range(40, 50)),
        cfg,
        "exp",
        epochs=3,
        generator=torch.Generator(),
        history=history,
        stage={"slice": 0},
    )
    assert best_epoch == expected
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]
    assert [r["eligible"] for r in history] == [True, True, guard is None, guard is None]


def test_drops_and_warnings():
    ref = {"avg_sensitivity": 0.6, "sensitivity": {"NV": 0.9, "MEL": 0.3}}
    ok = {"avg_sensitivity": 0.58, "sensitivity": {"NV": 0.96, "MEL": 0.2}}
    assert drops(ref, ok, 0.05) == []
    assert [d.name for d in drops(ref, ok, 0.05, per_class=True)] == ["sensitivity MEL"]
    with pytest.raises(ValueError, match="class measure"):
        drops(ref, ok, 0.05, per_class=True, measure="f1")
    warnings = run_warnings(
        {"sensitivity": {"NV": 1.0, "MEL": 0.0}, "predicted_share": {"NV": 0.95, "MEL": 0.05}},
        best_epoch=0,
    )
    assert len(warnings) == 3
    assert "no epoch improved" in warnings[0] and "MEL" in warnings[1] and "95%" in warnings[2]


def test_best_epoch_0_is_reported_as_no_improvement(tmp_path, tiny_data, capsys):
    cfg = SimulationConfig(
        modes=("cls",), epochs=1, batch_size=8, optimizer="sgd", lr=0.0, base_epochs=1
    )
    results = simulate.run_simulation(
        tiny_data, cfg, tmp_path, make_model=_make_model, spec=SPEC, progress=False
    )
    run = results["runs"]["cls"]
    assert run["best_epoch"] == 0 and run["improved"] is False
    assert any("no epoch improved" in w for w in run["warnings"])
    assert "no epoch improved on the baseline" in (tmp_path / "results.md").read_text()
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1"]


def test_simulate_on_the_base_models_own_data_keeps_the_overlap_in_feedback_train(
    tmp_path, prepared_synth, capsys
):
    base = tmp_path / "base"
    args = ["--model", "small_cnn", "--width", "8", "--epochs", "1", "--no-augment"]
    assert main(["train-base", "--data", str(prepared_synth), *args, "--out", str(base)]) == 0
    trained_on = torch.load(base / "model.pt", weights_only=True)["config"]["trained_on"]
    seen = set(trained_on["train"]) | set(trained_on["val"])
    out = tmp_path / "sim"
    argv = ["simulate", "--data", str(prepared_synth), "--base-model", str(base / "model.pt")]
    argv += ["--modes", "cls", "--epochs", "1", "--batch-size", "16", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{len(seen)} image(s)" in printed and "feedback-train only" in printed
    splits = json.loads((out / "splits.json").read_text())
    assert seen <= set(splits["train"])
    assert not seen & (set(splits["val"]) | set(splits["test"]))
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["n_seen_by_base_model"] == len(seen)


def test_validation_is_deconfounded_where_the_feedback_marks_ignore_regions(tiny_data):
    from feedbackcam.simulate import deconfounded

    pool = tiny_data.feedback
    assert pool.has_ignore.any() and not pool.has_ignore.all()
    filled = deconfounded(pool)
    changed = (filled.images != pool.images).any(axis=3)
    assert changed.any(axis=(1, 2))[pool.has_ignore].all()  # every marked image is cleaned
    assert not changed[~(pool.ignore > 0)].any()  # and nothing outside the marked regions
    plain = pool.subset(np.flatnonzero(~pool.has_ignore))
    assert deconfounded(plain) is plain or not (deconfounded(plain).images != plain.images).any()


def test_a_validation_set_too_small_for_the_guard_is_said_with_the_images_it_needs():
    from feedbackcam.selection import images_needed, validation_warnings

    need = images_needed(0.05)
    assert need == 217  # 0.2 * (1.645 / 0.05)^2: the 95 % bound of a paired change
    classes = ("NV", "MEL", "BKL")
    small = np.repeat([0, 1, 2], [300, 19, 250])
    (warning,) = validation_warnings(small, classes, 0.05)
    assert "MEL 19" in warning and str(need) in warning and "NV" not in warning
    assert validation_warnings(np.repeat([0, 1, 2], need), classes, 0.05) == []
    assert validation_warnings(small, classes, None) == []  # no guard, nothing to judge
    # a wider tolerance needs fewer images
    assert validation_warnings(small, classes, 0.2) == []


def _summary(labels, pred):
    from feedbackcam.metrics import classification_metrics

    m = classification_metrics(labels, np.eye(3)[pred], ["NV", "MEL", "BKL"])
    return {
        "avg_sensitivity": m.avg_sensitivity,
        "sensitivity": m.sensitivity(),
        "specificity": {c: v.specificity for c, v in m.per_class.items()},
    }


def test_youdens_j_per_class_tells_a_repair_from_a_class_traded_away():
    """A shortcut made NV absorb melanomas; the repair lowers NV's sensitivity while NV stops
    taking them: its Youden's J against the rest rises. A class traded away loses sensitivity
    with no specificity to gain. Sensitivity alone refuses both."""
    labels = np.repeat([0, 1, 2], [300, 100, 100])
    shortcut = labels.copy()
    shortcut[300:390] = 0  # 90 of 100 melanomas called NV
    repaired = labels.copy()
    repaired[:40] = 1  # NV 0.87: 40 nevi now go to MEL ...
    repaired[300:330] = 0  # ... and only 30 melanomas to NV
    before, after = _summary(labels, shortcut), _summary(labels, repaired)
    assert [d.name for d in drops(before, after, 0.05, per_class=True)] == ["sensitivity NV"]
    assert drops(before, after, 0.05, per_class=True, measure="youden") == []
    scores = class_scores(after, "youden")
    assert scores["NV"] == pytest.approx(260 / 300 + 170 / 200 - 1)
    traded = labels.copy()
    traded[300:370] = 0  # from a model that found melanoma: 70 of them now NV
    lost = drops(
        _summary(labels, labels), _summary(labels, traded), 0.05, per_class=True, measure="youden"
    )
    assert "Youden's J MEL" in [d.name for d in lost]
    # a summary without specificities (kept from before they were recorded) has no such score
    assert class_scores({"sensitivity": {"NV": 0.9}}, "youden") == {}


def test_noise_margins_of_youdens_j_add_the_two_paired_changes():
    labels = np.repeat([0, 1], [80, 20])
    ref, cand = labels.copy(), labels.copy()
    cand[80:84] = 0  # 4 of 20 class-1 images wrong now: class 0's specificity falls too
    cand[:2] = 1  # 2 of 80 class-0 images wrong
    m = noise_margins(labels, ref, cand, ["a", "b"])
    var_b = (4 - 16 / 20) / 20**2  # class b's sensitivity (McNemar)
    var_not_b = (2 - 4 / 80) / 80**2  # class b's specificity, on the class-a images
    z = 1.6448536
    assert m["Youden's J b"] == pytest.approx(z * np.sqrt(var_b + var_not_b))
    ind = independent_margins({"b": 0.5}, {"a": 80, "b": 20}, specificity={"b": 0.9})
    assert ind["Youden's J b"] == pytest.approx(z * np.sqrt(2 * (0.25 / 20 + 0.09 / 80)))
    assert "Youden's J b" not in independent_margins({"b": 0.5}, {"a": 80, "b": 20})


def test_the_per_class_guard_is_the_default_of_simulate_and_the_app_and_can_be_turned_off():
    from feedbackcam.cli import build_parser
    from feedbackcam.service.settings import Settings

    parser = build_parser()
    assert SimulationConfig().guard_per_class and Settings().gate_per_class
    sim = parser.parse_args(["simulate", "--out", "x"])
    assert sim.guard_per_class and sim.guard_class_measure == "youden"
    sim = parser.parse_args(["simulate", "--out", "x", "--no-guard-per-class"])
    assert not sim.guard_per_class
    sim = parser.parse_args(["simulate", "--out", "x", "--guard-class-measure", "sensitivity"])
    assert sim.guard_class_measure == "sensitivity"
    assert parser.parse_args(["serve"]).gate_per_class
    assert not parser.parse_args(["serve", "--no-gate-per-class"]).gate_per_class
    bench = parser.parse_args(["shortcuts", "out", "--guard-measure", "sensitivity"])
    assert bench.guard_measure == "sensitivity"
    with pytest.raises(ValueError, match="guard_measure"):
        BenchConfig(guard_measure="f1")


def test_a_class_found_by_what_was_marked_is_said_in_the_run_warnings(magenta):
    """simulate's test summary compares, per class, its marked images as they are and with the
    mark filled; a class recognised only with the mark is named in the run's warnings, a model
    that does not read the mark gets no such warning, and the rule needs enough images."""
    from feedbackcam.data.dataset import ArrayDataset
    from feedbackcam.reliance import marked_class_reliance

    n, size = 12, 16
    rng = np.random.default_rng(0)
    images = np.clip(np.array([205, 150, 125]) + rng.normal(0, 4, (n, size, size, 3)), 0, 255)
    images = images.astype(np.uint8)
    ignore = np.zeros((n, size, size), np.uint8)
    labels = np.array([0] * 6 + [1] * 6)
    marked = np.arange(n) < 8  # the six class-0 images and two class-1 images carry the patch
    ignore[marked, 1:6, 1:6] = 1
    images[ignore.astype(bool)] = [230, 50, 210]
    test = ArrayDataset(
        images=images,
        masks=np.ones((n, size, size), np.uint8),
        labels=labels,
        has_mask=np.ones(n, bool),
        ids=tuple(str(i) for i in range(n)),
        classes=("MEL", "NV"),
        ignore=ignore,
        has_ignore=np.ones(n, bool),
    )
    cfg = SimulationConfig()
    reader = simulate._test_summary(magenta(1.0, 2), test, {}, cfg, "gradcam")
    assert reader["marks_filled"] == {
        "MEL": {"n_marked": 6, "recognised": 6, "recognised_filled": 0, "only_with_mark": 6},
        "NV": {"n_marked": 2, "recognised": 0, "recognised_filled": 2, "only_with_mark": 0},
    }
    said = [w for w in run_warnings(reader) if "found by what was marked" in w]
    assert len(said) == 1 and said[0].startswith("class MEL: 6 of its 6 test images")
    blind = simulate._test_summary(magenta(0.0, 2), test, {}, cfg, "gradcam")
    assert not [w for w in run_warnings(blind) if "found by what was marked" in w]
    # too few images to say it: two of two
    few = marked_class_reliance(labels[4:], marked[4:], labels[4:], 1 - labels[4:], ("MEL", "NV"))
    assert few["MEL"]["only_with_mark"] == 2
    assert not run_warnings({"marks_filled": few})
    unmarked = simulate._test_summary(
        magenta(1.0, 2), test.subset(np.arange(8, n)), {}, cfg, "gradcam"
    )
    assert "marks_filled" not in unmarked
