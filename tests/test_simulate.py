import json
import math

import numpy as np
import pytest
import torch

from feedbackcam import simulate
from feedbackcam.checkpoint import ModelSpec, load_checkpoint
from feedbackcam.models import build_model
from feedbackcam.simulate import SimulationConfig, run_simulation
from feedbackcam.simulation_data import SynthSetup, synth_simulation_data

SPEC = ModelSpec("small_cnn", ("NV", "MEL", "BKL"), ("features.relu4",), 32, {"width": 8})
RUN_KEYS = {"accuracy", "avg_sensitivity", "sensitivity", "jaccard_mean", "jaccard_sd", "n_test"}


def _make_model():
    torch.manual_seed(0)
    return build_model("small_cnn", 3, width=8)


@pytest.fixture(scope="module")
def tiny_data():
    data, _ = synth_simulation_data(SynthSetup(size=32, n_base=60, n_feedback=80))
    return data


def _cfg(**kw):
    base = dict(epochs=2, batch_size=8, optimizer="adam", lr=1e-3, base_epochs=1)
    return SimulationConfig(**(base | kw))


def test_full_simulation_writes_every_output(tmp_path, tiny_data):
    results = run_simulation(
        tiny_data,
        _cfg(modes=("cls", "exp")),
        tmp_path,
        make_model=_make_model,
        spec=SPEC,
        progress=False,
    )
    for name in [
        "config.json",
        "history.csv",
        "results.json",
        "results.md",
        "splits.json",
        "loss.png",
        "accuracy.png",
        "jaccard.png",
        "checkpoints/baseline.pt",
        "checkpoints/cls.pt",
        "checkpoints/exp.pt",
    ]:
        assert (tmp_path / name).is_file(), name
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk) == {"baseline", "runs"} and set(on_disk["runs"]) == {"cls", "exp"}
    assert set(on_disk["baseline"]) >= RUN_KEYS
    for run in on_disk["runs"].values():
        assert RUN_KEYS | {"best_epoch"} <= set(run)
        assert set(run["sensitivity"]) == {"NV", "MEL", "BKL"}
        assert run["n_test"] == 8
    assert results["runs"]["cls"]["best_epoch"] in (0, 1, 2)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["simulation"]["modes"] == ["cls", "exp"]
    assert config["data"]["split_sizes"] == {"train": 64, "train_balanced": 64, "val": 8, "test": 8}
    history = (tmp_path / "history.csv").read_text().strip().splitlines()
    assert len(history) == 1 + 2 * (1 + 2)  # header + (epoch 0 + epochs) x modes
    # every class's validation sensitivity and specificity, to replay either per-class guard
    header = history[0].split(",")
    for c in ("NV", "MEL", "BKL"):
        assert f"val_sensitivity {c}" in header and f"val_specificity {c}" in header
    model, spec, _ = load_checkpoint(tmp_path / "checkpoints" / "exp.pt")
    assert spec == SPEC
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert not set(splits["test"]) & set(splits["train"])
    assert "| Accuracy [95 % CI] |" in (tmp_path / "results.md").read_text()


