"""The feedback app's API: predict, feedback, updates through the gate, rollback, auth, uploads,
and a restart with pending feedback. A tiny small_cnn at 48 px and tiny SynthDerm data."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

import feedbackcam.train as train_module
from feedbackcam.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from feedbackcam.cli import main
from feedbackcam.data.synth import CLASSES, SynthConfig, as_array_dataset, make_synthderm
from feedbackcam.models import build_model
from feedbackcam.objective import FeedbackConfig
from feedbackcam.service import Settings, create_app
from feedbackcam.service import worker as worker_module
from feedbackcam.service.auth import add_user, find_user
from feedbackcam.service.datasets import save_npz
from feedbackcam.service.db import Item, Version, connect
from feedbackcam.service.update import gate, plan_replay

SIZE = 48


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    model = build_model("small_cnn", len(CLASSES), width=8)
    spec = ModelSpec("small_cnn", CLASSES, model.layers, SIZE, {"width": 8})
    checkpoint = save_checkpoint(root / "tiny.pt", model, spec)
    validation = as_array_dataset(make_synthderm(SynthConfig(n=30, size=SIZE, seed=101)))
    images = make_synthderm(SynthConfig(n=6, size=SIZE, seed=7)).images
    return {"checkpoint": checkpoint, "validation": validation, "images": images}


class Env:
    """A data dir with a validation set and one user per role; apps are started on it."""

    def __init__(self, root: Path, assets: dict, **overrides) -> None:
        self.assets = assets
        self.data = root / "data"
        save_npz(self.data / "validation.npz", assets["validation"])
        self.base = dict(
            data_dir=self.data,
            model=assets["checkpoint"],
            bootstrap_admin=False,
            poll_seconds=0.2,
            lr=1e-2,
            tolerance=1.0,
            steps=4,
            grace_seconds=0,  # learn at once (the withdraw window has its own test)
        )
        self.base.update(overrides)
        self.engine, self.sessions = connect(Settings(**self.base).database_url)
        with self.sessions() as session:
            self.tokens = {role: add_user(session, role, role) for role in ("viewer", "clinician")}
            self.tokens["admin"] = add_user(session, "admin", "admin")

    def auth(self, role: str) -> dict:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    @contextmanager
    def app(self, **overrides):
        with TestClient(create_app(Settings(**{**self.base, **overrides}))) as client:
            yield client

    def files(self) -> list[str]:
        return sorted(
            p.relative_to(self.data).as_posix()
            for area in ("images", "masks", "checkpoints")
            for p in (self.data / area).glob("*")
        )

    def count(self, model) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(model))


@pytest.fixture
def env(tmp_path, assets, db_url):  # each test on SQLite and on PostgreSQL (conftest.db_url)
    e = Env(tmp_path, assets, db_url=db_url)
    yield e
    e.engine.dispose()


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def saliency_of(prediction: dict) -> np.ndarray:
    data = base64.b64decode(prediction["saliency_png"].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255


def box_mask(y0=8, y1=30, x0=10, x1=34) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return mask


def predict_upload(client, env, role="clinician", index=0) -> dict:
    files = {"file": ("lesion.png", png(env.assets["images"][index]), "image/png")}
    r = client.post("/api/predict", files=files, headers=env.auth(role))
    assert r.status_code == 200, r.text
    return r.json()


def other_class(prediction: dict) -> str:
    return next(c for c in CLASSES if c != prediction["predicted"])


def send_feedback(client, env, prediction, role="clinician", mask=None, **fields):
    data = {
        "image_id": prediction["image_id"],
        "shown_version": prediction["version"],
        "predicted": prediction["predicted"],
        **fields,
    }
    files = {"mask": ("mask.png", png(mask), "image/png")} if mask is not None else None
    return client.post("/api/feedback", data=data, files=files, headers=env.auth(role))


def wait_used(client, env, item_id: int, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = client.get(f"/api/feedback/{item_id}", headers=env.auth("clinician")).json()
        if item["status"] == "used":
            return item
        time.sleep(0.05)
    raise AssertionError(f"feedback {item_id} was not used within {timeout} s")


# ------------------------------------------------------------------ predict
def test_predict_gives_class_probabilities_saliency_and_version(env):
    with env.app(worker=False) as client:
        p = predict_upload(client, env, role="viewer")
        assert p["version"] == 1 and p["size"] == SIZE
        assert set(p["probabilities"]) == set(CLASSES)
        assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert p["predicted"] == max(p["probabilities"], key=p["probabilities"].get)
        s = saliency_of(p)
        assert s.shape == (SIZE, SIZE) and s.max() == 1.0 and s.min() >= 0
        # the stored image is the model's view of the upload; predicting it by id agrees
        again = client.post(
            "/api/predict", data={"image_id": p["image_id"]}, headers=env.auth("viewer")
        ).json()
        assert again["probabilities"] == pytest.approx(p["probabilities"])
        assert np.array_equal(saliency_of(again), s)
        image = client.get(p["image_url"], headers=env.auth("viewer"))
        assert image.status_code == 200
        assert np.array_equal(
            np.asarray(Image.open(io.BytesIO(image.content))), env.assets["images"][0]
        )
        # a bigger JPEG is decoded and squashed to the input size
        big = Image.fromarray(env.assets["images"][1]).resize((200, 160))
        buf = io.BytesIO()
        big.save(buf, format="JPEG")
        r = client.post(
            "/api/predict", files={"file": ("x.jpg", buf.getvalue())}, headers=env.auth("viewer")
        )
        assert r.status_code == 200 and r.json()["size"] == SIZE
        missing = client.post(
            "/api/predict", data={"image_id": "0" * 64}, headers=env.auth("viewer")
        )
        assert missing.status_code == 404


def test_page_and_openapi_are_served(env):
    with env.app(worker=False) as client:
        page = client.get("/")
        assert page.status_code == 200 and "feedbackcam" in page.text
        assert client.get("/static/app.js").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
        for path in (
            "/api/predict",
            "/api/feedback",
            "/api/versions",
            "/api/versions/{version_id}/activate",
            "/api/update/status",
            "/api/update",
            "/api/gallery",
            "/api/me",
        ):
            assert path in paths
        # the API docs work air-gapped: every script and stylesheet is served by the app
        docs = client.get("/docs")
        assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
        assert docs.status_code == 200 and assets
        for url in assets:
            assert url.startswith("/"), f"/docs loads {url} from elsewhere"
            assert client.get(url).status_code == 200, url


# ------------------------------------------------------------------ feedback
def test_feedback_is_stored_with_all_fields(env):
    with env.app(worker=False) as client:
        p = predict_upload(client, env)
        r = send_feedback(client, env, p, mask=box_mask(), label=other_class(p))
        assert r.status_code == 201, r.text
        item = r.json()
        assert item["user"] == "clinician" and item["label"] == other_class(p)
        assert item["predicted"] == p["predicted"] and item["agree"] is False
        assert item["shown_version"] == 1 and item["status"] == "pending"
        assert item["notes"] == []  # shown the version in use: nothing to say
        assert item["image_id"] == p["image_id"] and item["created"].endswith("+00:00")
        mask = client.get(item["mask_url"], headers=env.auth("clinician"))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(mask.content))), box_mask())
        # agreeing needs no mask; the label is the shown class
        agreed = send_feedback(client, env, p, agree="true", on_conflict="keep_both").json()
        assert agreed["agree"] is True and agreed["label"] == p["predicted"]
        assert agreed["mask_url"] is None
        # the same region as run-length JSON and as a canvas data URL is the same mask
        on = (box_mask() > 0).ravel()
        runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, on.astype(int), -1]) != 0))
        counts = ([0] if on[0] else []) + runs.tolist()
        rle = json.dumps({"size": [SIZE, SIZE], "counts": counts})
        by_rle = send_feedback(client, env, p, mask_rle=rle, on_conflict="keep_both").json()
        url = "data:image/png;base64," + base64.b64encode(png(box_mask())).decode()
        by_b64 = send_feedback(client, env, p, mask_base64=url, on_conflict="keep_both").json()
        assert by_rle["mask_url"] == by_b64["mask_url"] == item["mask_url"]
        assert by_b64["id"] == by_rle["id"]  # the same content again is stored once
        listed = client.get("/api/feedback", headers=env.auth("clinician")).json()
        assert [i["id"] for i in listed] == [3, 2, 1]
        assert client.get("/api/feedback?status=used", headers=env.auth("admin")).json() == []
    with env.sessions() as session:
        row = session.get(Item, item["id"])
        assert row.mask_path and (env.data / row.mask_path).is_file()
        assert (env.data / row.image_path).is_file() and row.shown_version_id == 1


# ------------------------------------------------------------------ learning
def test_update_changes_the_explanation_and_rollback_restores_it(env):
    with env.app() as client:
        before = predict_upload(client, env)
        r = send_feedback(client, env, before, mask=box_mask(), label=other_class(before))
        item = wait_used(client, env, r.json()["id"])
        assert item["update_version"] == 2 and item["update_status"] == "promoted"
        after = predict_upload(client, env)
        assert after["version"] == 2
        assert not np.allclose(saliency_of(after), saliency_of(before), atol=1e-3)
        versions = client.get("/api/versions", headers=env.auth("admin")).json()
        assert [(v["id"], v["status"], v["current"]) for v in versions] == [
            (2, "promoted", True),
            (1, "promoted", False),
        ]
        assert versions[0]["parent"] == 1 and versions[0]["metrics"]["update"]["items"] == [1]
        for key in ("accuracy", "avg_sensitivity", "jaccard_mean"):
            assert key in versions[0]["metrics"] and key in versions[1]["metrics"]
        checkpoints = list((env.data / "checkpoints").glob("v0002-*.pt"))
        assert len(checkpoints) == 1
        # rollback: version 1 answers again, with its own explanation
        r = client.post("/api/versions/1/activate?confirm=true", headers=env.auth("admin"))
        assert r.status_code == 200 and r.json()["current"]
        rolled = predict_upload(client, env)
        assert rolled["version"] == 1
        assert np.array_equal(saliency_of(rolled), saliency_of(before))
        status = client.get("/api/update/status", headers=env.auth("viewer")).json()
        assert status["current_version"] == 1 and status["pending"] == 0
        assert (
            client.post(
                "/api/versions/2/activate?confirm=true", headers=env.auth("admin")
            ).status_code
            == 200
        )
        assert (
            client.post(
                "/api/versions/9/activate?confirm=true", headers=env.auth("admin")
            ).status_code
            == 404
        )
    # a restart serves the version that was current
    with env.app(worker=False) as client:
        assert predict_upload(client, env)["version"] == 2


def test_gate_rejection_keeps_the_current_version_and_records_why(tmp_path, assets):
    env = Env(tmp_path, assets, tolerance=-1.0)  # a candidate must gain 1.0 accuracy: never
    with env.app() as client:
        p = predict_upload(client, env)
        r = send_feedback(client, env, p, mask=box_mask(), label=other_class(p))
        item = wait_used(client, env, r.json()["id"])
        assert item["update_status"] == "rejected"
        assert item["update_reason"].startswith("rejected")
        assert "accuracy" in item["update_reason"] and "below" in item["update_reason"]
        versions = client.get("/api/versions", headers=env.auth("admin")).json()
        assert versions[0]["status"] == "rejected" and not versions[0]["current"]
        assert versions[1]["current"]
        assert predict_upload(client, env)["version"] == 1
        assert list((env.data / "checkpoints").iterdir()) == []
        refused = client.post("/api/versions/2/activate?confirm=true", headers=env.auth("admin"))
        assert refused.status_code == 409 and "rejected" in refused.json()["detail"]
    env.engine.dispose()


def test_updates_never_block_predictions(env, monkeypatch):
    release, entered = threading.Event(), threading.Event()
    real_step = train_module.feedback_step

    def held_step(*args, **kwargs):
        entered.set()
        release.wait(10)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "feedback_step", held_step)
    with env.app() as client:
        p = predict_upload(client, env)
        item_id = send_feedback(client, env, p, label=other_class(p)).json()["id"]
        assert entered.wait(10)
        for _ in range(3):  # the update is stuck in training; predictions still answer
            assert predict_upload(client, env)["version"] == 1
        status = client.get("/api/update/status", headers=env.auth("viewer")).json()
        assert status["running"] and status["candidate"] == 2
        release.set()
        assert wait_used(client, env, item_id)["update_status"] == "promoted"


def test_balanced_replay_draws_every_class_equally():
    labels = np.array([0] * 10 + [1] + [2] * 3)
    plan = plan_replay(labels, steps=5, per_class=4, rng=np.random.default_rng(0))
    assert len(plan) == 5
    for draw in plan:
        assert np.bincount(labels[draw], minlength=3).tolist() == [4, 4, 4]
    assert plan_replay(np.array([], dtype=int), 2, 4, np.random.default_rng(0))[0].size == 0


def test_second_update_replays_earlier_feedback(env):
    with env.app() as client:
        for index in range(2):
            p = predict_upload(client, env, index=index)
            item_id = send_feedback(client, env, p, label=other_class(p)).json()["id"]
            wait_used(client, env, item_id)
        versions = client.get("/api/versions", headers=env.auth("admin")).json()
        updates = [v["metrics"]["update"] for v in versions if v["parent"] is not None]
        assert updates[1]["replay_items"] == 0
        assert updates[0]["replay_items"] == updates[0]["replay_from_feedback"] == 4 * 4


def test_a_replay_set_is_drawn_class_balanced_from_the_first_update(tmp_path, assets):
    env = Env(tmp_path, assets)
    save_npz(env.data / "replay.npz", assets["validation"].subset(range(12)))
    with env.app() as client:
        p = predict_upload(client, env)
        wait_used(client, env, send_feedback(client, env, p, label=other_class(p)).json()["id"])
        update = client.get("/api/versions", headers=env.auth("admin")).json()[0]["metrics"]
        assert update["update"]["replay_items"] == 4 * 4 * len(CLASSES)  # steps x per class
        assert update["update"]["replay_from_feedback"] == 0
    env.engine.dispose()


@pytest.mark.parametrize(
    ("after", "original", "promoted"),
    [
        ({"accuracy": 0.79, "avg_sensitivity": 0.79}, None, True),
        ({"accuracy": 0.77, "avg_sensitivity": 0.80}, None, False),
        ({"accuracy": 0.80, "avg_sensitivity": 0.70}, None, False),
        (
            {"accuracy": 0.79, "avg_sensitivity": 0.79},
            {"accuracy": 0.9, "avg_sensitivity": 0.8},
            False,
        ),
    ],
)
def test_gate(after, original, promoted):
    before = {"accuracy": 0.8, "avg_sensitivity": 0.8}
    ok, reason = gate(before, after, 0.02, original)
    assert ok is promoted and reason.startswith("promoted" if promoted else "rejected")


def _per_class(nv, mel, n=100, mel_to="NV"):
    """The gate's scores of a three-class model on ``n`` validation images per class: NV and
    MEL recognised at the given rates (wrong NV go to BKL, wrong MEL to ``mel_to``), BKL 0.6
    (wrong BKL to NV)."""
    from feedbackcam.metrics import classification_metrics

    names = ["NV", "MEL", "BKL"]
    labels = np.repeat([0, 1, 2], n)
    pred = labels.copy()
    pred[round(nv * n) : n] = 2
    pred[n + round(mel * n) : 2 * n] = names.index(mel_to)
    pred[2 * n + round(0.6 * n) :] = 0
    m = classification_metrics(labels, np.eye(3)[pred], names)
    return {
        "accuracy": m.accuracy,
        "avg_sensitivity": m.avg_sensitivity,
        "sensitivity": m.sensitivity(),
        "specificity": {c: v.specificity for c, v in m.per_class.items()},
        "counts": {c: n for c in names},
    }


def test_the_gate_refuses_an_update_that_trades_a_class_away_while_the_average_holds():
    before = _per_class(0.60, 0.60)
    traded = _per_class(0.95, 0.25)  # the average holds; MEL is lost to NV
    ok, reason = gate(before, traded, 0.02, per_class=True)
    assert not ok and "Youden's J MEL 0.600 -> 0.250" in reason
    assert gate(before, traded, 0.02)[0]  # the averages alone (the default) let it through
    # a small fall, within what chance moves a class by on 100 images, passes
    assert gate(before, _per_class(0.66, 0.54), 0.02, per_class=True)[0]
    # the same fall on 10,000 images per class is beyond chance
    big = _per_class(0.6, 0.6, 10_000), _per_class(0.66, 0.54, 10_000)
    assert not gate(*big, 0.02, per_class=True)[0]
    # scores kept from before the rule (no per-class numbers) compare the averages only
    plain = {"accuracy": 0.6, "avg_sensitivity": 0.6}
    assert gate(plain, traded, 0.02, per_class=True)[0]


def test_the_gate_lets_an_update_repair_a_class_that_absorbed_another():
    """A shortcut made NV take the melanomas (NV 0.98, MEL 0.10); the update that repairs it
    lowers NV's sensitivity while NV stops taking them. Youden's J promotes it; the
    sensitivity alone refuses it."""
    shortcut, repaired = _per_class(0.98, 0.10), _per_class(0.85, 0.60)
    ok, reason = gate(shortcut, repaired, 0.02, per_class=True)
    assert ok, reason
    assert "each class's Youden's J" in reason
    ok, reason = gate(shortcut, repaired, 0.02, per_class=True, measure="sensitivity")
    assert not ok and "sensitivity NV 0.980 -> 0.850" in reason


def test_the_gate_holds_each_class_against_the_original_model_too():
    original, parent = _per_class(0.6, 0.6), _per_class(0.6, 0.45)
    ok, reason = gate(parent, _per_class(0.62, 0.42), 0.02, original, per_class=True)
    assert not ok and "Youden's J MEL 0.600 -> 0.420" in reason


# ------------------------------------------------------------------ auth
def test_auth_refusals_per_role(env):
    with env.app(worker=False) as client:
        for method, path in [
            ("get", "/api/me"),
            ("post", "/api/predict"),
            ("post", "/api/feedback"),
            ("get", "/api/versions"),
            ("get", "/api/gallery"),
        ]:
            r = getattr(client, method)(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert client.get("/api/me", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/api/me", headers=env.auth("viewer")).json() == {
            "name": "viewer",
            "role": "viewer",
            "expires": None,
        }
        p = predict_upload(client, env, role="viewer")
        refused = send_feedback(client, env, p, role="viewer", label=other_class(p))
        assert refused.status_code == 403 and "clinician" in refused.json()["detail"]
        assert client.get("/api/feedback", headers=env.auth("viewer")).status_code == 403
        assert send_feedback(client, env, p, label=other_class(p)).status_code == 201
        for method, path in [
            ("post", "/api/versions/1/activate"),
            ("get", "/api/versions"),
            ("post", "/api/update"),
            ("get", "/api/users"),
        ]:
            r = getattr(client, method)(path, headers=env.auth("clinician"))
            assert r.status_code == 403 and "admin" in r.json()["detail"]
        assert (
            client.post(
                "/api/versions/1/activate?confirm=true", headers=env.auth("admin")
            ).status_code
            == 200
        )
        created = client.post(
            "/api/users", json={"name": "dana", "role": "clinician"}, headers=env.auth("admin")
        )
        assert created.status_code == 201
        dana = {"Authorization": f"Bearer {created.json()['token']}"}
        assert client.get("/api/me", headers=dana).json()["role"] == "clinician"
        dup = client.post(
            "/api/users", json={"name": "dana", "role": "viewer"}, headers=env.auth("admin")
        )
        assert dup.status_code == 409
    with env.sessions() as session:  # only the hash is stored
        assert find_user(session, created.json()["token"]).name == "dana"
        assert find_user(session, "dana") is None


# ------------------------------------------------------------------ bad uploads
def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _noise_png(side: int) -> bytes:
    return png(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))


def _jpeg(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


def _gif(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="GIF")
    return buf.getvalue()


BAD_IMAGES = {
    "not an image": (b"hello, I am a text file" * 10, 415),
    "a GIF named .png": ("gif", 415),
    "truncated PNG": ("truncated", 422),
    "truncated JPEG": ("truncated-jpeg", 422),
    "too many pixels": (png(np.zeros((120, 120, 3), np.uint8)), 413),  # max is 100 x 100
    "a header claiming 10^10 pixels": (_png_header_only(100_000, 100_000), 413),
    "too many bytes": (_noise_png(90), 413),  # about 24 kB; the limit is 20 kB
    "empty": (b"", 422),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_uploads_are_refused_and_nothing_is_written(tmp_path, assets, case):
    env = Env(tmp_path, assets, max_upload_bytes=20_000, max_pixels=100 * 100, worker=False)
    data, status = BAD_IMAGES[case]
    image = assets["images"][0]
    if data == "gif":
        data = _gif(image)
    elif data == "truncated":
        data = png(image)[:-200]
    elif data == "truncated-jpeg":
        data = _jpeg(image)[: len(_jpeg(image)) // 2]
    with env.app() as client:
        before = env.files()
        r = client.post(
            "/api/predict", files={"file": ("x.png", data, "image/png")}, headers=env.auth("viewer")
        )
        assert r.status_code == status, r.text
        assert isinstance(r.json()["detail"], str) and r.json()["detail"].startswith("file")
        assert env.files() == before
    env.engine.dispose()


def test_bad_masks_are_refused_and_nothing_is_written(env):
    with env.app(worker=False) as client:
        p = predict_upload(client, env)
        before, rows = env.files(), env.count(Item)
        small = box_mask()[:40, :40]
        cases = [
            ({"mask": ("m.png", png(small), "image/png")}, {}, 422, "expected 48x48"),
            ({"mask": ("m.png", _jpeg(box_mask()), "image/png")}, {}, 415, "PNG"),
            ({"mask": ("m.png", png(np.zeros((SIZE, SIZE), np.uint8)))}, {}, 422, "empty"),
            ({"mask": ("m.png", png(box_mask())[:-30])}, {}, 422, "damaged"),
            (None, {"mask_rle": json.dumps({"size": [SIZE, SIZE], "counts": [5]})}, 422, "sum"),
            (None, {"mask_rle": "{not json"}, 422, "mask_rle"),
            (None, {"mask_base64": "%%%"}, 422, "base64"),
            (None, {"label": "SCC"}, 422, "label"),
            (None, {"agree": "true", "label": other_class(p)}, 422, "agree"),
            (None, {}, 422, "nothing to learn"),
            (None, {"shown_version": 7, "label": other_class(p)}, 422, "shown_version"),
            (None, {"image_id": "f" * 64, "label": other_class(p)}, 404, "no image"),
        ]
        for files, fields, status, words in cases:
            data = {
                "image_id": p["image_id"],
                "shown_version": 1,
                "predicted": p["predicted"],
                **fields,
            }
            r = client.post("/api/feedback", data=data, files=files, headers=env.auth("clinician"))
            assert r.status_code == status, (fields, r.text)
            assert words in r.json()["detail"], r.json()
        assert env.files() == before and env.count(Item) == rows


def test_an_oversized_request_body_is_refused_before_parsing(tmp_path, assets):
    env = Env(tmp_path, assets, max_upload_bytes=20_000, worker=False)
    limit = 2 * 20_000 + 2**20
    with env.app() as client:
        body = b"x" * (limit + 10)
        r = client.post("/api/predict", files={"file": ("x.png", body)}, headers=env.auth("viewer"))
        assert r.status_code == 413 and "request body" in r.json()["detail"]

        def streamed():  # no Content-Length: counted while it streams in
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
            for _ in range(limit // 50_000 + 2):
                yield b"x" * 50_000
            yield b"\r\n--b--\r\n"

        headers = {**env.auth("viewer"), "Content-Type": "multipart/form-data; boundary=b"}
        r = client.post("/api/predict", content=streamed(), headers=headers)
        assert r.status_code == 413 and "request body" in r.json()["detail"]
        assert env.files() == []
    env.engine.dispose()


# ------------------------------------------------------------------ crash and restart
class SimulatedCrash(BaseException):
    """Not an Exception: it kills the worker thread the way a crash would, with no clean-up."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_restart_resumes_pending_feedback_and_loses_none(env, monkeypatch):
    # 1. feedback arrives while no worker runs: it waits, pending
    with env.app(worker=False) as client:
        sent = []
        for index in range(3):
            p = predict_upload(client, env, index=index)
            sent.append(send_feedback(client, env, p, mask=box_mask(), label=other_class(p)).json())
    stored = {i["id"]: (i["label"], i["mask_url"], i["image_id"]) for i in sent}

    # 2. the next app crashes in the middle of the update, before the version is recorded
    crashed = threading.Event()

    def crash(*args, **kwargs):
        crashed.set()
        raise SimulatedCrash("power cut while saving the candidate")

    monkeypatch.setattr(worker_module, "save_checkpoint", crash)
    with env.app() as client:
        assert crashed.wait(30)
        time.sleep(0.2)
        pending = client.get("/api/feedback?status=pending", headers=env.auth("clinician")).json()
        assert sorted(i["id"] for i in pending) == sorted(stored)
    monkeypatch.undo()
    with env.sessions() as session:
        statuses = session.execute(select(Version.id, Version.status)).all()
        assert statuses == [(1, "promoted"), (2, "candidate")]
    assert list((env.data / "checkpoints").iterdir()) == []

    # 3. a new instance marks the unfinished candidate interrupted and learns every item
    with env.app() as client:
        for item_id in stored:
            item = wait_used(client, env, item_id)
            assert item["update_version"] == 3 and item["update_status"] == "promoted"
            assert (item["label"], item["mask_url"], item["image_id"]) == stored[item_id]
        versions = client.get("/api/versions", headers=env.auth("admin")).json()
        assert versions[1]["status"] == "rejected" and "interrupted" in versions[1]["reason"]
        assert versions[0]["metrics"]["update"]["items"] == sorted(stored)
        assert predict_upload(client, env)["version"] == 3
    assert env.count(Item) == 3


