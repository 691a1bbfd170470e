"""The page as a daily tool, in real headless Chromium (issue 12): a worklist reviewed with
Submit & next while an update runs, painting on a zoomed original, keyboard shortcuts, and the
question Agree asks when a region is painted."""

from __future__ import annotations

import io
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from test_service_e2e import CHROMEDRIVER, CHROMIUM  # noqa: E402  (and its skip rule)

import feedbackcam.train as train_module
from feedbackcam.checkpoint import ModelSpec, save_checkpoint
from feedbackcam.cli import main
from feedbackcam.data.synth import CLASSES, SynthConfig, as_array_dataset, make_synthderm
from feedbackcam.models import build_model
from feedbackcam.service import Settings, create_app
from feedbackcam.service.auth import add_user
from feedbackcam.service.datasets import save_npz
from feedbackcam.service.db import Item, WorklistEntry, connect
from feedbackcam.service.originals import to_model

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() or not CHROMEDRIVER.exists(),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)",
)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
uvicorn = pytest.importorskip("uvicorn")

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

SIZE = 48


@pytest.fixture
def start(tmp_path):
    """Start the app (tiny model, a worklist of four 120x90 images) under uvicorn in a thread;
    returns the URL, tokens and database sessions."""
    servers = []

    def run(**overrides):
        torch.manual_seed(0)
        model = build_model("small_cnn", len(CLASSES), width=8)
        spec = ModelSpec("small_cnn", CLASSES, model.layers, SIZE, {"width": 8})
        checkpoint = save_checkpoint(tmp_path / "tiny.pt", model, spec)
        data = tmp_path / "data"
        save_npz(
            data / "validation.npz",
            as_array_dataset(make_synthderm(SynthConfig(n=20, size=SIZE, seed=101))),
        )
        folder = tmp_path / "incoming"
        folder.mkdir()
        for k, image in enumerate(make_synthderm(SynthConfig(n=4, size=96, seed=7)).images):
            Image.fromarray(image).resize((120, 90)).save(folder / f"lesion{k}.png")
        settings = Settings(
            **{
                "data_dir": data,
                "model": checkpoint,
                "bootstrap_admin": False,
                "lr": 1e-2,
                "tolerance": 1.0,
                "steps": 3,
                "poll_seconds": 0.2,
                "grace_seconds": 0,
                **overrides,
            }
        )
        engine, sessions = connect(settings.database_url)
        with sessions() as session:
            tokens = {role: add_user(session, role, role) for role in ("clinician", "admin")}
        assert main(["worklist", "add", str(folder), "--data-dir", str(data)]) == 0
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        servers.append((server, thread, sock, engine))
        return {
            "url": f"http://127.0.0.1:{sock.getsockname()[1]}/",
            "tokens": tokens,
            "sessions": sessions,
            "data": data,
            "tmp": tmp_path,
        }

    yield run
    for server, thread, sock, engine in servers:
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
    options.add_argument("--window-size=1440,900")
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def sign_in(browser, app, role="clinician"):
    browser.get(app["url"])
    browser.find_element(By.ID, "token").send_keys(app["tokens"][role])
    browser.find_element(By.CSS_SELECTOR, "#signin button[type=submit]").click()
    WebDriverWait(browser, 30).until(EC.visibility_of_element_located((By.ID, "app")))


def choose_worklist(browser, index):
    """Pick the worklist at ``index`` of the menu once the page has loaded it. The page
    replaces the menu's options when its worklists arrive (at sign-in, and every ~30 s), so
    an option read in between is stale: read again until the choice is made."""

    def chosen(_):
        try:
            menu = Select(browser.find_element(By.ID, "worklist-select"))
            if len(menu.options) <= index:
                return False  # not loaded yet
            menu.select_by_index(index)
            return menu.first_selected_option.get_attribute("index") == str(index)
        except StaleElementReferenceException:
            return False

    WebDriverWait(browser, 30).until(chosen)


