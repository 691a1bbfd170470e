"""The reliability battery, against the app under uvicorn on loopback (a real socket, keep-alive
connections): kinds of bad input, storage faults, a corrupt-checkpoint start, kill -9 during an
update, and a bounded load test. Every case asserts no 5xx other than a 503 for a storage fault,
that the connection survives, and that no accepted feedback is lost. docs/reliability.md holds
the table of what was tried and what held.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import func, select

from feedbackcam.checkpoint import ModelSpec, save_checkpoint
from feedbackcam.cli import main
from feedbackcam.data.synth import CLASSES, SynthConfig, as_array_dataset, make_synthderm
from feedbackcam.models import build_model
from feedbackcam.service import Settings, create_app
from feedbackcam.service.auth import add_user
from feedbackcam.service.datasets import save_npz
from feedbackcam.service.db import Item, Version, connect

uvicorn = pytest.importorskip("uvicorn")
SIZE = 48


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def make_data(root: Path) -> tuple[Path, Path, np.ndarray]:
    """A tiny checkpoint, a data dir with a validation set, and six images."""
    torch.manual_seed(0)
    model = build_model("small_cnn", len(CLASSES), width=8)
    spec = ModelSpec("small_cnn", CLASSES, model.layers, SIZE, {"width": 8})
    checkpoint = save_checkpoint(root / "tiny.pt", model, spec)
    data = root / "data"
    save_npz(data / "validation.npz", as_array_dataset(make_synthderm(SynthConfig(30, SIZE, 101))))
    return checkpoint, data, make_synthderm(SynthConfig(n=6, size=SIZE, seed=7)).images


class Live:
    """The app under uvicorn in a thread, with one token per role and a keep-alive client."""

    def __init__(self, root: Path, **overrides) -> None:
        self.checkpoint, self.data, self.images = make_data(root)
        settings = Settings(
            **{
                "data_dir": self.data,
                "model": self.checkpoint,
                "bootstrap_admin": False,
                "poll_seconds": 0.2,
                "lr": 1e-2,
                "tolerance": 1.0,
                "steps": 4,
                "grace_seconds": 0,
                **overrides,
            }
        )
        self.engine, self.sessions = connect(settings.database_url)
        with self.sessions() as session:
            self.tokens = {r: add_user(session, r, r) for r in ("viewer", "clinician", "admin")}
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def auth(self, role: str) -> dict:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def predict(self, index: int = 0, role: str = "clinician") -> dict:
        files = {"file": ("x.png", png(self.images[index % len(self.images)]), "image/png")}
        r = self.client.post("/api/predict", files=files, headers=self.auth(role))
        assert r.status_code == 200, r.text
        return r.json()

    def feedback(self, p: dict, key: str | None = None, **fields) -> httpx.Response:
        data = {
            "image_id": p["image_id"],
            "shown_version": p["version"],
            "predicted": p["predicted"],
        }
        label = next(c for c in CLASSES if c != p["predicted"])
        headers = {**self.auth("clinician"), **({"Idempotency-Key": key} if key else {})}
        return self.client.post(
            "/api/feedback", data={"label": label, **data, **fields}, headers=headers
        )

    def alive(self) -> bool:
        """The same keep-alive client still gets answers."""
        return self.client.get("/api/me", headers=self.auth("viewer")).status_code == 200

    def count(self, model) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(model))

    def updater(self) -> str:
        """What the updater is doing and what each version became: for a failure message."""
        worker = self.app.state.runtime.worker
        with self.sessions() as session:
            versions = [(v.id, v.status, v.reason) for v in session.scalars(select(Version))]
            items = sorted(session.execute(select(Item.status, func.count()).group_by(Item.status)))
        return (
            f"progress={worker.progress} last_error={worker.last_error} failed={worker._failed} "
            f"ready={worker.ready.is_set()} alive={worker._thread.is_alive()} items={items} "
            f"versions={versions}"
        )

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        self.engine.dispose()


@pytest.fixture
def live(tmp_path):
    app = Live(tmp_path, worker=False)
    yield app
    app.close()


# ------------------------------------------------------------------ the bad-input battery
def _bad_requests(live: Live, p: dict) -> dict[str, tuple]:
    """name -> (method, path, request kwargs): each a kind of bad input."""
    viewer, clinician, admin = live.auth("viewer"), live.auth("clinician"), live.auth("admin")
    form = {"image_id": p["image_id"], "shown_version": "1", "predicted": p["predicted"]}

    def fb(**fields):
        return ("post", "/api/feedback", {"data": {**form, **fields}, "headers": clinician})

    def mask(data: bytes):
        return (
            "post",
            "/api/feedback",
            {"data": form, "files": {"mask": ("m.png", data, "image/png")}, "headers": clinician},
        )

    def upload(data: bytes, role=viewer):
        return ("post", "/api/predict", {"files": {"file": ("x.png", data)}, "headers": role})

    header_bomb = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + (100_000).to_bytes(4, "big") * 2
    return {
        "no token": ("get", "/api/me", {}),
        "a wrong token": ("get", "/api/me", {"headers": {"Authorization": "Bearer x"}}),
        "a malformed Authorization": ("get", "/api/me", {"headers": {"Authorization": "Basic"}}),
        "a non-latin token": (
            "get",
            "/api/me",
            {"headers": {"Authorization": "Bearer \u00e9".encode("latin-1")}},
        ),
        "a viewer's feedback": ("post", "/api/feedback", {"data": form, "headers": viewer}),
        "a clinician activating": ("post", "/api/versions/1/activate", {"headers": clinician}),
        "an unsigned 5 MB body": ("post", "/api/predict", {"content": b"x" * 5_000_000}),
        "text as an image": upload(b"hello" * 100),
        "an empty image": upload(b""),
        "a truncated PNG": upload(png(live.images[0])[:-100]),
        "a PNG header claiming 10^10 pixels": upload(header_bomb),
        "a GIF": upload(b"GIF89a" + b"\0" * 100),
        "no file and no image_id": ("post", "/api/predict", {"headers": viewer}),
        "both file and image_id": (
            "post",
            "/api/predict",
            {
                "data": {"image_id": p["image_id"]},
                "files": {"file": ("x", png(live.images[0]))},
                "headers": viewer,
            },
        ),
        "an unknown image_id": (
            "post",
            "/api/predict",
            {"data": {"image_id": "0" * 64}, "headers": viewer},
        ),
        "a path-traversal image_id": (
            "get",
            "/api/images/..%2F..%2Fetc%2Fpasswd",
            {"headers": viewer},
        ),
        "shown_version 2**70": fb(shown_version=str(2**70)),
        "shown_version -1": fb(shown_version="-1"),
        "shown_version 'abc'": fb(shown_version="abc"),
        "an unknown shown_version": fb(shown_version="999"),
        "an unknown class": fb(label="XYZ"),
        "agree with another label": fb(
            agree="true", label="MEL" if p["predicted"] != "MEL" else "NV"
        ),
        "nothing to learn": fb(label=p["predicted"]),
        "mask_rle 1e999": fb(mask_rle='{"size": [48, 48], "counts": [1e999]}'),
        "mask_rle nested 100k": fb(mask_rle="[" * 100_000 + "]" * 100_000),
        "mask_rle NaN": fb(mask_rle='{"size": [48, 48], "counts": [NaN]}'),
        "mask_rle wrong size": fb(mask_rle='{"size": [4, 4], "counts": [16]}'),
        "mask_rle bad sum": fb(mask_rle='{"size": [48, 48], "counts": [5]}'),
        "mask_base64 not base64": fb(mask_base64="%%%"),
        "two masks": fb(mask_base64="AAAA", mask_rle="{}"),
        "an empty mask": mask(png(np.zeros((SIZE, SIZE), np.uint8))),
        "a larger mask": mask(png(np.full((SIZE * 4, SIZE * 4), 255, np.uint8))),
        "a JPEG mask": mask(b"\xff\xd8\xff" + b"\0" * 50),
        "GET feedback 2**70": ("get", f"/api/feedback/{2**70}", {"headers": clinician}),
        "GET feedback 'x'": ("get", "/api/feedback/x", {"headers": clinician}),
        "activate 2**64": ("post", f"/api/versions/{2**64}/activate", {"headers": admin}),
        "activate a missing version": ("post", "/api/versions/99/activate", {"headers": admin}),
        "a feedback list limit of 10^9": (
            "get",
            "/api/feedback?limit=1000000000",
            {"headers": clinician},
        ),
        "an unknown status filter": ("get", "/api/feedback?status=x", {"headers": clinician}),
        "a user with a bad name": (
            "post",
            "/api/users",
            {"json": {"name": "a b", "role": "viewer"}, "headers": admin},
        ),
        "a user with a bad role": (
            "post",
            "/api/users",
            {"json": {"name": "ab", "role": "god"}, "headers": admin},
        ),
        "a user as invalid JSON": (
            "post",
            "/api/users",
            {"content": b"{", "headers": {**admin, "Content-Type": "application/json"}},
        ),
        "an update with nothing pending": ("post", "/api/update", {"headers": admin}),
        "an unknown route": ("get", "/api/nothing", {"headers": viewer}),
        "a wrong method": ("delete", "/api/me", {"headers": viewer}),
    }


def test_the_bad_input_battery_gets_4xx_and_the_connection_survives(live, capsys):
    p = live.predict()
    rows_before, files_before = live.count(Item), sorted((live.data / "masks").iterdir())
    results = {}
    for name, (method, path, kwargs) in _bad_requests(live, p).items():
        r = (
            getattr(live.client, method)(path, **kwargs)
            if method != "post"
            else (live.client.post(path, **kwargs))
        )
        body = r.json()
        results[name] = r.status_code
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        assert isinstance(body["detail"], (str, list)) and body["detail"], (name, body)
        if r.headers.get("connection") == "close":  # refused unread: the server closes it
            live.client.close()
            live.client = httpx.Client(base_url=live.url, timeout=60)
        assert live.alive(), f"the server stopped answering after {name!r}"
    assert live.count(Item) == rows_before
    assert sorted((live.data / "masks").iterdir()) == files_before
    with capsys.disabled():
        print(f"\nbattery: {len(results)} kinds, statuses {sorted(set(results.values()))}")


def test_after_a_bug_answers_500_the_same_connection_keeps_working(live, monkeypatch):
    from feedbackcam.service.routers import users

    port = live.client.get("/api/me", headers=live.auth("viewer")).extensions["network_stream"]
    monkeypatch.setattr(users, "Me", lambda **kw: 1 / 0)
    r = live.client.get("/api/me", headers=live.auth("viewer"))
    assert r.status_code == 500 and r.json()["detail"].startswith("internal error")
    monkeypatch.undo()
    again = live.client.get("/api/me", headers=live.auth("viewer"))
    assert again.status_code == 200
    assert again.extensions["network_stream"] is port  # the same keep-alive connection


# ------------------------------------------------------------------ storage faults
def test_a_folder_replaced_by_a_file_is_503_and_nothing_accepted_is_lost(live):
    """Root ignores chmod, so the data dir's masks folder is replaced by a file instead."""
    p = live.predict()
    ok = [live.feedback(p, key=f"before-{k}", mask_rle=_rle(k)) for k in range(3)]
    masks = live.data / "masks"
    masks.rename(live.data / "masks-away")
    masks.write_text("a file where a folder was")
    try:
        faulty = [live.feedback(p, key=f"during-{k}", mask_rle=_rle(10 + k)) for k in range(3)]
    finally:
        masks.unlink()
        (live.data / "masks-away").rename(masks)
    assert [r.status_code for r in faulty] == [503] * 3
    assert all("storage unavailable" in r.json()["detail"] for r in faulty)
    retried = [live.feedback(p, key=f"during-{k}", mask_rle=_rle(10 + k)) for k in range(3)]
    assert [r.status_code for r in ok + retried] == [201] * 6
    assert live.count(Item) == 6 and live.alive()