def test_a_failed_update_is_recorded_and_not_retried_in_a_loop(env, monkeypatch):
    calls = []
    real = worker_module.fine_tune

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(worker_module, "fine_tune", broken)
    with env.app() as client:
        p = predict_upload(client, env)
        first = send_feedback(client, env, p, label=other_class(p)).json()["id"]
        deadline = time.monotonic() + 10
        while not client.get("/api/update/status", headers=env.auth("viewer")).json()["last_error"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.6)  # three more polls: the same pending items are not retried
        status = client.get("/api/update/status", headers=env.auth("viewer")).json()
        assert len(calls) == 1 and status["pending"] == 1 and "disk on fire" in status["last_error"]
        failed = client.get("/api/versions", headers=env.auth("admin")).json()[0]
        assert failed["status"] == "rejected" and "failed (disk on fire)" in failed["reason"]
        monkeypatch.setattr(worker_module, "fine_tune", real)
        second = send_feedback(client, env, p, mask=box_mask(), label=other_class(p)).json()["id"]
        assert wait_used(client, env, first)["update_version"] == 3
        assert wait_used(client, env, second)["update_version"] == 3


def test_update_on_demand_waits_for_n_items_otherwise(tmp_path, assets):
    env = Env(tmp_path, assets, update_every=3)
    with env.app() as client:
        p = predict_upload(client, env)
        item_id = send_feedback(client, env, p, label=other_class(p)).json()["id"]
        time.sleep(0.6)  # three polls: one item is fewer than N = 3
        status = client.get("/api/update/status", headers=env.auth("viewer")).json()
        assert status["pending"] == 1 and status["last_update"] is None
        assert client.post("/api/update", headers=env.auth("admin")).status_code == 202
        assert wait_used(client, env, item_id)["update_version"] == 2
        assert client.post("/api/update", headers=env.auth("admin")).status_code == 409
    env.engine.dispose()


