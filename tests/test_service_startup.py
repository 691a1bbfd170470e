"""Starting the app and changing its version cannot wedge it: a model is checked before it is
registered, every activation verifies the checkpoint's SHA-256, ``feedbackcam doctor`` repairs the
store, and the CLI answers user errors with one line and no traceback."""

from __future__ import annotations

import logging
import os
import stat
import time

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select
from test_service_api import (  # noqa: F401  (assets is a fixture)
    SIZE,
    Env,
    assets,
    other_class,
    predict_upload,
    send_feedback,
)

from feedbackcam.checkpoint import ModelSpec, save_checkpoint
from feedbackcam.cli import main
from feedbackcam.data.synth import CLASSES
from feedbackcam.models import build_model
from feedbackcam.service import Settings, create_app
from feedbackcam.service import worker as worker_module
from feedbackcam.service.db import Current, User, Version, connect, set_current
from feedbackcam.service.registry import Registry
from feedbackcam.service.startup import StartupError
from feedbackcam.service.store import Store, file_sha256


def tiny_checkpoint(path, *, classes=CLASSES, size=SIZE, seed=1):
    torch.manual_seed(seed)
    model = build_model("small_cnn", len(classes), width=8)
    spec = ModelSpec("small_cnn", tuple(classes), model.layers, size, {"width": 8})
    return save_checkpoint(path, model, spec)


def state(env) -> tuple[list, int | None]:
    """(every version's id/status/sha256, the current version's id)."""
    with env.sessions() as session:
        rows = session.execute(select(Version.id, Version.status, Version.sha256)).all()
        current = session.get(Current, 1)
        return [tuple(r) for r in rows], current.version_id if current else None


def add_fine_tuned(env, seed=5) -> int:
    """A promoted child of version 1 in the store, made current (as an update would)."""
    path = tiny_checkpoint(env.data / "checkpoints" / f"v-{seed}.pt", seed=seed)
    with env.sessions() as session:
        version = Version(
            path=f"checkpoints/{path.name}",
            sha256=file_sha256(path),
            parent_id=1,
            status="promoted",
            reason="test",
        )
        session.add(version)
        session.flush()
        set_current(session, version)
        session.commit()
        return version.id


def flip_bytes(path) -> None:
    data = bytearray(path.read_bytes())
    data[-300] ^= 0xFF
    data[-301] ^= 0x0F
    path.write_bytes(bytes(data))


def open_registry(env, checkpoint) -> Registry:
    return Registry(env.sessions, Store(env.data)).open(checkpoint)


@pytest.fixture
def started(tmp_path, assets):  # noqa: F811
    """An env whose store has version 1 (the tiny model) registered and current."""
    env = Env(tmp_path, assets, worker=False)
    with env.app():
        pass
    yield env
    env.engine.dispose()


# ------------------------------------------------------------------ a new --model is checked first
@pytest.mark.parametrize(
    "kind, words",
    [
        ("other classes", "other classes"),
        ("same classes, other order", "another order"),
        ("other input size", "input size"),
        ("truncated", "not a readable checkpoint"),
        ("random bytes", "not a readable checkpoint"),
    ],
)
def test_a_bad_startup_model_changes_nothing_and_says_why_in_one_line(started, kind, words):
    env, bad = started, started.data.parent / "bad.pt"
    fine_tuned = add_fine_tuned(env)
    if kind == "other classes":
        tiny_checkpoint(bad, classes=("cat", "dog", "eel"))
    elif kind == "same classes, other order":
        tiny_checkpoint(bad, classes=tuple(reversed(CLASSES)))
    elif kind == "other input size":
        tiny_checkpoint(bad, size=SIZE * 2)
    elif kind == "truncated":
        data = tiny_checkpoint(bad, seed=9).read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_bytes(os.urandom(5000))
    before = state(env)
    with pytest.raises(StartupError, match=words) as caught:
        open_registry(env, bad)
    message = str(caught.value)
    assert "\n" not in message and str(bad) in message
    assert f"version {fine_tuned} stays current" in message
    assert state(env) == before
    # the original model and the fine-tuned version still start
    assert open_registry(env, env.assets["checkpoint"]).version_id == fine_tuned


def test_a_good_new_model_is_registered_and_served(started):
    new = tiny_checkpoint(started.data.parent / "new.pt", seed=3)
    served = open_registry(started, new)
    versions, current = state(started)
    assert served.version_id == current == 2
    assert versions[-1] == (2, "promoted", file_sha256(new))


def test_a_known_model_with_no_current_version_is_made_current_not_registered_again(started):
    with started.sessions() as session:
        session.delete(session.get(Current, 1))
        session.commit()
    before = state(started)[0]
    assert open_registry(started, started.assets["checkpoint"]).version_id == 1
    assert state(started) == (before, 1)


# ------------------------------------------------------------------ hashes at every activation
def test_a_damaged_current_checkpoint_refuses_to_start_and_names_the_last_good_version(
    started, capsys
):
    fine_tuned = add_fine_tuned(started)
    flip_bytes(started.data / "checkpoints" / f"v-{5}.pt")
    before = state(started)
    with pytest.raises(StartupError) as caught:
        open_registry(started, started.assets["checkpoint"])
    message = str(caught.value)
    assert f"version {fine_tuned}" in message and "SHA-256" in message
    assert "last good version is 1" in message and "\n" not in message
    assert state(started) == before

    # doctor finds it and, with --repair, makes version 1 current again
    data = ["doctor", "--data-dir", str(started.data)]
    assert main(data) == 1
    assert main([*data, "--repair"]) == 0
    assert state(started)[1] == 1
    capsys.readouterr()
    assert main(data) == 0
    assert "note      version 2: cannot be activated" in capsys.readouterr().out
    assert open_registry(started, started.assets["checkpoint"]).version_id == 1


