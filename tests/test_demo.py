"""`feedbackcam demo --quick`, end to end, as a newcomer runs it."""

import json

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
    assert set(results["runs"]) == {"cls", "exp", "combined"}
    assert set(results["baseline"]) >= RUN_KEYS
    for run in results["runs"].values():
        assert RUN_KEYS | {"best_epoch"} <= set(run)
        assert set(run["sensitivity"]) == {"NV", "MEL", "BKL"}
    base = results["baseline"]["jaccard_mean"]
    assert results["runs"]["exp"]["jaccard_mean"] > base
    assert results["runs"]["combined"]["jaccard_mean"] > base
    config = json.loads((out / "config.json").read_text())
    assert config["simulation"]["modes"] == ["cls", "exp", "combined"]
