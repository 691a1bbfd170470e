"""What the offline proposer's start-up costs a clinician: predictions timed while
``serve --propose-with offline`` computes the stored images' offline activations in the
background (``proposals.warm_offline``), and again once it is done; the warm-up's own time.

    OMP_NUM_THREADS=2 python bench/offline_warmup.py --data /tmp/demo-data --stored 600

``--data`` is a data dir (the demo's model is served, trained if absent); it is copied, and
``--stored`` synthetic 256 px images are stored in the copy before the app starts, as if
uploaded earlier.
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
from app_latency import timed_predictions  # bench/, beside this script
from fastapi.testclient import TestClient

from feedbackcam.data.synth import SynthConfig, make_synthderm
from feedbackcam.service import Settings, create_app
from feedbackcam.service.auth import add_user
from feedbackcam.service.db import connect
from feedbackcam.service.demo import ensure_demo
from feedbackcam.service.routers.proposals import offline_features
from feedbackcam.service.store import Store
from feedbackcam.service.uploads import png_bytes


def summary(times: list[float]) -> str:
    p50, p95 = np.percentile(np.array(times) * 1000, [50, 95])
    return f"p50 {p50:.0f} ms, p95 {p95:.0f} ms (n = {len(times)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--stored", type=int, default=600, help="images stored before the start")
    parser.add_argument("--n", type=int, default=30, help="predictions timed in each phase")
    args = parser.parse_args()
    ensure_demo(args.data, model=True)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        shutil.copytree(args.data, data, ignore=shutil.ignore_patterns("feedbackcam.db*"))
        store = Store(data)
        for image in make_synthderm(SynthConfig(n=args.stored, size=256, seed=5)).images:
            store.put("images", png_bytes(image))
        asked = make_synthderm(SynthConfig(n=2 * args.n + 1, size=256, seed=6)).images
        for propose_with in ("served", "offline"):
            offline_features.clear()
            settings = Settings(
                data_dir=data,
                bootstrap_admin=False,
                rate_limit_per_minute=0,
                worker=False,
                propose_with=propose_with,
            )
            engine, sessions = connect(settings.database_url)
            with sessions() as session:
                auth = {"Authorization": f"Bearer {add_user(session, propose_with, 'clinician')}"}
            started = time.perf_counter()
            with TestClient(create_app(settings)) as client:
                timed_predictions(client, auth, asked[:1])  # the first prediction's set-up
                warmup = client.app.state.offline_warmup
                during = timed_predictions(client, auth, asked[1 : 1 + args.n])
                busy = warmup is not None and warmup.is_alive()
                if warmup is not None:
                    warmup.join()
                    took = time.perf_counter() - started
                    print(f"{propose_with}: warm-up of {args.stored} stored images {took:.0f} s")
                after = timed_predictions(client, auth, asked[1 + args.n :])
            engine.dispose()
            phase = "during the warm-up" if busy else "right after start"
            print(f"{propose_with}: predict + explain {phase}: {summary(during)}")
            print(f"{propose_with}: predict + explain after it: {summary(after)}", flush=True)


if __name__ == "__main__":
    main()