# ------------------------------------------------------------------ gallery, demo data, CLI
def test_gallery_lists_the_data_dirs_images(env):
    gallery = env.data / "gallery"
    gallery.mkdir()
    for i in range(2):
        (gallery / f"case{i}.png").write_bytes(png(env.assets["images"][i]))
    (gallery / "broken.png").write_bytes(b"not an image")
    (gallery / "labels.json").write_text(json.dumps({"case0.png": "MEL"}))
    with env.app(worker=False) as client:
        entries = client.get("/api/gallery", headers=env.auth("viewer")).json()
        assert [(e["name"], e["label"]) for e in entries] == [("case0", "MEL"), ("case1", None)]
        r = client.post(
            "/api/predict", data={"image_id": entries[1]["image_id"]}, headers=env.auth("viewer")
        )
        assert r.status_code == 200


def test_serving_the_demo_writes_validation_and_gallery_from_their_own_seeds(
    tmp_path, assets, monkeypatch
):
    from feedbackcam.service import demo

    data = tmp_path / "data"
    (data / "demo" / "checkpoints").mkdir(parents=True)
    (data / "demo" / "checkpoints" / "combined.pt").write_bytes(assets["checkpoint"].read_bytes())
    monkeypatch.setattr(demo, "VALIDATION_N", 12)
    monkeypatch.setattr(demo, "GALLERY_N", 5)
    monkeypatch.setattr(demo, "REPLAY_N", 9)
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("must not retrain"))
    settings = Settings(data_dir=data, bootstrap_admin=True, worker=False)
    with TestClient(create_app(settings)):
        pass
    with np.load(data / "validation.npz") as z:
        assert len(z["labels"]) == 12 and all(i.startswith("SYN_101_") for i in z["ids"])
    with np.load(data / "replay.npz") as z:  # the start of the demo's own feedback pool
        assert len(z["labels"]) == 9 and all(i.startswith("SYN_1_") for i in z["ids"])
    assert len(json.loads((data / "gallery" / "labels.json").read_text())) == 5
    assert {demo.VALIDATION_SEED, demo.GALLERY_SEED}.isdisjoint({0, 1})  # the demo's seeds