def wait_prediction(browser, image_name=None):
    def ready(d):
        shown = d.execute_script("return state.shown && state.shown.image_id")
        name = d.find_element(By.ID, "image-name").text
        return shown and (image_name is None or image_name in name)

    WebDriverWait(browser, 30).until(ready)
    return browser.find_element(By.ID, "predicted-class").text


def pick_other_class(browser, predicted):
    label = next(c for c in CLASSES if c != predicted)
    browser.find_element(By.CSS_SELECTOR, f"input[name=label][value={label}]").click()
    return label


def paint_stroke(browser, moves, start=(0, 0)):
    stage = browser.find_element(By.ID, "stage")
    stroke = ActionChains(browser).move_to_element_with_offset(stage, *start).click_and_hold()
    for dx, dy in moves:
        stroke.move_by_offset(dx, dy)
    stroke.release().perform()


def painted_fraction(browser, canvas="paint"):
    return browser.execute_script(
        """
        const c = document.getElementById(arguments[0]);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height);
        let n = 0;
        for (let i = 3; i < d.data.length; i += 4) if (d.data[i] > 127) n++;
        return n / (c.width * c.height);
        """,
        canvas,
    )


def wait_shown(browser, element_id, timeout=10, containing=""):
    """The element, once it is displayed and its text holds ``containing``."""

    def shown(d):
        element = d.find_element(By.ID, element_id)
        return element.is_displayed() and containing in element.text and element

    return WebDriverWait(browser, timeout).until(shown)


def focus_page(browser):
    """Send the keys that follow to the page itself (a click on the body could land on the image
    and paint a dot)."""
    browser.execute_script("document.activeElement && document.activeElement.blur()")


def items(app):
    with app["sessions"]() as session:
        return session.query(Item).order_by(Item.id).all()


def test_a_worklist_with_submit_and_next_while_an_update_runs(start, browser, monkeypatch):
    release, entered = threading.Event(), threading.Event()
    real_step = train_module.feedback_step

    def held_step(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "feedback_step", held_step)
    app = start()
    sign_in(browser, app)
    # the worklist added with `feedbackcam worklist add` is pointed out at sign-in
    hint = wait_shown(browser, "worklist-hint", 10)
    assert "incoming (4 new)" in hint.text
    choose_worklist(browser, 1)
    predicted = wait_prediction(browser, "lesion0.png")
    assert not browser.find_element(By.ID, "worklist-hint").is_displayed()
    current = browser.find_element(By.CSS_SELECTOR, "#worklist-entries .current")
    assert "lesion0.png" in current.text and current.get_attribute("aria-current") == "true"
    # the original is shown at its aspect ratio (120x90), not the model's square
    stage = browser.find_element(By.ID, "stage").size
    assert stage["width"] / stage["height"] == pytest.approx(120 / 90, rel=0.02)

    pick_other_class(browser, predicted)
    browser.find_element(By.ID, "submit-next").click()
    predicted = wait_prediction(browser, "lesion1.png")
    assert entered.wait(20), "the update did not start"
    WebDriverWait(browser, 10).until(
        lambda d: "Learning from 1 item" in d.find_element(By.ID, "update-state").text
    )
    controls = ["submit", "submit-next", "agree", "next", "prev", "skip", "undo", "file"]
    for control in controls:  # nothing waits for the update
        assert browser.find_element(By.ID, control).is_enabled(), control
    pick_other_class(browser, predicted)
    browser.find_element(By.ID, "submit-next").click()
    wait_prediction(browser, "lesion2.png")
    browser.find_element(By.ID, "skip").click()
    wait_prediction(browser, "lesion3.png")
    counts = browser.find_element(By.ID, "worklist-counts").text
    assert "Image 4 of 4" in counts and "2 with feedback" in counts and "1 skipped" in counts
    assert len(items(app)) == 2 and items(app)[1].status == "pending"  # queued behind
    browser.find_element(By.ID, "prev").click()
    wait_prediction(browser, "lesion2.png")
    release.set()
    WebDriverWait(browser, 60).until(lambda d: "you said" in d.find_element(By.ID, "outcome").text)
    outcome = browser.find_element(By.ID, "outcome").text
    assert "agrees with you" in outcome or "disagrees with you" in outcome
    # the short answer is in view at 1440x900, where the clinician works (the panel is not)
    brief = wait_shown(browser, "outcome-brief", 10)
    assert "Feedback #" in brief.text
    assert browser.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "return r.top >= 0 && r.bottom <= window.innerHeight;",
        brief,
    ), "the outcome is below the fold"
    WebDriverWait(browser, 60).until(lambda _: all(i.status == "used" for i in items(app)))
    assert [i.update_id for i in items(app)] == [2, 3]  # the second waited for the next update
    with app["sessions"]() as session:
        states = [e.state for e in session.query(WorklistEntry).order_by(WorklistEntry.position)]
    assert states == ["feedback", "feedback", "skipped", "reviewed"]
    # lesion2 was explained by version 1; the model changed under the clinician: they are told
    # (the notice follows the status poll: wait for the text, not for the first display)
    notice = wait_shown(browser, "version-notice", 30, containing="version 3 is now in use")
    assert "explained by version 1" in notice.text
    browser.find_element(By.ID, "re-explain").click()
    WebDriverWait(browser, 20).until(
        lambda d: (
            not d.find_element(By.ID, "version-notice").is_displayed()
            and "version 3" in d.find_element(By.ID, "predicted-version").text
        )
    )


