"""One source of truth: the CAM that trains is the CAM that selects and reports, registries that
cannot fall through, one lambda per saved config, readable outputs, dependencies that point
down."""

from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from feedbackcam import evaluate as evaluate_module
from feedbackcam import fileio, losses, simulate
from feedbackcam.cam import CAM_METHODS
from feedbackcam.checkpoint import ModelSpec, load_checkpoint
from feedbackcam.models import build_model
from feedbackcam.objective import FeedbackConfig
from feedbackcam.simulate import SimulationConfig, run_simulation
from feedbackcam.simulation_data import SynthSetup, synth_simulation_data
from feedbackcam.train import feedback_step

SPEC = ModelSpec("small_cnn", ("NV", "MEL", "BKL"), ("features.relu4",), 32, {"width": 8})
PACKAGE = Path(__file__).resolve().parents[1] / "feedbackcam"


@pytest.fixture(scope="module")
def tiny_data():
    data, _ = synth_simulation_data(SynthSetup(size=32, n_base=60, n_feedback=80))
    return data


def _make_model():
    torch.manual_seed(0)
    return build_model("small_cnn", 3, width=8)


def _cfg(**kw):
    base = dict(epochs=2, batch_size=8, optimizer="adam", lr=1e-3, base_epochs=1)
    return SimulationConfig(**(base | kw))


def test_the_cam_that_trains_is_the_cam_that_selects_and_reports(tmp_path, tiny_data, monkeypatch):
    used = []
    real = evaluate_module.evaluate

    def recording(*args, **kwargs):
        used.append(kwargs.get("method", "gradcam"))
        return real(*args, **kwargs)

    monkeypatch.setattr(simulate, "evaluate", recording)
    fb = FeedbackConfig(lam=0.7, cam="gradcam++")
    results = run_simulation(
        tiny_data,
        _cfg(modes=("exp",), feedback=fb),
        tmp_path,
        make_model=_make_model,
        spec=SPEC,
        progress=False,
    )
    assert used and set(used) == {"gradcam++"}
    # the reported Jaccard is the Grad-CAM++ Jaccard of the saved model on the test split
    model, _, _ = load_checkpoint(tmp_path / "checkpoints" / "exp.pt")
    test_ids = json.loads((tmp_path / "splits.json").read_text())["test"]
    source = tiny_data.test_override
    test = source.subset([source.ids.index(i) for i in test_ids])
    expected = real(model, test, method="gradcam++").jaccard.mean
    assert results["runs"]["exp"]["jaccard_mean"] == pytest.approx(expected)


def test_unknown_or_unwired_losses_and_cams_raise(monkeypatch):
    with pytest.raises(ValueError, match="explanation_loss"):
        FeedbackConfig(explanation_loss="no-such-loss")
    monkeypatch.setitem(losses.EXPLANATION_LOSSES, "unwired", losses.ExplanationLoss(None, "keep"))
    with pytest.raises(ValueError, match="registered but has no loss function"):
        FeedbackConfig(explanation_loss="unwired")
    with pytest.raises(ValueError, match="CAM method"):
        FeedbackConfig(cam="scorecam")
    assert set(CAM_METHODS) >= {"gradcam", "gradcam++"}


def test_a_registered_loss_is_the_loss_that_trains(monkeypatch, toy, tiny_model):
    calls = []

    def constant(inputs, cfg):
        calls.append(cfg.explanation_loss)
        return inputs.logits.sum(dim=1) * 0 + 0.25

    monkeypatch.setitem(
        losses.EXPLANATION_LOSSES, "const", losses.ExplanationLoss(constant, "keep")
    )
    batch = toy(4)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.0)
    cfg = FeedbackConfig.thesis(lam=1.0, explanation_loss="const")
    stats = feedback_step(tiny_model, batch, opt, cfg)
    assert calls == ["const"] and stats["loss_exp"] == pytest.approx(0.25)


def test_an_ignore_loss_without_ignore_masks_names_what_it_needs(monkeypatch, toy, tiny_model):
    monkeypatch.setitem(
        losses.EXPLANATION_LOSSES,
        "needs-ignore",
        losses.ExplanationLoss(lambda x, cfg: x.ignore.sum(dim=(1, 2)), "ignore"),
    )
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.0)
    cfg = FeedbackConfig.thesis(lam=0.5, explanation_loss="needs-ignore")
    with pytest.raises(ValueError, match="needs ignore masks"):
        feedback_step(tiny_model, toy(4), opt, cfg)
    batch = toy(4).with_ignore_slots()
    ignore = batch.ignore.clone()
    ignore[0, :4, :4] = 1
    has = torch.tensor([True, False, False, False])
    stats = feedback_step(tiny_model, batch._replace(ignore=ignore, has_ignore=has), opt, cfg)
    assert stats["n_exp"] == 1 and stats["loss_exp"] == pytest.approx(16.0)