def test_users_add_prints_a_token_that_signs_in(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["users", "add", "carol", "--role", "clinician", "--data-dir", str(data)]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["users", "add", "carol", "--role", "viewer", "--data-dir", str(data)]) == 2
    assert "exists" in capsys.readouterr().err
    engine, sessions = connect(Settings(data_dir=data).database_url)
    with sessions() as session:
        assert find_user(session, token).role == "clinician"
    engine.dispose()
    assert main(["users", "list", "--data-dir", str(data)]) == 0
    assert "carol\tclinician" in capsys.readouterr().out


# ------------------------------------------------------------------ the gate's images
def test_gate_set_is_class_stratified_fixed_and_whole_without_a_count(assets):
    from feedbackcam.service.update import gate_set

    val = assets["validation"]
    assert gate_set(val, None) is val and gate_set(val, len(val) + 5) is val
    part = gate_set(val, 12, seed=3)
    assert len(part) == 12 and part.ids == gate_set(val, 12, seed=3).ids
    assert set(part.ids) <= set(val.ids) and len(set(part.ids)) == 12
    share = np.bincount(val.labels, minlength=3) / len(val)
    got = np.bincount(part.labels, minlength=3)
    assert np.all(np.abs(got - 12 * share) <= 1) and np.all(got >= 1)
    with pytest.raises(ValueError, match="gate_images"):
        gate_set(val, 0)