def test_painting_on_a_zoomed_original_is_stored_at_the_model_input_exactly(start, browser):
    app = start(worker=False)
    w, h = 160, 120
    original = np.zeros((h, w, 3), np.uint8)
    original[..., 0] = np.arange(w)[None, :]
    original[..., 1] = np.arange(h)[:, None]
    Image.fromarray(original).save(app["tmp"] / "wide.png")
    sign_in(browser, app)
    browser.find_element(By.ID, "file").send_keys(str(app["tmp"] / "wide.png"))
    predicted = wait_prediction(browser)
    browser.find_element(By.ID, "zoom-in").click()
    browser.find_element(By.ID, "zoom-in").click()
    assert browser.find_element(By.ID, "zoom-value").text == "225 %"
    # a closed outline around the centre with the keep brush, then fill its inside
    browser.find_element(By.CSS_SELECTOR, "input[name=tool][value=keep]").click()
    paint_stroke(browser, [(80, 0), (0, 60), (-80, 0), (0, -60)], start=(-40, -30))
    browser.find_element(By.CSS_SELECTOR, "input[name=tool][value=fill]").click()
    ActionChains(browser).move_to_element_with_offset(
        browser.find_element(By.ID, "stage"), 0, 0
    ).click().perform()
    alpha = np.array(
        browser.execute_script(
            """
            const c = document.getElementById('paint');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            return Array.from({length: c.width * c.height}, (_, i) => d[4 * i + 3]);
            """
        ),
        dtype=np.uint8,
    ).reshape(h, w)
    drawn = alpha > 127
    # the fill closed the box: solid around the centre, and the box is where the stroke was: at
    # 225 % zoom around the centre, a screen px is 1 / (k * 2.25) image px; the box is 80 x 60
    # screen px plus the brush's width (the brush is sized in screen px)
    k = browser.find_element(By.ID, "stage").size["width"] / w
    brush = int(browser.find_element(By.ID, "brush").get_attribute("value"))
    ys, xs = np.nonzero(drawn)
    assert drawn[h // 2, w // 2] and drawn.mean() > 0.9 * (np.ptp(xs) + 1) * (np.ptp(ys) + 1) / (
        w * h
    )
    assert abs(xs.mean() - w / 2) < 1.5 and abs(ys.mean() - h / 2) < 1.5
    assert xs.max() - xs.min() == pytest.approx((80 + brush) / (k * 2.25), abs=1.5)
    assert ys.max() - ys.min() == pytest.approx((60 + brush) / (k * 2.25), abs=1.5)
    pick_other_class(browser, predicted)
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 20).until(lambda _: len(items(app)) == 1)
    (item,) = items(app)
    stored = np.asarray(Image.open(io.BytesIO((app["data"] / item.mask_path).read_bytes())))
    assert stored.shape == (SIZE, SIZE)
    assert np.array_equal(stored > 0, to_model(drawn, SIZE))


