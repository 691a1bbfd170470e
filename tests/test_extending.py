"""Extending feedbackcam takes one entry in one place: a registered explanation loss appears in
``simulate``, the shortcut benchmark and ``serve`` (and each of them trains with it); a dataset
layout is one reader plus one row of ``data.layouts.LAYOUTS``. The app's updates learn with the
losses ``serve`` was given."""

# ruff: noqa: F811

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_service_api import (  # noqa: F401  (fixtures, passed by name)
    SIZE,
    assets,
    box_mask,
    env,
    png,
    predict_upload,
    wait_used,
)

import feedbackcam.train as train_module
from feedbackcam import losses
from feedbackcam.cli import build_parser, main
from feedbackcam.data.layouts import LAYOUTS, Layout
from feedbackcam.data.records import (
    LABEL_WITHOUT_IMAGE,
    Problems,
    ReadResult,
    Record,
    check_root,
)
from feedbackcam.data.synth import SynthConfig, as_array_dataset, make_synthderm
from feedbackcam.models import build_model
from feedbackcam.objective import FeedbackConfig
from feedbackcam.service.settings import Settings
from feedbackcam.service.update import UpdateConfig, fine_tune, plan_replay
from feedbackcam.shortcuts.config import BenchConfig, default_methods, methods

# ------------------------------------------------------------------ a toy explanation loss


@pytest.fixture
def toy_loss(monkeypatch):
    """A loss registered the way every loss is: one entry in ``losses.EXPLANATION_LOSSES``.
    It counts its calls and asks the model to put no logit mass on the ignore region's share."""
    calls = []

    def toy(inputs, cfg):
        calls.append(len(inputs.labels))
        share = inputs.ignore.flatten(1).mean(1)
        return share * inputs.logits.logsumexp(1).abs()

    entry = losses.ExplanationLoss(toy, "ignore", summary="a toy ignore loss")
    monkeypatch.setitem(losses.EXPLANATION_LOSSES, "toy_ignore", entry)
    return calls


def _patch_pool(n=24, size=32, seed=0):
    return as_array_dataset(
        make_synthderm(
            SynthConfig(n=n, size=size, seed=seed, confounder="patch", confounder_rate=1.0)
        )
    )


def test_a_registered_loss_is_a_choice_of_simulate_the_benchmark_and_serve(toy_loss, tmp_path):
    parser = build_parser()
    simulate = parser.parse_args(["simulate", "--out", "x", "--explanation-loss", "toy_ignore"])
    assert simulate.explanation_loss == "toy_ignore"
    serve = parser.parse_args(["serve", "--ignore-loss", "toy_ignore"])
    assert serve.ignore_loss == "toy_ignore"
    bench = parser.parse_args(["shortcuts", str(tmp_path), "--methods", "toy_ignore"])
    assert bench.methods == ["toy_ignore"]
    assert "toy_ignore" in methods() and "toy_ignore" in default_methods()
    assert "toy_ignore" in BenchConfig().methods  # an ignore loss joins the documented run
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--ignore-loss", "no_such_loss"])


def test_a_registered_loss_trains_in_simulate_the_benchmark_and_the_apps_updates(toy_loss):
    from feedbackcam.shortcuts import Schedule
    from feedbackcam.shortcuts import fine_tune as bench_fine_tune

    pool = _patch_pool()
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, width=8)
    # the benchmark
    bench_fine_tune(model, pool, Schedule(epochs=1, batch=8), "toy_ignore", 0.5, 0)
    assert toy_loss, "the benchmark did not train with the registered loss"
    # the app's update, with the loss serve was given
    toy_loss.clear()
    settings = Settings(feedback=FeedbackConfig(lam=0.5, ignore_loss="toy_ignore"))
    cfg = UpdateConfig.from_settings(settings)
    plan = plan_replay(pool.labels, cfg.steps, 0, np.random.default_rng(0))
    fine_tune(model, pool, None, plan, cfg)
    assert toy_loss, "the app's update did not train with the registered loss"
    # simulate's step (the same objective): its FeedbackConfig accepts and uses it
    toy_loss.clear()
    batch = pool.tensors().batch(torch.arange(8))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_module.feedback_step(model, batch, opt, FeedbackConfig(explanation_loss="toy_ignore"))
    assert toy_loss == [8]