def test_scores_are_the_full_evaluations_numbers_with_grad_cam_only_on_masked_images(
    assets, monkeypatch
):
    from feedbackcam import evaluate as ev
    from feedbackcam.service import update

    model, _, _ = load_checkpoint(assets["checkpoint"])
    val = assets["validation"]
    full = ev.evaluate(model, val).summary()
    explained = []
    real = update.evaluate
    monkeypatch.setattr(
        update, "evaluate", lambda m, d, **kw: explained.append(len(d)) or real(m, d, **kw)
    )
    monkeypatch.setattr(update, "JACCARD_IMAGES", 7)
    got = update.scores(model, val)
    assert got["accuracy"] == pytest.approx(full["accuracy"])
    assert got["avg_sensitivity"] == pytest.approx(full["avg_sensitivity"])
    assert explained == [7] and got["n_jaccard"] == 7 and got["n_validation"] == len(val)
    monkeypatch.setattr(update, "JACCARD_IMAGES", 1000)
    assert update.scores(model, val)["jaccard_mean"] == pytest.approx(full["jaccard_mean"])


def test_a_verdict_on_part_of_the_validation_set_says_how_many(tmp_path, assets):
    env = Env(tmp_path, assets, gate_images=12)
    with env.app() as client:
        p = predict_upload(client, env)
        r = send_feedback(client, env, p, mask=box_mask(), label=other_class(p))
        item = wait_used(client, env, r.json()["id"])
        assert "on a class-stratified 12 of 30 validation images" in item["update_reason"]
        versions = client.get("/api/versions", headers=env.auth("admin")).json()
        assert [v["metrics"]["n_validation"] for v in versions] == [12, 12]
    env.engine.dispose()