def test_keyboard_shortcuts(start, browser):
    app = start(worker=False)
    sign_in(browser, app)
    choose_worklist(browser, 1)
    predicted = wait_prediction(browser, "lesion0.png")

    def press(*keys):
        ActionChains(browser).send_keys(*keys).perform()

    def tool():
        return browser.execute_script(
            "return document.querySelector('input[name=tool]:checked').value"
        )

    focus_page(browser)
    press("?")
    assert browser.find_element(By.ID, "help").is_displayed()
    assert "redo" in browser.find_element(By.ID, "help").text
    press(Keys.ESCAPE)
    assert not browser.find_element(By.ID, "help").is_displayed()
    for key, expected in (
        ("e", "erase"),
        ("f", "fill"),
        ("h", "pan"),
        ("i", "ignore"),
        ("b", "keep"),
    ):
        press(key)
        assert tool() == expected
    brush = int(browser.find_element(By.ID, "brush").get_attribute("value"))
    press("]")
    assert int(browser.find_element(By.ID, "brush").get_attribute("value")) == brush + 4
    press("[")
    press("i")
    paint_stroke(browser, [(60, 0), (0, 30)])
    drawn = painted_fraction(browser, "ignore-layer")
    assert drawn > 0.002 and painted_fraction(browser) == 0
    ActionChains(browser).key_down(Keys.CONTROL).send_keys("z").key_up(Keys.CONTROL).perform()
    assert painted_fraction(browser, "ignore-layer") == 0
    ActionChains(browser).key_down(Keys.CONTROL).key_down(Keys.SHIFT).send_keys("z").key_up(
        Keys.SHIFT
    ).key_up(Keys.CONTROL).perform()
    assert painted_fraction(browser, "ignore-layer") == pytest.approx(drawn)
    press("o")
    assert browser.find_element(By.ID, "outline-only").is_selected()
    assert browser.find_element(By.ID, "outline").is_displayed()
    press("o")
    press("+")
    assert browser.find_element(By.ID, "zoom-value").text == "150 %"
    press("0")
    assert browser.find_element(By.ID, "zoom-value").text == "100 %"
    pick_other_class(browser, predicted)
    focus_page(browser)
    # submit and next
    ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    wait_prediction(browser, "lesion1.png")
    (item,) = items(app)
    assert item.ignore_mask_path and item.mask_path is None and item.label != item.predicted
    press("n")
    wait_prediction(browser, "lesion2.png")
    press("p")
    wait_prediction(browser, "lesion1.png")
    press("a")  # nothing painted: agree is sent at once
    WebDriverWait(browser, 20).until(lambda _: len(items(app)) == 2)
    assert items(app)[1].agree