def test_doctor_never_brings_back_a_version_an_admin_rolled_away_from(started, capsys):
    rolled_away = add_fine_tuned(started, seed=5)  # v2, child of v1: the admin went back to v1
    with started.sessions() as session:
        set_current(session, session.get(Version, 1))
        session.commit()
    later = add_fine_tuned(started, seed=6)  # v3, learnt from v1 after the rollback, current
    assert rolled_away < later
    flip_bytes(started.data / "checkpoints" / "v-6.pt")  # v3's file is damaged
    assert main(["doctor", "--data-dir", str(started.data), "--repair"]) == 0
    assert state(started)[1] == 1, "doctor made the rolled-away version current"
    assert "version 1, the last good one" in capsys.readouterr().out


def test_rollback_to_a_tampered_version_is_refused_with_the_last_good_version(started):
    fine_tuned = add_fine_tuned(started)
    replacement = tiny_checkpoint(started.data.parent / "swap.pt", seed=11)
    with started.app() as client:
        r = client.post("/api/versions/1/activate?confirm=true", headers=started.auth("admin"))
        assert r.status_code == 200
        # version 2's file is swapped for another valid checkpoint: same format, other weights
        (started.data / "checkpoints" / "v-5.pt").write_bytes(replacement.read_bytes())
        r = client.post(
            f"/api/versions/{fine_tuned}/activate?confirm=true", headers=started.auth("admin")
        )
        assert r.status_code == 409, r.text
        assert "SHA-256" in r.json()["detail"] and "last good version is 1" in r.json()["detail"]
        assert predict_upload(client, started)["version"] == 1
    assert state(started)[1] == 1


def test_a_promotion_whose_file_does_not_load_back_keeps_the_current_version(started, monkeypatch):
    real = worker_module.save_checkpoint

    def damaged(path, *args, **kwargs):
        real(path, *args, **kwargs)
        path.write_bytes(path.read_bytes()[:1000])

    monkeypatch.setattr(worker_module, "save_checkpoint", damaged)
    with started.app(worker=True) as client:
        p = predict_upload(client, started)
        send_feedback(client, started, p, label=other_class(p))
        client.post("/api/update", headers=started.auth("admin"))
        for _ in range(400):
            status = client.get("/api/update/status", headers=started.auth("viewer")).json()
            if status["last_error"]:
                break
            time.sleep(0.05)
        assert "does not load back" in status["last_error"]
        assert status["current_version"] == 1 and status["pending"] == 1
    assert list((started.data / "checkpoints").glob("v0002*")) == []


# ------------------------------------------------------------------ doctor
def test_doctor_repairs_interrupted_candidates_orphans_and_temp_files(started, capsys):
    with started.sessions() as session:
        session.add(Version(status="candidate", parent_id=1, reason="left by a crash"))
        session.commit()
    orphan = tiny_checkpoint(started.data / "checkpoints" / "v0009-abc.pt")
    temp = started.data / "images" / ".x.png.1234.tmp"
    temp.write_bytes(b"half")
    args = ["doctor", "--data-dir", str(started.data)]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "unfinished update candidate(s) [2]" in out and "v0009-abc.pt" in out
    assert main([*args, "--repair"]) == 0
    assert not orphan.exists() and (orphan.parent / "orphans" / orphan.name).is_file()
    assert not temp.exists()
    assert state(started)[0][1][1] == "rejected"
    assert main(args) == 0


# ------------------------------------------------------------------ CLI user errors
def _one_line_error(capsys, words: str) -> None:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], captured.err


@pytest.mark.parametrize("kind", ["missing", "random"])
def test_serve_with_a_bad_model_prints_one_line_and_creates_no_admin(tmp_path, capsys, kind):
    model = tmp_path / "model.pt"
    if kind == "random":
        model.write_bytes(os.urandom(3000))
    data = tmp_path / "data"
    assert main(["serve", "--model", str(model), "--data-dir", str(data)]) == 2
    _one_line_error(capsys, str(model))
    engine, sessions = connect(Settings(data_dir=data).database_url)
    with sessions() as session:
        assert session.scalars(select(User)).all() == []
        assert session.scalars(select(Version)).all() == []
    engine.dispose()


def test_cli_user_errors_print_no_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as code:
        main(["serve", "--port", "99999"])
    assert code.value.code == 2 and "port" in capsys.readouterr().err
    url = "postgresql://someone:secret@127.0.0.1:1/nowhere"
    assert main(["users", "list", "--db", url]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "secret" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    existing = tmp_path / "out"
    existing.write_text("a file")
    (tmp_path / "root").mkdir()
    assert main(["data", "prepare", str(tmp_path / "root"), "--out", str(existing)]) == 2
    _one_line_error(capsys, "--out")


def test_the_first_admin_token_never_goes_through_logging(tmp_path, assets, capsys, caplog):  # noqa: F811
    env = Env(tmp_path, assets, worker=False)
    data = tmp_path / "fresh"
    caplog.set_level(logging.DEBUG)
    settings = Settings(data_dir=data, model=assets["checkpoint"], worker=False)
    with TestClient(create_app(settings)) as client:
        token_file = data / "admin-token.txt"  # stdout is not a terminal under pytest
        token = token_file.read_text().strip()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        me = client.get("/api/me", headers={"Authorization": f"Bearer {token}"})
        assert me.json() == {"name": "admin", "role": "admin", "expires": None}
    out = capsys.readouterr()
    assert token not in out.out + out.err and str(token_file) in out.out
    assert all(token not in record.getMessage() for record in caplog.records)
    env.engine.dispose()
