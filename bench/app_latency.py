"""The feedback app's latency, through its API: predict + explain (p50/p95), and the time from
submitting feedback to a promoted version.

    OMP_NUM_THREADS=1 python bench/app_latency.py --data /tmp/demo-data [--model ckpt.pt]

``--data`` is a data dir; without ``--model`` the demo's model is served (trained if absent).
The data dir is copied, so every run starts from the same state.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from feedbackcam.data.synth import SynthConfig, make_synthderm
from feedbackcam.service import Settings, create_app
from feedbackcam.service.auth import add_user
from feedbackcam.service.db import Version, connect
from feedbackcam.service.demo import ensure_demo
from feedbackcam.service.uploads import png_bytes


def timed_predictions(client, auth, images) -> list[float]:
    """Seconds of each ``POST /api/predict`` of ``images`` (upload, predict, explain)."""
    times = []
    for image in images:
        start = time.perf_counter()
        files = {"file": ("x.png", png_bytes(image), "image/png")}
        r = client.post("/api/predict", files=files, headers=auth)
        times.append(time.perf_counter() - start)
        assert r.status_code == 200, r.text
    return times


def newest(sessions) -> Version:
    with sessions() as session:
        return session.scalars(select(Version).order_by(Version.id.desc())).first()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--n", type=int, default=50, help="predictions timed")
    parser.add_argument("--updates", type=int, default=3, help="submit-to-promoted runs")
    parser.add_argument("--size", type=int, default=256, help="side of the uploaded images")
    parser.add_argument(
        "--mask",
        choices=("ignore", "keep", "none"),
        default="ignore",
        help="what each feedback item marks besides its class (a corner box as 'not this', a "
        "centre box as 'this', or nothing)",
    )
    parser.add_argument("--gate-images", type=int, default=None, help="Settings.gate_images")
    parser.add_argument(
        "--update-timeout",
        type=float,
        default=900.0,
        help="give up (and say why) when an item is not used by an update after this long",
    )
    parser.add_argument("--device", default="cpu", help="where the app predicts and learns")
    parser.add_argument(
        "--poll",
        type=float,
        default=0.25,
        help="seconds between this client's status requests while an update runs (the page "
        "polls every 1.5 s; at 0.02 s the requests took a third of a 2-core CPU from the update)",
    )
    args = parser.parse_args()
    ensure_demo(args.data, model=args.model is None)  # the validation set, replay and gallery
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        shutil.copytree(args.data, data, ignore=shutil.ignore_patterns("feedbackcam.db*"))
        # no withdraw window (it would add 30 s to every update) and no rate limit (this loop
        # polls every --poll seconds): the figures are the update's own time
        settings = Settings(
            data_dir=data,
            model=args.model,
            bootstrap_admin=False,
            tolerance=1.0,
            poll_seconds=0.05,
            grace_seconds=0,
            rate_limit_per_minute=0,
            gate_images=args.gate_images,
            device=args.device,
        )
        engine, sessions = connect(settings.database_url)
        with sessions() as session:
            auth = {"Authorization": f"Bearer {add_user(session, 'bench', 'clinician')}"}
        images = make_synthderm(SynthConfig(n=args.n, size=args.size, seed=99)).images
        started = time.perf_counter()
        with TestClient(create_app(settings)) as client:
            size = client.app.state.runtime.registry.served.spec.input_size
            # predictions are timed alone: first the updater scores the served version on the
            # validation set (once per version, kept with it), then they start
            client.app.state.runtime.worker.ready.wait()  # and calibrates on the replay set
            took = time.perf_counter() - started
            print(f"start-up (scores, the check's reference, replay scales): {took:.1f} s")
            files = {"file": ("x.png", png_bytes(images[0]), "image/png")}
            client.post("/api/predict", files=files, headers=auth)  # warm-up (energy threshold)
            times = timed_predictions(client, auth, images)
            p50, p95 = np.percentile(np.array(times) * 1000, [50, 95])
            cpu = platform.processor() or platform.machine()
            print(f"machine: {cpu}, torch {torch.__version__}, threads {torch.get_num_threads()}")
            print(f"model input {size} px, uploads {args.size} px PNG, n = {args.n}")
            print(f"predict + explain (HTTP, upload included): p50 {p50:.1f} ms, p95 {p95:.1f} ms")
            print(f"validation images: {len(client.app.state.runtime.validation)}", flush=True)
            gate = args.gate_images or "all"
            print(f"feedback marks: {args.mask}; the gate scores on {gate} of them", flush=True)
            update_times = []
            for k in range(args.updates):
                p = client.post(
                    "/api/predict",
                    files={"file": ("x.png", png_bytes(images[k]), "image/png")},
                    headers=auth,
                ).json()
                label = next(c for c in p["probabilities"] if c != p["predicted"])
                start = time.perf_counter()
                data_ = {
                    "image_id": p["image_id"],
                    "shown_version": p["version"],
                    "predicted": p["predicted"],
                    "label": label,
                }
                files = {}
                if args.mask != "none":
                    box = np.zeros((size, size), np.uint8)
                    q = size // 4
                    if args.mask == "ignore":
                        box[:q, :q] = 255  # a corner: "not this"
                        files["ignore_mask"] = ("m.png", png_bytes(box), "image/png")
                    else:
                        box[q : 3 * q, q : 3 * q] = 255  # the centre: "this"
                        files["mask"] = ("m.png", png_bytes(box), "image/png")
                item = client.post("/api/feedback", data=data_, files=files, headers=auth).json()
                while True:
                    got = client.get(f"/api/feedback/{item['id']}", headers=auth).json()
                    if got["status"] == "used":
                        break
                    if time.perf_counter() - start > args.update_timeout:
                        # a failed update leaves its items pending and is retried: say so
                        # instead of waiting for ever
                        raise SystemExit(
                            f"feedback item {item['id']} still {got['status']!r} after "
                            f"{args.update_timeout:g} s; the newest version says: "
                            f"{newest(sessions).reason}"
                        )
                    time.sleep(args.poll)
                update_times.append(time.perf_counter() - start)
                reason = newest(sessions).reason
                print(f"update {k + 1}: {update_times[-1]:.1f} s, {reason}", flush=True)
        engine.dispose()
    print(
        "submit -> update used (fine-tune + gate): "
        + ", ".join(f"{t:.2f} s" for t in update_times)
        + f" (median {np.median(update_times):.2f} s)"
    )


if __name__ == "__main__":
    main()