def test_agree_with_a_painted_region_asks_what_to_do(start, browser):
    app = start(worker=False)
    sign_in(browser, app)
    choose_worklist(browser, 1)
    predicted = wait_prediction(browser, "lesion0.png")

    def agree_and_answer(answer, then_closed=True):
        browser.find_element(By.ID, "agree").click()
        dialog = browser.find_element(By.ID, "ask")
        WebDriverWait(browser, 5).until(lambda _: dialog.is_displayed())
        assert "painted" in browser.find_element(By.ID, "ask-text").text
        buttons = dialog.find_elements(By.CSS_SELECTOR, "#ask-buttons button")
        assert len(buttons) == 3
        next(b for b in buttons if b.text.startswith(answer)).click()
        if then_closed:
            assert not dialog.is_displayed()

    paint_stroke(browser, [(50, 10), (0, 30)])
    agree_and_answer("Cancel")
    time.sleep(0.3)
    assert items(app) == [] and painted_fraction(browser) > 0
    agree_and_answer("The class is right")
    WebDriverWait(browser, 20).until(lambda _: len(items(app)) == 1)
    (item,) = items(app)
    assert (item.agree, item.label, item.predicted) == (False, predicted, predicted)
    assert item.mask_path is not None
    agree_and_answer("Agree, and discard", then_closed=False)
    # feedback on this image is waiting already: the page asks whether this replaces it
    WebDriverWait(browser, 5).until(
        lambda d: "already gave feedback" in d.find_element(By.ID, "ask-text").text
    )
    keep = browser.find_elements(By.CSS_SELECTOR, "#ask-buttons button")
    next(b for b in keep if b.text == "Keep both").click()
    WebDriverWait(browser, 20).until(lambda _: len(items(app)) == 2)
    assert items(app)[1].agree and items(app)[1].mask_path is None


def test_the_phone_layout_fits_and_asks_before_sending(start):
    app = start(worker=False)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    metrics = {"width": 360, "height": 780, "pixelRatio": 2, "touch": True}
    options.add_experimental_option("mobileEmulation", {"deviceMetrics": metrics})
    service = webdriver.ChromeService(str(CHROMEDRIVER))
    phone = webdriver.Chrome(service=service, options=options)
    try:
        sign_in(phone, app, role="admin")  # the admin's page has the most: versions, imports
        choose_worklist(phone, 1)
        predicted = wait_prediction(phone, "lesion0.png")
        wide = phone.execute_script(
            """
            return [...document.querySelectorAll('body *')]
              .filter((el) => el.getBoundingClientRect().right > 360.5 && el.offsetParent)
              .filter((el) => !el.closest('.table-scroll'))  // scrolls inside its box
              .map((el) => `${el.tagName}#${el.id}.${el.className}`);
            """
        )
        assert wide == [] and phone.execute_script("return document.body.scrollWidth") <= 360
        assert phone.execute_script("return window.innerWidth") == 360  # not zoomed out
        small = phone.execute_script(
            """
            const out = [];
            const all = document.querySelectorAll('button, select, label.check, .button-like');
            for (const el of all) {
              const r = el.getBoundingClientRect();
              if (r.width && r.height && r.height < 44 && !el.closest('dialog'))
                out.push(`${el.id || el.textContent.trim().slice(0, 20)}: ${r.height}`);
            }
            return out;
            """
        )
        assert small == []
        pick_other_class(phone, predicted)
        phone.find_element(By.ID, "submit").click()
        dialog = phone.find_element(By.ID, "ask")
        WebDriverWait(phone, 5).until(lambda _: dialog.is_displayed())
        next(b for b in dialog.find_elements(By.TAG_NAME, "button") if b.text == "Cancel").click()
        time.sleep(0.3)
        assert items(app) == []
        phone.find_element(By.ID, "submit").click()
        WebDriverWait(phone, 5).until(lambda _: dialog.is_displayed())
        next(b for b in dialog.find_elements(By.TAG_NAME, "button") if b.text == "Send").click()
        WebDriverWait(phone, 20).until(lambda _: len(items(app)) == 1)
    finally:
        phone.quit()


