"""Screenshots of the feedback page in headless Chromium, desktop (1440x900) and phone (390x844),
with the demo model: a worklist of non-square images, regions painted, one update learned.

    python bench/app_screenshots.py --data /tmp/demo-data --out docs/

``--data`` is a data dir with the demo trained in it (``ensure_demo`` trains it if absent); it
is copied, so the screenshots always start from the same state.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from feedbackcam.cli import main as cli
from feedbackcam.data.synth import SynthConfig, make_synthderm
from feedbackcam.service import Settings, create_app
from feedbackcam.service.auth import add_user
from feedbackcam.service.db import connect
from feedbackcam.service.demo import ensure_demo


def serve(data: Path):
    import uvicorn

    settings = Settings(data_dir=data, bootstrap_admin=False, steps=8)
    engine, sessions = connect(settings.database_url)
    with sessions() as session:
        token = add_user(session, "dr.lee", "admin")
    engine.dispose()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}/", token


def browser(width: int, height: int, mobile: bool):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    if mobile:
        options.add_experimental_option(
            "mobileEmulation",
            {"deviceMetrics": {"width": width, "height": height, "pixelRatio": 2, "touch": True}},
        )
    else:
        options.add_argument(f"--window-size={width},{height}")
    service = webdriver.ChromeService("/usr/bin/chromedriver")
    return webdriver.Chrome(service=service, options=options)


def shoot(url: str, token: str, path: Path, width: int, height: int, mobile: bool) -> None:
    driver = browser(width, height, mobile)
    try:
        if not mobile:
            driver.set_window_size(width, height)
            inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
            driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])
        driver.get(f"{url}#token={token}")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "app").is_displayed())
        Select(driver.find_element(By.ID, "worklist-select")).select_by_index(1)
        wait.until(lambda d: d.execute_script("return !!(state.shown && state.shown.photo)"))
        stage = driver.find_element(By.ID, "stage")
        size = stage.size
        w, h = size["width"], size["height"]
        # a keep region around the lesion and an ignore stripe at the edge
        driver.execute_script(
            """
            const p = state.shown;
            const c = document.getElementById('paint').getContext('2d');
            c.fillStyle = 'rgb(255, 43, 214)';
            c.beginPath();
            c.ellipse(p.width / 2, p.height / 2, p.width * 0.2, p.height * 0.22, 0, 0, 7);
            c.fill();
            const g = document.getElementById('ignore-layer').getContext('2d');
            g.fillStyle = 'rgb(0, 229, 255)';
            g.fillRect(0, p.height * 0.82, p.width * 0.35, p.height * 0.18);
            """
        )
        time.sleep(1.5)
        if mobile:
            driver.execute_script("window.scrollTo(0, 0)")
        else:
            ActionChains(driver).move_to_element_with_offset(stage, w // 5, -h // 5).perform()
        time.sleep(0.3)
        driver.save_screenshot(str(path))
    finally:
        driver.quit()


def worklist_images(folder: Path, n: int = 8) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    synth = make_synthderm(SynthConfig(n=n, size=256, seed=2024))
    for k, image in enumerate(synth.images):
        crop = np.ascontiguousarray(image[32:224])  # 256 x 192: not square
        Image.fromarray(crop).save(folder / f"patient-{k + 1:03d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    ensure_demo(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        shutil.copytree(args.data, data, ignore=shutil.ignore_patterns("feedbackcam.db*"))
        worklist_images(Path(tmp) / "morning")
        connect(Settings(data_dir=data).database_url)[0].dispose()  # a fresh store
        assert cli(["worklist", "add", str(Path(tmp) / "morning"), "--data-dir", str(data)]) == 0
        server, url, token = serve(data)
        try:
            shoot(url, token, args.out / "app.png", 1440, 900, mobile=False)
            shoot(url, token, args.out / "app-phone.png", 390, 844, mobile=True)
        finally:
            server.should_exit = True
    print(f"wrote {args.out / 'app.png'} and {args.out / 'app-phone.png'}")


if __name__ == "__main__":
    main()
