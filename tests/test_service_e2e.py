"""End to end in real headless Chromium: upload an image, paint the region on the canvas, submit
feedback, wait for the update, and see the new explanation beside the old one."""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from feedbackcam.checkpoint import ModelSpec, save_checkpoint
from feedbackcam.data.synth import CLASSES, SynthConfig, as_array_dataset, make_synthderm
from feedbackcam.models import build_model
from feedbackcam.service import Settings, create_app
from feedbackcam.service.auth import add_user
from feedbackcam.service.datasets import save_npz
from feedbackcam.service.db import Item, connect

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() or not CHROMEDRIVER.exists(),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)",
)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
uvicorn = pytest.importorskip("uvicorn")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SIZE = 48


@pytest.fixture
def served(tmp_path):
    """The app under uvicorn in a thread, on a free port of 127.0.0.1, and a clinician's token."""
    torch.manual_seed(0)
    model = build_model("small_cnn", len(CLASSES), width=8)
    spec = ModelSpec("small_cnn", CLASSES, model.layers, SIZE, {"width": 8})
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", model, spec)
    data = tmp_path / "data"
    validation = make_synthderm(SynthConfig(n=30, size=SIZE, seed=101))
    save_npz(data / "validation.npz", as_array_dataset(validation))
    settings = Settings(
        data_dir=data,
        model=checkpoint,
        bootstrap_admin=False,
        lr=1e-2,
        tolerance=1.0,
        steps=4,
        grace_seconds=0,
    )
    engine, sessions = connect(settings.database_url)
    with sessions() as session:
        token = add_user(session, "clinician", "clinician")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield {
        "url": f"http://127.0.0.1:{sock.getsockname()[1]}/",
        "token": token,
        "sessions": sessions,
        "tmp": tmp_path,
    }
    server.should_exit = True
    thread.join(30)
    sock.close()
    engine.dispose()


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1360,1100")
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


PAINTED = """
const c = document.getElementById('paint');
const d = c.getContext('2d', {willReadFrequently: true}).getImageData(0, 0, c.width, c.height);
let n = 0;
for (let i = 3; i < d.data.length; i += 4) if (d.data[i] > 127) n++;
return n / (c.width * c.height);
"""


def test_upload_paint_submit_and_see_the_updated_explanation(served, browser):
    image = make_synthderm(SynthConfig(n=1, size=96, seed=7)).images[0]
    upload = served["tmp"] / "lesion.png"
    Image.fromarray(image).save(upload)
    wait = WebDriverWait(browser, 30)

    browser.get(served["url"])
    browser.find_element(By.ID, "token").send_keys(served["token"])
    browser.find_element(By.CSS_SELECTOR, "#signin button[type=submit]").click()
    wait.until(EC.visibility_of_element_located((By.ID, "app")))
    assert browser.find_element(By.ID, "user-role").text == "clinician"
    assert not browser.find_element(By.ID, "admin").is_displayed()

    browser.find_element(By.ID, "file").send_keys(str(upload))
    wait.until(lambda d: d.find_element(By.ID, "predicted-class").text in CLASSES)
    predicted = browser.find_element(By.ID, "predicted-class").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#probs tbody tr")) == len(CLASSES)
    assert browser.find_element(By.ID, "predicted-version").text == "model version 1"

    # paint a stroke across the upper half of the image with the mouse
    canvas = browser.find_element(By.ID, "paint")

    def paint():
        stroke = ActionChains(browser).move_to_element_with_offset(canvas, -110, -100)
        stroke.click_and_hold()
        for dx, dy in [(40, 10)] * 5 + [(0, 25), (-40, 0), (-40, 0)]:
            stroke.move_by_offset(dx, dy)
        stroke.release().perform()

    paint()
    painted = browser.execute_script(PAINTED)
    assert 0.02 < painted < 0.5
    # undo removes the stroke; painting again brings it back
    browser.find_element(By.ID, "undo").click()
    assert browser.execute_script(PAINTED) == 0
    paint()
    assert browser.execute_script(PAINTED) == pytest.approx(painted, rel=0.05)

    label = next(c for c in CLASSES if c != predicted)
    browser.find_element(By.CSS_SELECTOR, f"input[name=label][value={label}]").click()
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 90).until(EC.visibility_of_element_located((By.ID, "compare")))
    before = browser.find_element(By.ID, "before-caption").text
    after = browser.find_element(By.ID, "after-caption").text
    assert before.startswith("Before: version 1") and after.startswith("After: version 2")
    assert browser.find_element(By.ID, "version-badge").text == "Model version 2"
    assert browser.execute_script(
        "return document.getElementById('before').toDataURL() !== "
        "document.getElementById('after').toDataURL()"
    )
    assert "version 2 is now current" in browser.find_element(By.ID, "feedback-status").text
    browser.save_screenshot(str(served["tmp"] / "app.png"))
    if os.environ.get("FEEDBACKCAM_SCREENSHOT"):
        shutil.copy(served["tmp"] / "app.png", os.environ["FEEDBACKCAM_SCREENSHOT"])

    # what the page sent was stored: the chosen class, the shown version, the painted region
    with served["sessions"]() as session:
        (item,) = session.query(Item).all()
        assert (item.label, item.predicted, item.agree) == (label, predicted, False)
        assert item.shown_version_id == 1 and item.status == "used" and item.update_id == 2
        data_dir = served["tmp"] / "data"
        mask = np.asarray(Image.open(io.BytesIO((data_dir / item.mask_path).read_bytes())))
    assert mask.shape == (SIZE, SIZE)
    on = mask > 0
    assert abs(on.mean() - painted) < 0.05
    assert on[: SIZE // 2].sum() > 0.8 * on.sum()  # the stroke was in the upper half