PINCH = """
const stage = document.getElementById('stage');
const box = stage.getBoundingClientRect();
const cx = box.left + box.width / 2, cy = box.top + box.height / 2;
const fire = (type, id, x, y) => stage.dispatchEvent(new PointerEvent(type, {
  pointerId: id, pointerType: 'touch', isPrimary: id === 1, clientX: x, clientY: y,
  bubbles: true, cancelable: true, button: 0, buttons: type === 'pointerup' ? 0 : 1}));
fire('pointerdown', 1, cx - 20, cy);
fire('pointermove', 1, cx - 22, cy);  // the first finger starts a stroke...
fire('pointerdown', 2, cx + 20, cy);  // ...the second makes it a pinch: the stroke is undone
for (let k = 1; k <= 5; k++) {
  fire('pointermove', 1, cx - 20 - 12 * k, cy);
  fire('pointermove', 2, cx + 20 + 12 * k, cy);
}
fire('pointerup', 1, cx - 80, cy);
fire('pointerup', 2, cx + 80, cy);
"""


def test_wheel_and_pinch_zoom_and_a_pinch_paints_nothing(start, browser):
    app = start(worker=False)
    sign_in(browser, app)
    browser.find_element(By.ID, "file").send_keys(str(app["tmp"] / "incoming" / "lesion0.png"))
    wait_prediction(browser)
    zoom = lambda: int(browser.find_element(By.ID, "zoom-value").text.split()[0])  # noqa: E731
    browser.execute_script(
        "document.getElementById('stage').dispatchEvent(new WheelEvent('wheel', "
        "{deltaY: -300, clientX: 300, clientY: 300, bubbles: true, cancelable: true}))"
    )
    wheeled = zoom()
    assert wheeled > 140
    browser.find_element(By.ID, "zoom-fit").click()
    assert zoom() == 100
    browser.execute_script(PINCH)
    assert zoom() == pytest.approx(100 * 160 / 40, rel=0.05)  # fingers 40 px apart, then 160
    assert painted_fraction(browser) == 0
    # painting still works at the pinched zoom (the brush is sized in screen pixels: 22 px is
    # about one image pixel at 400 %, so a stroke of 60 px paints a thin line)
    paint_stroke(browser, [(60, 0)])
    assert 0 < painted_fraction(browser) < 0.05


def test_withdraw_from_the_page(start, browser):
    app = start(worker=False, grace_seconds=600)
    sign_in(browser, app)
    choose_worklist(browser, 1)
    predicted = wait_prediction(browser, "lesion0.png")
    pick_other_class(browser, predicted)
    browser.find_element(By.ID, "submit").click()
    button = WebDriverWait(browser, 20).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#mine button")
    )
    assert "not learnt yet; you can withdraw it until" in browser.find_element(By.ID, "mine").text
    button.click()
    WebDriverWait(browser, 20).until(lambda _: items(app)[0].status == "withdrawn")
    WebDriverWait(browser, 5).until(
        lambda d: (
            "withdrawn" in d.find_element(By.ID, "mine").text
            and not d.find_elements(By.CSS_SELECTOR, "#mine button")
        )
    )


def test_the_lasso_fills_the_outline_drawn(start, browser):
    app = start(worker=False)
    sign_in(browser, app)
    browser.find_element(By.ID, "file").send_keys(str(app["tmp"] / "incoming" / "lesion1.png"))
    wait_prediction(browser)
    focus_page(browser)
    ActionChains(browser).send_keys("i").perform()
    paint_stroke(browser, [(20, 0)], start=(40, 40))  # an ignore stroke first
    ignored = painted_fraction(browser, "ignore-layer")
    assert ignored > 0 and painted_fraction(browser) == 0
    ActionChains(browser).send_keys("l").perform()
    assert (
        browser.execute_script("return document.querySelector('input[name=tool]:checked').value")
        == "lasso"
    )
    outline = [(120, 0), (0, 90), (-120, 0)]  # three sides
    k = browser.find_element(By.ID, "stage").size["width"] / 120  # screen px per image px
    area = (120 / k) * (90 / k) / (120 * 90)
    # the lasso paints keep, as shown beside it, not the layer of the brush used last
    paint_stroke(browser, outline, start=(-60, -45))
    assert painted_fraction(browser) == pytest.approx(area, rel=0.15)  # closed, filled
    assert painted_fraction(browser, "ignore-layer") == ignored
    browser.find_element(By.ID, "undo").click()
    assert painted_fraction(browser) == 0
    # picking "ignore" beside the tools sends the lasso there
    browser.find_element(By.CSS_SELECTOR, "input[name=into][value=ignore]").click()
    paint_stroke(browser, outline, start=(-60, -45))
    assert painted_fraction(browser, "ignore-layer") == pytest.approx(area + ignored, rel=0.15)
    assert painted_fraction(browser) == 0


