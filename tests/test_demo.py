"""`feedbackcam demo --quick`, end to end, as a newcomer runs it."""

import json

import pytest

from feedbackcam.cli import main

RUN_KEYS = {"accuracy", "avg_sensitivity", "sensitivity", "jaccard_mean", "jaccard_sd", "n_test"}


def test_quick_demo_writes_the_report_and_explanation_feedback_beats_the_baseline(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    report = out / "report.html"
    assert str(report.resolve()) in capsys.readouterr().out
    page = report.read_text()
    assert "<table>" in page and page.count("data:image/png;base64,") >= 4
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"baseline", "runs"}
    assert set(results["runs"]) == {"cls", "combined"}  # the quick demo's two modes
    assert set(results["baseline"]) >= RUN_KEYS
    for run in results["runs"].values():
        assert RUN_KEYS | {"best_epoch"} <= set(run)
        assert set(run["sensitivity"]) == {"NV", "MEL", "BKL"}
    # The patch decides many baseline predictions; feedback with the default objective at the
    # product's lambda (the combined mode: the patch marked "not this", the lesion "this")
    # takes that away without giving up a class (the thesis' failure mode).
    base = results["baseline"]["patch_flip_rate"]
    assert base >= 0.3
    fed = results["runs"]["combined"]
    assert fed["patch_flip_rate"] <= 0.5 * base  # issue 21: at most half the baseline's
    assert min(fed["sensitivity"].values()) >= 0.2
    assert (
        fed["groups"]["artifact misleads"]["accuracy"]
        > (results["baseline"]["groups"]["artifact misleads"]["accuracy"])
    )
    assert "Predictions changed by removing the patch" in page
    # every term of the default objective calibrated (lambda is each one's gradient share)
    assert all(
        fed[k] not in (None, 1.0) for k in ("loss_scale", "ignore_scale", "surroundings_scale")
    )
    config = json.loads((out / "config.json").read_text())
    assert config["simulation"]["modes"] == ["cls", "combined"]


def test_demo_refit_bias_reaches_the_simulation(tmp_path, monkeypatch):
    """`demo --refit-bias` asks the simulation's feedback to re-fit the offsets; without it
    the demo learns with the library's default (no re-fit)."""
    import feedbackcam.demo as demo

    seen = []

    class Stop(Exception):
        pass

    def fake_simulation(data, sim, out, **kw):
        seen.append(sim.feedback.refit_bias)
        raise Stop

    monkeypatch.setattr(demo, "run_simulation", fake_simulation)
    monkeypatch.setattr(demo, "synth_simulation_data", lambda setup: (None, None))
    for extra in ([], ["--refit-bias"]):
        with pytest.raises(Stop):
            main(["demo", "--quick", "--out", str(tmp_path / "d"), *extra])
    assert seen == [False, True]