def _rle(k: int) -> str:
    return json.dumps({"size": [SIZE, SIZE], "counts": [k, 40 + k, SIZE * SIZE - 40 - 2 * k]})


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_a_full_disk_is_503_and_clears_when_space_returns(tmp_path):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "4m"):
        pytest.skip("a full disk needs a small tmpfs: mount is not permitted here (not root?)")
    try:
        live = Live(mnt, worker=False)
        try:
            p = live.predict()
            filler = mnt / "filler"
            with open(filler, "wb") as f:  # fill the disk to the last block
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            faulty = [live.feedback(p, key=f"f{k}", mask_rle=_rle(k)).status_code for k in range(5)]
            filler.unlink()
            after = [live.feedback(p, key=f"g{k}", mask_rle=_rle(k)).status_code for k in range(15)]
            assert set(faulty) == {503}, faulty
            assert after == [201] * 15
            assert live.count(Item) == 15 and live.alive()
        finally:
            live.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_read_only_file_area_is_503_and_clears_when_writable_again(live):
    """The image and mask folders on their own tmpfs, remounted read-only (EROFS), then
    writable again; chmod would not bind root, and the open database keeps a whole data dir
    from being remounted."""
    areas = [live.data / "images", live.data / "masks"]
    if not all(_mount_tmpfs(area, "16m") for area in areas):
        for area in areas:
            subprocess.run(["umount", "-l", str(area)], check=False, capture_output=True)
        pytest.skip("a read-only area needs a tmpfs to remount: mount is not permitted here")
    try:
        p = live.predict()

        def remount(mode: str) -> None:
            for area in areas:
                subprocess.run(["mount", "-o", f"remount,{mode}", str(area)], check=True)

        remount("ro")
        try:
            faulty = [live.feedback(p, key=f"ro{k}", mask_rle=_rle(k)) for k in range(5)]
            upload = live.client.post(
                "/api/predict",
                files={"file": ("x.png", png(live.images[3]), "image/png")},
                headers=live.auth("viewer"),
            )
        finally:
            remount("rw")
        assert [r.status_code for r in faulty] == [503] * 5
        assert all("read-only" in r.json()["detail"] for r in faulty + [upload])
        assert upload.status_code == 503
        after = [live.feedback(p, key=f"rw{k}", mask_rle=_rle(k)).status_code for k in range(15)]
        assert after == [201] * 15
        assert live.count(Item) == 15 and live.alive()
    finally:
        for area in areas:
            subprocess.run(["umount", "-l", str(area)], check=False)