def test_enter_after_clicking_a_button_submits_instead_of_pressing_it_again(start, browser):
    app = start(worker=False)
    sign_in(browser, app)
    choose_worklist(browser, 1)
    predicted = wait_prediction(browser, "lesion0.png")

    def keys(*modifiers_and_key):
        *modifiers, key = modifiers_and_key
        chain = ActionChains(browser)
        for m in modifiers:
            chain.key_down(m)
        chain.send_keys(key)
        for m in reversed(modifiers):
            chain.key_up(m)
        chain.perform()

    # a click on the image is a dot of the brush, in every Chromium (a zero-length stroke is not)
    paint_stroke(browser, [], start=(10, 10))
    assert painted_fraction(browser) > 0.001
    keys(Keys.CONTROL, "z")
    assert painted_fraction(browser) == 0
    # the sequence: Clear, Ctrl+Z, Enter submits the region (it cleared it again)
    pick_other_class(browser, predicted)
    browser.find_element(By.ID, "from-model").click()
    drawn = painted_fraction(browser)
    assert drawn > 0
    browser.find_element(By.ID, "clear").click()
    assert painted_fraction(browser) == 0
    keys(Keys.CONTROL, "z")
    assert painted_fraction(browser) == pytest.approx(drawn)
    keys(Keys.ENTER)
    WebDriverWait(browser, 20).until(lambda _: len(items(app)) == 1)
    (item,) = items(app)
    assert item.mask_path is not None and item.label != item.predicted
    # Shift+Enter after "Start from the model's region" submits and moves on
    browser.find_element(By.ID, "next").click()
    predicted = wait_prediction(browser, "lesion1.png")
    pick_other_class(browser, predicted)
    browser.find_element(By.ID, "from-model").click()
    keys(Keys.SHIFT, Keys.ENTER)
    wait_prediction(browser, "lesion2.png")
    assert len(items(app)) == 2 and items(app)[1].mask_path is not None
    # Space after a click pans while held; it does not press the button
    browser.find_element(By.ID, "clear").click()
    ActionChains(browser).key_down(Keys.SPACE).perform()
    assert browser.find_element(By.ID, "stage").get_attribute("data-tool") == "pan"
    ActionChains(browser).key_up(Keys.SPACE).perform()


def test_a_revoked_token_asks_for_a_new_one_and_keeps_the_painting(start, browser, capsys):
    app = start(worker=False)
    sign_in(browser, app)
    browser.find_element(By.ID, "file").send_keys(str(app["tmp"] / "incoming" / "lesion1.png"))
    wait_prediction(browser)
    paint_stroke(browser, [(40, 0), (0, 20)])
    painted = painted_fraction(browser)
    assert painted > 0
    assert main(["users", "revoke", "clinician", "--data-dir", str(app["data"])]) == 0
    dialog = wait_shown(browser, "resign", 10)
    assert "revoked" in dialog.text and "what you painted is kept" in dialog.text
    assert browser.find_element(By.ID, "app").is_displayed()  # the page stays behind the dialog
    capsys.readouterr()
    assert (
        main(["users", "add", "dr-new", "--role", "clinician", "--data-dir", str(app["data"])]) == 0
    )
    token = capsys.readouterr().out.strip().splitlines()[-1]
    browser.find_element(By.ID, "resign-token").send_keys("not-a-token")
    browser.find_element(By.CSS_SELECTOR, "#resign-form button").click()
    WebDriverWait(browser, 10).until(
        lambda d: "does not sign in" in d.find_element(By.ID, "resign-text").text
    )
    browser.find_element(By.ID, "resign-token").clear()
    browser.find_element(By.ID, "resign-token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#resign-form button").click()
    WebDriverWait(browser, 10).until(lambda d: not d.find_element(By.ID, "resign").is_displayed())
    assert painted_fraction(browser) == pytest.approx(painted)  # nothing was lost
    assert browser.find_element(By.ID, "user-name").text == "dr-new"