def test_sliced_simulation_reports_every_slice(tmp_path, tiny_data):
    results = run_simulation(
        tiny_data,
        _cfg(modes=("exp",), slices=3, slice_epochs=1),
        tmp_path,
        make_model=_make_model,
        spec=SPEC,
        progress=False,
    )
    rows = results["runs"]["exp"]["slices"]
    assert [r["slice"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"slice", "mode", "accuracy", "avg_sensitivity", "jaccard_mean"}
    assert (tmp_path / "slices.png").is_file()


def test_a_trained_baseline_can_be_given_instead_of_a_base_set(tmp_path, tiny_data):
    data = simulate.SimulationData(feedback=tiny_data.feedback)
    with pytest.raises(ValueError, match="baseline"):
        run_simulation(
            data, _cfg(modes=("cls",)), tmp_path, make_model=_make_model, spec=SPEC, progress=False
        )
    results = run_simulation(
        data,
        _cfg(modes=("cls",), epochs=1),
        tmp_path,
        make_model=_make_model,
        spec=SPEC,
        baseline=_make_model(),
        progress=False,
    )
    assert "cls" in results["runs"]


class _FakeEval:
    def __init__(self, jaccard, accuracy):
        self.jaccard = type("J", (), {"mean": jaccard})()
        self.classification = type(
            "C", (), {"accuracy": accuracy, "avg_sensitivity": 0.5, "per_class": {}}
        )()

    def summary(self, **_):
        return {"accuracy": self.classification.accuracy, "avg_sensitivity": 0.5}


@pytest.mark.parametrize(("select_by", "expected"), [("jaccard", 2), ("accuracy", 3)])
def test_best_epoch_is_chosen_by_validation_and_its_weights_are_returned(
    monkeypatch, tiny_data, select_by, expected
):
    # val scores for epochs 0 (the incoming model), 1, 2, 3
    jaccards = iter([0.1, 0.3, 0.5, 0.2])
    accuracies = iter([0.5, 0.4, 0.6, 0.9])
    snapshots = []  # the weights each validation saw (after the epoch's offset re-fit)

    def fake_evaluate(model, *a, **k):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return _FakeEval(next(jaccards), next(accuracies))

    monkeypatch.setattr(simulate, "evaluate", fake_evaluate)
    cfg = _cfg(select_by=select_by, guard_confidence=None)  # fakes: no per-image predictions
    history = []
    model, best_epoch, _ = simulate.fine_tune(
        _make_model(),
        tiny_data.feedback.tensors(),
        np.arange(40),
        tiny_data.feedback.subset(range(40, 50)),
        cfg,
        "combined",
        epochs=3,
        generator=torch.Generator(),
        history=history,
        stage={"slice": 0},
    )
    assert best_epoch == expected
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshots[expected][k])
    assert [row["epoch"] for row in history] == [0, 1, 2, 3]


def test_incoming_model_is_kept_when_no_epoch_improves(monkeypatch, tiny_data):
    scores = iter([0.9, 0.1, 0.2])
    monkeypatch.setattr(simulate, "evaluate", lambda *a, **k: _FakeEval(next(scores), 0.5))
    start = _make_model()
    model, best_epoch, _ = simulate.fine_tune(
        start,
        tiny_data.feedback.tensors(),
        np.arange(40),
        tiny_data.feedback.subset(range(40, 50)),
        _cfg(guard_confidence=None),
        "exp",
        epochs=2,
        generator=torch.Generator(),
        history=[],
        stage={},
    )
    assert best_epoch == 0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, start.state_dict()[k])


def test_config_validation():
    with pytest.raises(ValueError, match="modes"):
        SimulationConfig(modes=("cls", "both"))
    with pytest.raises(ValueError, match="balance"):
        SimulationConfig(balance="oversample")
    with pytest.raises(ValueError, match="epochs"):
        SimulationConfig(epochs=0)
    with pytest.raises(ValueError, match="guard_class_measure"):
        SimulationConfig(guard_class_measure="f1")


def test_ignore_feedback_trains_with_calibrated_scales_and_they_are_recorded(tmp_path, tiny_data):
    """SynthDerm's feedback carries ignore masks (the patch): by default the winner of the
    shortcut benchmark learns from them, at a scale calibrated before the first step; the
    scales reach results.json, history.csv and the checkpoint's config. Without ignore masks
    (the thesis' data) the ignore term stays out and its scale is 1."""
    from feedbackcam.objective import FeedbackConfig

    cfg = _cfg(modes=("combined",), feedback=FeedbackConfig(lam=0.5, auto_scale=True))
    results = run_simulation(
        tiny_data, cfg, tmp_path / "ign", make_model=_make_model, spec=SPEC, progress=False
    )
    run = results["runs"]["combined"]
    assert run["ignore_scale"] != 1.0 and run["loss_scale"] != 1.0
    _, _, payload = load_checkpoint(tmp_path / "ign" / "checkpoints" / "combined.pt")
    fb = payload["config"]["feedback"]
    assert fb["ignore_scale"] == run["ignore_scale"] and fb["loss_scale"] == run["loss_scale"]
    assert "ignore_scale" in (tmp_path / "ign" / "history.csv").read_text().splitlines()[0]
    from dataclasses import replace

    no_ignore = simulate.SimulationData(
        feedback=replace(tiny_data.feedback, ignore=None, has_ignore=None),
        base=tiny_data.base,
    )
    plain = run_simulation(
        no_ignore,
        _cfg(modes=("combined",), feedback=FeedbackConfig(lam=0.5)),
        tmp_path / "plain",
        make_model=_make_model,
        spec=SPEC,
        progress=False,
    )
    assert plain["runs"]["combined"]["ignore_scale"] == 1.0
    assert plain["runs"]["combined"]["loss_scale"] == 1.0