def test_serve_flags_become_the_apps_feedback_config(monkeypatch, tmp_path):
    import uvicorn

    import feedbackcam.service.app as app_module
    import feedbackcam.service.commands as commands

    seen = []
    monkeypatch.setattr(commands, "preflight", lambda settings: None)
    monkeypatch.setattr(app_module, "create_app", seen.append)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    args = ["serve", "--data-dir", str(tmp_path), "--lambda", "0.6", "--cam", "gradcam++"]
    args += ["--explanation-loss", "dice", "--ignore-loss", "rrr_g"]
    assert main(args) == 0
    fb = seen[-1].feedback
    assert (fb.lam, fb.explanation_loss, fb.ignore_loss, fb.cam) == (
        0.6,
        "dice",
        "rrr_g",
        "gradcam++",
    )
    assert main(["serve", "--data-dir", str(tmp_path), "--ignore-loss", "none"]) == 0
    assert seen[-1].feedback.ignore_loss is None and seen[-1].feedback.lam == 0.3
    assert Settings().feedback == FeedbackConfig()  # the app's defaults are the library's


def test_the_apps_update_learns_with_the_losses_it_was_given(env, monkeypatch):
    seen = []
    real_step = train_module.feedback_step

    def recording_step(model, batch, optimizer, cfg, **kw):
        seen.append(cfg)
        return real_step(model, batch, optimizer, cfg, **kw)

    monkeypatch.setattr(train_module, "feedback_step", recording_step)
    chosen = FeedbackConfig(lam=0.6, explanation_loss="dice", ignore_loss="rrr_g", cam="gradcam++")
    ignore = np.zeros((SIZE, SIZE), np.uint8)
    ignore[:, :6] = 255
    with env.app(feedback=chosen) as client:
        status = client.get("/api/update/status", headers=env.auth("admin")).json()
        assert status["learning"] == {
            "lam": 0.6,
            "explanation_loss": "dice",
            "surroundings_loss": "surroundings",
            "ignore_loss": "rrr_g",
            "cam": "gradcam++",
        }
        p = predict_upload(client, env)
        data = {"image_id": p["image_id"], "shown_version": 1, "predicted": p["predicted"]}
        files = {
            "mask": ("m.png", png(box_mask()), "image/png"),
            "ignore_mask": ("i.png", png(ignore), "image/png"),
        }
        sent = client.post("/api/feedback", data=data, files=files, headers=env.auth("clinician"))
        wait_used(client, env, sent.json()["id"])
        version = client.get("/api/versions", headers=env.auth("admin")).json()[0]
    assert seen and {(c.lam, c.explanation_loss, c.ignore_loss, c.cam) for c in seen} == {
        (0.6, "dice", "rrr_g", "gradcam++")
    }
    learned = version["metrics"]["update"]["config"]["feedback"]
    assert (learned["explanation_loss"], learned["ignore_loss"]) == ("dice", "rrr_g")


# ------------------------------------------------------------------ a toy dataset layout


def read_toy(root) -> ReadResult:
    """The toy layout's reader (what a new layout's module holds): ``toy.txt`` lines
    ``<id> <class>`` and ``<id>.png`` images beside it."""
    root = check_root(root)
    problems = Problems()
    lines = (root / "toy.txt").read_text().split("\n")
    labels = dict(line.split() for line in lines if line.strip())
    records = []
    for key, label in labels.items():
        image = root / f"{key}.png"
        if image.is_file():
            records.append(Record(key, image, label, (), "toy"))
        else:
            problems.add(root / "toy.txt", key, LABEL_WITHOUT_IMAGE, f"no image {key}.png")
    classes = tuple(sorted(set(labels.values())))
    return ReadResult(tuple(records), classes, tuple(problems), "toy", root)


def test_a_new_layout_is_one_reader_and_one_table_row(monkeypatch, tmp_path, capsys):
    row = Layout(
        "toy",
        read_toy,
        (),
        False,
        lambda root: (root / "toy.txt").is_file(),
        "toy.txt + <id>.png",
    )
    monkeypatch.setitem(LAYOUTS, "toy", row)
    root = tmp_path / "toy"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / f"t{i}.png")
    (root / "toy.txt").write_text("t0 NV\nt1 MEL\nt2 NV\nt3 MEL\nt4 NV\n")  # t4 has no image
    assert main(["data", "check", str(root)]) == 1  # detected; the missing image is an error
    out = capsys.readouterr().out
    assert "layout toy" in out and "t4" in out
    out_dir = tmp_path / "prepared"
    assert (
        main(
            ["data", "prepare", str(root), "--layout", "toy", "--size", "8"]
            + ["--out", str(out_dir)]
        )
        == 0
    )
    from feedbackcam.data.prepared import load_prepared

    data = load_prepared(out_dir)
    assert data.ids == ("t0", "t1", "t2", "t3") and data.classes == ("MEL", "NV")
    assert data.images.shape == (4, 8, 8, 3)