def test_a_token_about_to_expire_is_said_ahead(start, browser):
    app = start(worker=False)
    with app["sessions"]() as session:
        token = add_user(session, "dr-short", "clinician", days=0.5)
    browser.get(app["url"])
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#signin button").click()
    banner = wait_shown(browser, "expiry", 10)
    assert "Your sign-in expires at" in banner.text


def test_files_left_out_of_an_uploaded_worklist_stay_listed(start, browser):
    app = start(worker=False)
    sign_in(browser, app)
    broken = app["tmp"] / "broken.png"
    broken.write_bytes((app["tmp"] / "incoming" / "lesion0.png").read_bytes()[:-60])
    files = [app["tmp"] / "incoming" / "lesion1.png", app["tmp"] / "incoming" / "lesion2.png"]
    upload = browser.find_element(By.ID, "worklist-files")
    upload.send_keys("\n".join(str(f) for f in [*files, broken]))
    wait_prediction(browser, "lesion1.png")  # the first image opened (its status came and went)
    box = wait_shown(browser, "worklist-skipped", 10)
    assert "1 file(s) were left out" in box.text and "broken.png" in box.text
    browser.find_element(By.ID, "worklist-skipped-close").click()
    assert not browser.find_element(By.ID, "worklist-skipped").is_displayed()


def test_feedback_on_the_same_image_again_asks_to_replace_or_keep_both(start, browser):
    app = start(worker=False)
    sign_in(browser, app)
    choose_worklist(browser, 1)
    predicted = wait_prediction(browser, "lesion0.png")
    pick_other_class(browser, predicted)
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 20).until(lambda _: len(items(app)) == 1)
    # the clinician corrects themselves: draws the region too, and sends again
    browser.find_element(By.ID, "from-model").click()
    browser.find_element(By.ID, "submit").click()
    dialog = wait_shown(browser, "ask", 10)
    assert "already gave feedback on this image" in dialog.text
    next(b for b in dialog.find_elements(By.TAG_NAME, "button") if b.text == "Replace").click()
    WebDriverWait(browser, 20).until(lambda _: len(items(app)) == 2)
    first, second = items(app)
    assert first.status == "withdrawn" and second.status == "pending" and second.mask_path
    WebDriverWait(browser, 10).until(
        lambda d: (
            f"#{first.id}" in d.find_element(By.ID, "mine").text
            and "withdrawn" in d.find_element(By.ID, "mine").text
        )
    )


def test_an_invoice_gets_a_plain_words_warning_with_the_numbers_one_click_away(start, browser):
    from feedbackcam.service.ood import probe_images

    app = start(worker=False)
    sign_in(browser, app)
    invoice = app["tmp"] / "invoice.png"
    Image.fromarray(probe_images(256)["invoice"]).save(invoice)
    browser.find_element(By.ID, "file").send_keys(str(invoice))
    warnings = wait_shown(browser, "warnings", 20)
    assert "does not look like the skin images" in warnings.text
    assert "energy" not in warnings.text and "percentile" not in warnings.text  # no jargon
    numbers = warnings.find_element(By.TAG_NAME, "details")
    numbers.find_element(By.TAG_NAME, "summary").click()
    assert "feature distance" in numbers.text and "flagged above" in numbers.text