def test_offsets_are_re_fit_after_each_epoch_of_a_mode_that_learns_from_ignore_regions(
    tmp_path, tiny_data, monkeypatch
):
    """With refit_bias, combined feedback on SynthDerm (ignore masks on the patch) re-fits the
    decision's offsets on feedback-train after every epoch, before validating, and trains on
    from the offsets the epoch left; class feedback does not re-fit, nor does anything without
    ignore masks or with refit_bias off (the default)."""
    from dataclasses import replace

    from feedbackcam.decision import head
    from feedbackcam.decision import refit_bias as real_refit
    from feedbackcam.objective import FeedbackConfig

    calls = []

    def spy(model, data, *, index=None, class_weights=None):
        before = head(model).bias.detach().clone()
        calls.append((len(index), class_weights, before))
        return real_refit(model, data, index=index, class_weights=class_weights)

    monkeypatch.setattr(simulate, "refit_bias", spy)
    cfg = _cfg(modes=("cls", "combined"), feedback=FeedbackConfig(refit_bias=True))
    quiet = {"make_model": _make_model, "spec": SPEC, "progress": False}
    run_simulation(tiny_data, cfg, tmp_path / "a", **quiet)
    splits = json.loads((tmp_path / "a" / "splits.json").read_text())
    assert len(calls) == cfg.epochs  # combined only, once per epoch
    assert {n for n, _, _ in calls} == {len(splits["train"])}
    assert all(w is not None for _, w, _ in calls)  # the fine-tuning's class weights
    # epoch 2 started from epoch 1's own offsets (restored after judging), not the re-fit ones:
    # Adam moves a bias by at most ~lr a step, far less than the re-fit moved it
    steps = math.ceil(len(splits["train"]) / cfg.batch_size)
    assert (calls[1][2] - calls[0][2]).abs().max() <= 1.5 * cfg.lr * steps
    calls.clear()
    assert FeedbackConfig().refit_bias is False
    off = replace(cfg, feedback=FeedbackConfig())
    run_simulation(tiny_data, off, tmp_path / "b", **quiet)
    no_ignore = simulate.SimulationData(
        feedback=replace(tiny_data.feedback, ignore=None, has_ignore=None), base=tiny_data.base
    )
    run_simulation(
        no_ignore, cfg, tmp_path / "c", make_model=_make_model, spec=SPEC, progress=False
    )
    assert calls == []


def test_a_mode_runs_the_same_whatever_ran_before_it_and_for_how_long(tmp_path, tiny_data):
    """The counterfactual rows draw from the global generator; each mode starts from the same
    state, so a mode's run does not depend on the modes before it or their epoch count, and a
    k-epoch run is the first k epochs of a longer one (choosing the epoch count on validation
    curves means something)."""
    from feedbackcam.objective import FeedbackConfig

    fb = FeedbackConfig(lam=0.5, auto_scale=True)

    def rows(name, **kw):
        run_simulation(
            tiny_data,
            _cfg(feedback=fb, **kw),
            tmp_path / name,
            make_model=_make_model,
            spec=SPEC,
            progress=False,
        )
        lines = (tmp_path / name / "history.csv").read_text().splitlines()
        return [line for line in lines[1:] if line.split(",")[0] == "combined"]

    alone = rows("alone", modes=("combined",))
    after = rows("after", modes=("exp", "combined"))
    longer = rows("longer", modes=("exp", "combined"), epochs=3)
    assert alone == after
    assert longer[: len(after)] == after and len(longer) == len(after) + 1