def _lambdas(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "lam":
                yield path + k, v
            yield from _lambdas(v, f"{path}{k}.")


def test_a_saved_config_holds_exactly_one_lambda_and_it_is_the_one_that_ran(tmp_path, tiny_data):
    cfg = _cfg(modes=("cls", "combined"), feedback=FeedbackConfig(lam=0.7))
    run_simulation(tiny_data, cfg, tmp_path, make_model=_make_model, spec=SPEC, progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    assert list(_lambdas(config)) == [("simulation.feedback.lam", 0.7)]
    for mode, ran in [("cls", 0.0), ("combined", 0.7), ("baseline", 0.0)]:
        _, _, payload = load_checkpoint(tmp_path / "checkpoints" / f"{mode}.pt")
        assert [v for _, v in _lambdas(payload["config"])] == [ran], mode


def test_outputs_are_readable_by_group_and_others(tmp_path, tiny_data):
    old = os.umask(0o022)
    try:
        fileio.write_json(tmp_path / "one.json", {"a": 1})
        run_simulation(
            tiny_data,
            _cfg(modes=("cls",), epochs=1),
            tmp_path / "sim",
            make_model=_make_model,
            spec=SPEC,
            progress=False,
        )
    finally:
        os.umask(old)
    for path in [
        tmp_path / "one.json",
        tmp_path / "sim" / "results.json",
        tmp_path / "sim" / "config.json",
        tmp_path / "sim" / "history.csv",
        tmp_path / "sim" / "checkpoints" / "cls.pt",
    ]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & stat.S_IRGRP and mode & stat.S_IROTH, (path, oct(mode))


def test_text_outputs_end_with_a_newline(tmp_path):
    fileio.write_text(tmp_path / "t.md", "| a |")
    assert (tmp_path / "t.md").read_text() == "| a |\n"


def test_an_ignore_loss_adds_to_the_keep_loss_only_where_there_is_ignore_feedback(
    monkeypatch, toy, tiny_model
):
    monkeypatch.setitem(
        losses.EXPLANATION_LOSSES,
        "keep-const",
        losses.ExplanationLoss(lambda x, cfg: x.logits.sum(dim=1) * 0 + 0.5, "keep"),
    )
    monkeypatch.setitem(
        losses.EXPLANATION_LOSSES,
        "ignore-area",
        losses.ExplanationLoss(lambda x, cfg: x.ignore.sum(dim=(1, 2)), "ignore"),
    )
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.0)
    cfg = FeedbackConfig.thesis(lam=1.0, explanation_loss="keep-const", ignore_loss="ignore-area")
    plain = feedback_step(tiny_model, toy(4), opt, cfg)  # no ignore masks: the keep loss alone
    assert plain["loss_exp"] == pytest.approx(0.5)
    batch = toy(4).with_ignore_slots()
    ignore = batch.ignore.clone()
    ignore[1, :2, :3] = 1
    has = torch.tensor([False, True, False, False])
    stats = feedback_step(tiny_model, batch._replace(ignore=ignore, has_ignore=has), opt, cfg)
    assert stats["loss_exp"] == pytest.approx(0.5 + 6.0)
    with pytest.raises(ValueError, match="ignore_loss"):
        FeedbackConfig(ignore_loss="keep-const")


def test_the_shortcut_benchmark_is_a_cli_command(capsys):
    from feedbackcam.cli import main

    with pytest.raises(SystemExit) as done:
        main(["shortcuts", "--help"])
    assert done.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_every_api_endpoint_has_a_docstring():
    missing = []
    for path in sorted((PACKAGE / "service" / "routers").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            routes = [
                d
                for d in getattr(node, "decorator_list", [])
                if isinstance(d, ast.Call)
                and getattr(d.func, "attr", "") in {"get", "post", "put", "patch", "delete"}
            ]
            if routes and not ast.get_docstring(node):
                missing.append(f"{path.name}:{node.name}")
    assert not missing, missing