def test_the_loss_scales_are_calibrated_once_per_lineage(tmp_path, assets, monkeypatch):
    """The first update measures its terms' scales (probe passes); the next keeps them, as a
    simulation keeps the scales of its one calibration over all its epochs; a scale set by
    hand is never replaced."""
    from feedbackcam.balance import measured_scales
    from feedbackcam.service import update

    probes = []
    real = update.auto_scaled
    monkeypatch.setattr(update, "auto_scaled", lambda *a: probes.append(1) or real(*a))
    env = Env(tmp_path, assets)
    with env.app() as client:
        for index in range(3):
            p = predict_upload(client, env, index=index)
            r = send_feedback(client, env, p, mask=box_mask(), label=other_class(p))
            wait_used(client, env, r.json()["id"])
        versions = client.get("/api/versions", headers=env.auth("admin")).json()
    env.engine.dispose()
    third, second, first = (v["metrics"]["update"] for v in versions[:3])
    # the first update has one image and no replay: nothing to move a lesion onto, nothing
    # measured or kept; the second (with replay) measures; the third keeps what it measured
    assert first["calibrated"] == {} and first["surroundings_scale"] == 1.0
    assert probes == [1]
    assert set(second["calibrated"]) == {"surroundings_scale"}  # keep masks only: one term
    assert third["calibrated"] == second["calibrated"]
    assert third["surroundings_scale"] == second["surroundings_scale"] != 1.0
    # a hand-set scale stays as set, whatever the parent measured
    cfg = update.UpdateConfig.from_settings(
        Settings(feedback=FeedbackConfig(surroundings_scale=2.0))
    )
    assert measured_scales(cfg.feedback) == ["ignore_scale"]