# ------------------------------------------------------------------ processes: start and kill
def _cli(*args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "feedbackcam.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


def test_a_corrupt_checkpoint_start_exits_with_one_line_and_the_next_start_works(tmp_path):
    checkpoint, data, _ = make_data(tmp_path)
    engine, sessions = connect(Settings(data_dir=data).database_url)
    engine.dispose()
    corrupt = tmp_path / "corrupt.pt"
    raw = bytearray(checkpoint.read_bytes())
    corrupt.write_bytes(bytes(raw[: len(raw) // 3]))
    done = _cli("serve", "--model", str(corrupt), "--data-dir", str(data), "--port", "0")
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(corrupt) in lines[0] and "not a readable" in lines[0]
    assert not (data / "admin-token.txt").exists()  # nothing was created for a failed start
    assert main(["doctor", "--data-dir", str(data)]) == 0  # the store is as it was


def _serve(checkpoint: Path, data: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    args = [
        "serve",
        "--model",
        str(checkpoint),
        "--data-dir",
        str(data),
        "--port",
        str(port),
        "--steps",
        "40",
        "--lr",
        "0.01",
        "--tolerance",
        "1.0",
        "--grace-seconds",  # learn at once: the test kills the app mid-update
        "0",
        "--rate-limit",  # the test polls the status every 20 ms
        "0",
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "feedbackcam.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_up(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read().decode()[-2000:]
        try:
            httpx.get(f"{url}/api/me", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("the server did not start")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kill_9_during_an_update_loses_no_feedback(tmp_path):
    checkpoint, data, images = make_data(tmp_path)
    engine, sessions = connect(Settings(data_dir=data).database_url)
    with sessions() as session:
        token = add_user(session, "dr", "clinician")
    auth = {"Authorization": f"Bearer {token}"}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = _serve(checkpoint, data, port)
    sent = []
    try:
        _wait_up(url, process)
        with httpx.Client(base_url=url, timeout=60) as client:
            for k in range(3):
                r = client.post(
                    "/api/predict", files={"file": ("x.png", png(images[k]))}, headers=auth
                ).json()
                label = next(c for c in CLASSES if c != r["predicted"])
                f = client.post(
                    "/api/feedback",
                    headers=auth,
                    data={
                        "image_id": r["image_id"],
                        "shown_version": r["version"],
                        "predicted": r["predicted"],
                        "label": label,
                        "mask_rle": _rle(k),
                    },
                )
                assert f.status_code == 201, f.text
                sent.append(f.json()["id"])
            deadline = time.monotonic() + 60
            while not client.get("/api/update/status", headers=auth).json()["running"]:
                assert time.monotonic() < deadline, "no update started"
                time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        with sessions() as session:
            assert session.scalar(select(func.count()).select_from(Item)) == 3
        process = _serve(checkpoint, data, port)
        _wait_up(url, process)
        deadline = time.monotonic() + 120
        with sessions() as session:
            while session.scalar(select(func.count()).where(Item.status == "used")) < 3:
                assert time.monotonic() < deadline, "the feedback was not learnt after restart"
                time.sleep(0.2)
                session.expire_all()
            versions = session.scalars(select(Version).order_by(Version.id)).all()
            assert any("interrupted" in v.reason for v in versions)
            assert sorted(
                i
                for v in versions
                if v.status == "promoted" and v.parent_id
                for i in v.metrics["update"]["items"]
            ) == sorted(sent)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        engine.dispose()


# ------------------------------------------------------------------ bounded load
def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))]


def test_bounded_load_has_no_5xx_and_loses_nothing(tmp_path, capsys):
    live = Live(tmp_path, update_every=4, steps=8)
    try:
        predictions = [live.predict(k) for k in range(6)]
        alone = []
        for k in range(20):
            t = time.perf_counter()
            live.predict(k)
            alone.append(time.perf_counter() - t)
        statuses, during, accepted, lock = [], [], [], threading.Lock()

        def one(k: int) -> None:
            with httpx.Client(base_url=live.url, timeout=60) as client:
                if k % 3 == 0:
                    p = predictions[k % 6]
                    label = next(c for c in CLASSES if c != p["predicted"])
                    r = client.post(
                        "/api/feedback",
                        headers={**live.auth("clinician"), "Idempotency-Key": f"load-{k}"},
                        data={
                            "image_id": p["image_id"],
                            "shown_version": p["version"],
                            "predicted": p["predicted"],
                            "label": label,
                            "mask_rle": _rle(k),
                        },
                    )
                    if r.status_code == 201:
                        with lock:
                            accepted.append(r.json()["id"])
                else:
                    files = {"file": ("x.png", png(live.images[k % 6]), "image/png")}
                    t = time.perf_counter()
                    r = client.post("/api/predict", files=files, headers=live.auth("viewer"))
                    with lock:
                        during.append(time.perf_counter() - t)
                with lock:
                    statuses.append(r.status_code)

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(90)))
        elapsed = time.monotonic() - started
        assert elapsed < 120 and len(statuses) == 90
        assert all(s < 500 for s in statuses), sorted(statuses)
        assert len(accepted) == 30
        assert live.count(Item) == 30
        # The updater learns on its own while update_every (4) or more items are pending; the
        # last few (0-3, by how the 30 fell between updates) wait for more feedback or for an
        # admin's "update now", as documented: the admin asks, then every item must be learnt.
        learning = time.monotonic()
        deadline = learning + 120
        while _pending(live) >= 4:
            assert time.monotonic() < deadline, f"the updater stalled: {live.updater()}"
            time.sleep(0.2)
        if _pending(live):
            r = live.client.post("/api/update", headers=live.auth("admin"))
            assert r.status_code == 202, r.text
        while _pending(live):
            assert time.monotonic() < deadline, (
                f"feedback under load was not all learnt: {live.updater()}"
            )
            time.sleep(0.2)
        learning = time.monotonic() - learning
        with live.sessions() as session:
            assert sorted(session.scalars(select(Item.id)).all()) == sorted(accepted)
        a50, a95 = _percentiles(alone)
        d50, d95 = _percentiles(during)
        with capsys.disabled():
            print(
                f"\nload: 90 requests (60 predicts, 30 feedback) by 8 clients in {elapsed:.1f}s; "
                f"predict alone p50 {a50 * 1000:.0f} ms p95 {a95 * 1000:.0f} ms; "
                f"under load with updates p50 {d50 * 1000:.0f} ms p95 {d95 * 1000:.0f} ms; "
                f"the rest learnt {learning:.1f}s later"
            )
    finally:
        live.close()


def _pending(live: Live) -> int:
    with live.sessions() as session:
        return session.scalar(select(func.count()).where(Item.status == "pending"))


# ------------------------------------------------------------------ memory under large uploads
def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_concurrent_large_uploads_are_decoded_two_at_a_time(tmp_path, capsys):
    checkpoint, data, _ = make_data(tmp_path)
    engine, sessions = connect(Settings(data_dir=data).database_url)
    with sessions() as session:
        token = add_user(session, "v", "viewer")
    engine.dispose()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = _serve(checkpoint, data, port)
    side = 4000  # 16 MP: 64 MB decoded, a few KB as a PNG of one colour
    big = png(np.full((side, side, 3), 90, np.uint8))
    try:
        _wait_up(url, process)
        auth = {"Authorization": f"Bearer {token}"}
        httpx.post(
            f"{url}/api/predict",
            files={"file": ("x.png", png(np.zeros((48, 48, 3), np.uint8)))},
            headers=auth,
            timeout=60,
        )
        base = _vm_hwm_mb(process.pid)

        def upload(_):
            r = httpx.post(
                f"{url}/api/predict", files={"file": ("big.png", big)}, headers=auth, timeout=120
            )
            return r.status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(upload, range(8)))
        peak = _vm_hwm_mb(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    per_image = side * side * 4 / 2**20  # Pillow keeps RGB as 4 bytes a pixel
    with capsys.disabled():
        print(
            f"\nmemory: 8 parallel {side}x{side} PNGs ({len(big) // 1024} KB each): "
            f"peak RSS {base:.0f} -> {peak:.0f} MB ({per_image:.0f} MB per decoded image)"
        )
    assert codes == [200] * 8
    # Two decodes at once plus what each request derives from its image (the stored original,
    # the model input, the response's overlay) measured 1.9-3.0 decodes' worth on 2-core machines,
    # once 4.6 (allocator timing); with no bound the eight requests decode together, 8 decodes'
    # worth or more. The bound itself is checked exactly by the test below.
    assert peak - base < 6 * per_image, "more decodes at once than the semaphore allows"


def test_decode_slots_admit_as_many_at_once_as_configured():
    """Two decodes hold their slots; a third is refused (503) instead of joining them. No sleep
    decides it: the holders stay inside until told to leave."""
    import threading

    from feedbackcam.service import limits
    from feedbackcam.service.uploads import UploadError

    limits.configure(2)
    leave, entered = threading.Event(), threading.Semaphore(0)

    def hold():
        with limits.decode_slot():
            entered.release()
            leave.wait()

    holders = [threading.Thread(target=hold) for _ in range(2)]
    try:
        for t in holders:
            t.start()
        assert all(entered.acquire(timeout=10) for _ in holders), "two decodes were not admitted"
        with pytest.raises(UploadError) as refused, limits.decode_slot(wait=0.2):
            pass
        assert refused.value.status == 503
    finally:
        leave.set()
        for t in holders:
            t.join()
        limits.configure(2)
