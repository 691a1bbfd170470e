"""A burst against the running app: N requests at once (predict uploads and feedback mixed)
from several tokens; every answer's status and wait, and whether every accepted item is stored.

    OMP_NUM_THREADS=2 python bench/burst.py --data /tmp/burst-data [--requests 200 --tokens 10]
        [--out docs/benchmarks/burst.json]

``--data``: a data dir (copied; the demo's model is trained there if absent). The app runs
under uvicorn in this process with its default limits (``serve``'s defaults); the burst is sent
from one thread per request over real HTTP.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from sqlalchemy import func, select

from feedbackcam.data.synth import SynthConfig, make_synthderm
from feedbackcam.service import Settings, create_app
from feedbackcam.service.auth import add_user
from feedbackcam.service.db import Item, connect
from feedbackcam.service.demo import ensure_demo
from feedbackcam.service.uploads import png_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    ensure_demo(args.data)
    work = Path(tempfile.mkdtemp()) / "data"
    shutil.copytree(args.data, work)
    settings = Settings(data_dir=work, bootstrap_admin=False, worker=True)
    engine, sessions = connect(settings.database_url)
    with sessions() as session:
        tokens = [add_user(session, f"dr{k}", "clinician") for k in range(args.tokens)]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    images = make_synthderm(SynthConfig(n=args.requests, size=256, seed=5)).images
    auth = [{"Authorization": f"Bearer {t}"} for t in tokens]
    with httpx.Client(base_url=url, timeout=120) as client:  # one image per token to correct
        shown = []
        for k, headers in enumerate(auth):
            r = client.post(
                "/api/predict", files={"file": ("a.png", png_bytes(images[k]))}, headers=headers
            )
            shown.append(r.json())

    uploads = [png_bytes(image) for image in images]  # encoded before the burst, not during it
    mask = png_bytes(np.pad(np.full((16, 16), 255, np.uint8), 24))
    go = threading.Barrier(args.requests)

    def one(k: int):
        headers = auth[k % len(auth)]
        with httpx.Client(base_url=url, timeout=120) as client:
            go.wait()  # all at once
            start = time.monotonic()
            if k % 2 == 0:
                r = client.post(
                    "/api/predict", files={"file": ("b.png", uploads[k])}, headers=headers
                )
            else:
                p = shown[k % len(auth)]
                other = next(c for c in p["probabilities"] if c != p["predicted"])
                r = client.post(
                    "/api/feedback",
                    data={
                        "image_id": p["image_id"],
                        "shown_version": p["version"],
                        "predicted": p["predicted"],
                        "label": other,
                        "on_conflict": "keep_both",
                    },
                    files={"mask": ("m.png", mask)},
                    headers={**headers, "Idempotency-Key": f"burst-{k}"},
                )
        return ("predict" if k % 2 == 0 else "feedback"), r.status_code, time.monotonic() - start

    barrier_start = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.requests) as pool:
        results = list(pool.map(one, range(args.requests)))
    total = time.monotonic() - barrier_start
    with sessions() as session:
        stored = session.scalar(select(func.count()).select_from(Item))
    server.should_exit = True
    thread.join(30)
    engine.dispose()
    waits = np.array([w for _, _, w in results])
    accepted = sum(1 for kind, status, _ in results if kind == "feedback" and status in (200, 201))
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), CPU",
        "requests": args.requests,
        "tokens": args.tokens,
        "statuses": dict(Counter(f"{kind} {status}" for kind, status, _ in results)),
        "server_errors_500": sum(1 for _, status, _ in results if status == 500),
        "wait_s": {
            "p50": round(float(np.median(waits)), 2),
            "p95": round(float(np.quantile(waits, 0.95)), 2),
            "max": round(float(waits.max()), 2),
        },
        "burst_s": round(total, 1),
        "feedback_accepted": accepted,
        "feedback_stored": stored,
        "every_accepted_item_stored": stored == accepted,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