def test_with_a_replay_set_the_keep_terms_are_calibrated_at_start(tmp_path, assets, monkeypatch):
    """The served version's keep-mask term (surroundings) is calibrated at start on the replay
    set, whose images carry lesion masks, and kept with it; the first update, whose ignore
    mark only a user gives, measures the ignore term alone and keeps the other."""
    from feedbackcam.service import update

    calls = []
    real = update.auto_scaled
    monkeypatch.setattr(
        update, "auto_scaled", lambda m, b, cfg: calls.append(cfg) or real(m, b, cfg)
    )
    env = Env(tmp_path, assets)
    save_npz(env.data / "replay.npz", assets["validation"].subset(range(12)))
    with env.app() as client:
        p = predict_upload(client, env)
        data = {
            "image_id": p["image_id"],
            "shown_version": p["version"],
            "predicted": p["predicted"],
            "label": other_class(p),
        }
        files = {"ignore_mask": ("m.png", png(box_mask()), "image/png")}
        r = client.post("/api/feedback", data=data, files=files, headers=env.auth("clinician"))
        assert r.status_code == 201, r.text
        wait_used(client, env, r.json()["id"])
        versions = client.get("/api/versions", headers=env.auth("admin")).json()
    env.engine.dispose()
    made, original = versions[0]["metrics"], versions[1]["metrics"]
    kept = original["calibrated"]
    assert set(kept) == {"surroundings_scale"} and kept["surroundings_scale"] > 0
    assert [c.surroundings_scale for c in calls] == [None, kept["surroundings_scale"]]
    assert calls[1].ignore_scale is None  # the update measured the ignore term alone
    assert set(made["update"]["calibrated"]) == {"surroundings_scale", "ignore_scale"}
    assert made["update"]["surroundings_scale"] == kept["surroundings_scale"]


def test_the_updater_scores_a_version_and_fits_its_check_in_one_pass(tmp_path, assets, monkeypatch):
    """The gate's scores and the unfamiliar-input check's reference come from one forward pass
    over the union of their validation rows (each made its own before); the image-statistics
    part of the check, which no model changes, is fitted once for all versions. The reference
    is the one a separate forward gives."""
    from feedbackcam.service import ood

    forwarded, image_fits = [], []
    real_forward, real_image = ood.forward, ood.image_reference
    monkeypatch.setattr(
        ood, "forward", lambda s, x, *a: forwarded.append(len(x)) or real_forward(s, x, *a)
    )
    monkeypatch.setattr(ood, "image_reference", lambda *a: image_fits.append(1) or real_image(*a))
    env = Env(tmp_path, assets, gate_images=12)
    with env.app() as client:
        runtime = client.app.state.runtime
        deadline = time.monotonic() + 30  # the updater prepares the served version at start
        while 1 not in runtime.familiarity._references and time.monotonic() < deadline:
            time.sleep(0.05)
        p = predict_upload(client, env)
        r = send_feedback(client, env, p, mask=box_mask(), label=other_class(p))
        wait_used(client, env, r.json()["id"])
        while runtime.registry.served.version_id != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        familiarity, served = runtime.familiarity, runtime.registry.served
        assert set(familiarity._references) == {1, 2}
        assert forwarded == [] and image_fits == [1]  # the prediction read its own pass
        fitted = familiarity._references[2]
        images = familiarity.validation.images[familiarity.rows]
        labels = np.asarray(familiarity.validation.labels)[familiarity.rows]
        again = ood.fit_reference(served, images, labels, familiarity.quantile)
    env.engine.dispose()
    assert fitted.energy_threshold == pytest.approx(again.energy_threshold, rel=1e-4, abs=1e-5)
    assert fitted.features_threshold == pytest.approx(again.features_threshold, rel=1e-3)
    np.testing.assert_allclose(fitted.features.means, again.features.means, rtol=1e-3, atol=1e-5)
    assert fitted.image_threshold == pytest.approx(again.image_threshold)


def test_a_version_answers_with_its_unfamiliar_input_check_already_measured(env):
    """The check's reference (a pass over the validation set) is measured by the updater for
    the served version at start and for a promoted one before it is installed: no
    prediction pays for it."""
    with env.app() as client:
        runtime = client.app.state.runtime
        deadline = time.monotonic() + 30
        while 1 not in runtime.familiarity._references and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 1 in runtime.familiarity._references
        p = predict_upload(client, env)
        r = send_feedback(client, env, p, mask=box_mask(), label=other_class(p))
        wait_used(client, env, r.json()["id"])
        while runtime.registry.served.version_id != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runtime.registry.served.version_id == 2
        assert 2 in runtime.familiarity._references  # measured before it was made current
