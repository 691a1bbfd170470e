"""One mark, many images in the app: POST /api/proposals and /api/proposals/accept (the
fixtures come from test_service_api; F811: pytest passes them by name)."""

# ruff: noqa: F811
from __future__ import annotations

import base64
import csv
import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from test_service_api import SIZE, assets, env, png  # noqa: F401

from feedbackcam.checkpoint import ModelSpec, save_checkpoint
from feedbackcam.data.synth import CLASSES
from feedbackcam.models import build_model
from feedbackcam.service.db import Item

PATCH = [220, 60, 200]


def patched(images: np.ndarray, n: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` images from the assets (repeated, shifted), a magenta square on every other one,
    in a corner that changes. Returns (images, patch masks, has)."""
    out = np.stack([np.roll(images[i % len(images)], 3 * i, axis=1) for i in range(n)])
    masks = np.zeros(out.shape[:3], np.uint8)
    has = np.arange(n) % 2 == 0
    for i in np.flatnonzero(has):
        y, x = [(2, 2), (2, 36), (36, 2), (36, 36)][(i // 2) % 4]
        out[i, y : y + 10, x : x + 10] = PATCH
        masks[i, y : y + 10, x : x + 10] = 1
    return out, masks, has


@pytest.fixture(scope="module")
def shortcut_model(assets, tmp_path_factory):
    """The situation the clinician corrects: a model that learned the patch (class 1 when a
    patch is there; 60 full-batch Adam steps on 48 images, a few seconds)."""
    torch.manual_seed(0)
    model = build_model("small_cnn", len(CLASSES), width=8)
    images, _, has = patched(assets["images"], 48)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(has.astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x).logits, y).backward()
        opt.step()
    spec = ModelSpec("small_cnn", CLASSES, model.layers, SIZE, {"width": 8})
    return save_checkpoint(tmp_path_factory.mktemp("shortcut") / "shortcut.pt", model, spec)


def upload(client, env, rgb) -> dict:
    files = {"file": ("x.png", png(rgb), "image/png")}
    r = client.post("/api/predict", files=files, headers=env.auth("clinician"))
    assert r.status_code == 200, r.text
    return r.json()


def mark(client, env, p, mask, role="clinician") -> dict:
    data = {"image_id": p["image_id"], "shown_version": 1, "predicted": p["predicted"]}
    files = {"ignore_mask": ("i.png", png(mask * 255), "image/png")}
    r = client.post("/api/feedback", data=data, files=files, headers=env.auth(role))
    assert r.status_code == 201, r.text
    return r.json()


def mask_of(data_url: str) -> np.ndarray:
    raw = base64.b64decode(data_url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("L")) > 127


def test_a_mark_proposes_the_same_artifact_and_accepting_stores_propagated_feedback(
    env, shortcut_model
):
    images, masks, has = patched(env.assets["images"])
    with env.app(worker=False, model=shortcut_model, propose_with="served") as client:
        shown = [upload(client, env, rgb) for rgb in images]
        source = mark(client, env, shown[0], masks[0])
        body = {"items": [source["id"]], "threshold": 0.5}
        r = client.post("/api/proposals", json=body, headers=env.auth("clinician"))
        assert r.status_code == 200, r.text
        got = r.json()
        ids = [p["image_id"] for p in got["proposals"]]
        assert shown[0]["image_id"] not in ids and got["scored"] == len(images) - 1
        scores = [p["score"] for p in got["proposals"]]
        assert scores == sorted(scores, reverse=True)
        index = {s["image_id"]: k for k, s in enumerate(shown)}
        top = [index[i] for i in ids[: int(has.sum()) - 1]]
        assert has[top].all()  # the patched images come first
        proposed = [p for p in got["proposals"] if p["proposed"]]
        assert proposed and got["proposed"] == len(proposed)
        best = proposed[0]
        k = index[best["image_id"]]
        m = mask_of(best["mask_png"])
        assert (m & masks[k].astype(bool)).sum() / (m | masks[k].astype(bool)).sum() >= 0.3

        accepted = [{"image_id": p["image_id"], "mask_base64": p["mask_png"]} for p in proposed[:2]]
        req = {"items": [source["id"]], "shown_version": 1, "accepted": accepted}
        r = client.post("/api/proposals/accept", json=req, headers=env.auth("clinician"))
        assert r.status_code == 201, r.text
        items = r.json()
        assert [i["image_id"] for i in items] == [a["image_id"] for a in accepted]
        assert all(i["propagated_from"] == source["id"] and i["ignore_mask_url"] for i in items)
        assert all(i["label"] == i["predicted"] and not i["agree"] for i in items)
        with env.sessions() as session:
            row = session.get(Item, items[0]["id"])
            assert row.propagated_from == source["id"] and row.status == "pending"
        stored = client.get(items[0]["ignore_mask_url"], headers=env.auth("clinician")).content
        assert np.array_equal(
            np.asarray(Image.open(io.BytesIO(stored))) > 127, mask_of(accepted[0]["mask_base64"])
        )
        # the export says which rows were found from a mark
        zipped = client.get("/api/export.zip", headers=env.auth("admin"))
        with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive:
            text = archive.read("feedback/labels.csv").decode()
        rows = {r["id"]: r for r in csv.DictReader(text.splitlines())}
        assert rows[f"fb{items[0]['id']:06d}"]["propagated_from"] == f"fb{source['id']:06d}"
        assert rows[f"fb{source['id']:06d}"]["propagated_from"] == ""
        # accepting the same proposals again stores nothing new
        again = client.post("/api/proposals/accept", json=req, headers=env.auth("clinician"))
        assert [i["id"] for i in again.json()] == [i["id"] for i in items]
        with env.sessions() as session:
            assert session.query(Item).count() == 1 + len(items)
        # "Find more like these": the source and the accepted marks, the reviewed images left out
        rejected = [p["image_id"] for p in got["proposals"] if p not in proposed[:2]][:1]
        reviewed = [a["image_id"] for a in accepted] + rejected
        body = {"items": [source["id"]] + [i["id"] for i in items], "exclude": reviewed}
        body["threshold"] = 0.5
        more = client.post("/api/proposals", json=body, headers=env.auth("clinician")).json()
        assert more["scored"] == len(images) - 1 - len(reviewed)
        assert not {p["image_id"] for p in more["proposals"]} & {*reviewed, shown[0]["image_id"]}
        too_many = {"items": [source["id"]] * 51}
        r = client.post("/api/proposals", json=too_many, headers=env.auth("clinician"))
        assert r.status_code == 422


def test_proposals_from_the_offline_network_find_the_patch_at_the_served_size(env, shortcut_model):
    """``serve --propose-with offline`` (the default): the offline ImageNet EfficientNet-Lite0
    (no download) at 256 px with query expansion scores the images; its masks come back at the
    served model's input, where accepting stores them."""
    from feedbackcam.propagate import LITE0_THRESHOLD
    from feedbackcam.service.routers import proposals as router

    router._offline_network.cache_clear()
    router.offline_features.clear()
    images, masks, has = patched(env.assets["images"])
    with env.app(worker=False, model=shortcut_model) as client:  # the default: offline
        shown = [upload(client, env, rgb) for rgb in images]
        source = mark(client, env, shown[0], masks[0])
        r = client.post("/api/proposals", json={"items": [source["id"]]},
                        headers=env.auth("clinician"))  # fmt: skip
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["threshold"] == LITE0_THRESHOLD and got["scored"] == len(images) - 1
        assert router._offline_network.cache_info().currsize == 1  # scored by it, not the model
        assert router.offline_features.computed == len(images)
        index = {s["image_id"]: k for k, s in enumerate(shown)}
        ids = [p["image_id"] for p in got["proposals"]]
        top = [index[i] for i in ids[: int(has.sum()) - 1]]
        assert has[top].all()  # the patched images come first
        best = got["proposals"][0]
        m = mask_of(best["mask_png"])
        assert m.shape == (SIZE, SIZE)
        k = index[best["image_id"]]
        assert (m & masks[k].astype(bool)).sum() / (m | masks[k].astype(bool)).sum() >= 0.3
        accepted = [{"image_id": best["image_id"], "mask_base64": best["mask_png"]}]
        req = {"items": [source["id"]], "shown_version": 1, "accepted": accepted}
        r = client.post("/api/proposals/accept", json=req, headers=env.auth("clinician"))
        assert r.status_code == 201, r.text
        # asked again: the same scores from the kept activations, no image through the network
        ask = {"items": [source["id"]]}
        again = client.post("/api/proposals", json=ask, headers=env.auth("clinician")).json()
        assert router.offline_features.computed == len(images)
        # the same scores; the accepted image, now marked there by this clinician, is not offered
        assert [(p["image_id"], p["score"]) for p in again["proposals"]] == [
            (p["image_id"], p["score"]) for p in got["proposals"] if p is not best
        ]
        assert again["scored"] == got["scored"] - 1
        # another clinician's marks do not hide it from them
        theirs = mark(client, env, shown[0], masks[0], role="admin")
        r = client.post("/api/proposals", json={"items": [theirs["id"]]}, headers=env.auth("admin"))
        assert best["image_id"] in [p["image_id"] for p in r.json()["proposals"]]
        # one more image: the network sees that one only
        upload(client, env, np.roll(images[1], 5, axis=0))
        more = client.post("/api/proposals", json=ask, headers=env.auth("clinician")).json()
        assert more["scored"] == len(images) - 1
        assert router.offline_features.computed == len(images) + 1


def test_proposals_refuse_what_is_not_the_users_to_propagate(env):
    images, masks, has = patched(env.assets["images"], n=6)
    with env.app(worker=False) as client:
        shown = [upload(client, env, rgb) for rgb in images]
        mine = mark(client, env, shown[0], masks[0])
        admin_item = mark(client, env, shown[2], masks[2], role="admin")
        auth = env.auth("clinician")
        r = client.post("/api/proposals", json={"items": [admin_item["id"]]}, headers=auth)
        assert r.status_code == 404  # another clinician's mark is not found
        data = {"image_id": shown[1]["image_id"], "shown_version": 1, "agree": "true"}
        data["predicted"] = shown[1]["predicted"]
        plain = client.post("/api/feedback", data=data, headers=auth).json()
        r = client.post("/api/proposals", json={"items": [plain["id"]]}, headers=auth)
        assert r.status_code == 422 and "no ignore mask" in r.json()["detail"]
        r = client.post("/api/proposals", json={"items": [mine["id"]]}, headers=env.auth("viewer"))
        assert r.status_code == 403
        # an accepted mask that is empty or not an image: nothing is stored
        empty = mask_png(np.zeros((SIZE, SIZE), np.uint8))
        bad = [
            {"image_id": shown[3]["image_id"], "mask_base64": mask_png(masks[2])},
            {"image_id": shown[4]["image_id"], "mask_base64": empty},
        ]
        req = {"items": [mine["id"]], "shown_version": 1, "accepted": bad}
        r = client.post("/api/proposals/accept", json=req, headers=auth)
        assert r.status_code == 422 and "accepted[1]" in r.json()["detail"]
        with env.sessions() as session:
            assert session.query(Item).filter(Item.propagated_from.isnot(None)).count() == 0


def mask_png(mask: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png(mask * 255)).decode()


def test_the_readme_curl_example_for_ignore_feedback_is_accepted(env):
    """The README's `curl ... /api/feedback` line, its fields filled from a prediction, is
    accepted as it is written (it once lacked `predicted` and answered 422)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    line = next(s for s in readme.splitlines() if "curl" in s and "/api/feedback" in s)
    fields = dict(re.findall(r"-F (\w+)=(\S+)", line))
    with env.app(worker=False) as client:
        p = upload(client, env, env.assets["images"][0])
        values = {"$ID": p["image_id"], "$V": str(p["version"]), "$P": p["predicted"]}
        ignore = np.zeros((SIZE, SIZE), np.uint8)
        ignore[:8, :8] = 1
        data, files = {}, {}
        for name, value in fields.items():
            if value.startswith("@"):
                files[name] = (value[1:], png(ignore * 255), "image/png")
            else:
                data[name] = values.get(value, value)
        r = client.post("/api/feedback", data=data, files=files, headers=env.auth("clinician"))
        assert r.status_code == 201, (fields, r.text)
        assert r.json()["ignore_mask_url"]


def test_the_offline_proposer_computes_the_stored_images_at_start(env, shortcut_model):
    """``serve --propose-with offline`` computes the offline activations of the stored images
    in the background at start: the first request then computes none of them again."""
    from feedbackcam.service.routers import proposals as router

    images, masks, _ = patched(env.assets["images"])
    with env.app(worker=False, model=shortcut_model, propose_with="served") as client:
        assert client.app.state.offline_warmup is None  # the served model's layer: nothing to warm
        shown = [upload(client, env, rgb) for rgb in images]
        source = mark(client, env, shown[0], masks[0])
    router.offline_features.clear()
    with env.app(worker=False, model=shortcut_model, propose_with="offline") as client:
        client.app.state.offline_warmup.join(timeout=600)
        assert router.offline_features.computed == len(images)
        r = client.post("/api/proposals", json={"items": [source["id"]]},
                        headers=env.auth("clinician"))  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["scored"] == len(images) - 1
        assert router.offline_features.computed == len(images)  # nothing computed again


def test_offline_activations_computed_by_another_caller_are_not_computed_again():
    """Two callers missing the same images (the start-up's warm-up and a request): the one that
    waits for the network looks again and takes what the other computed."""
    import threading

    from feedbackcam.service.routers.proposals import OfflineFeatures

    class Gate:
        """The network's lock, saying when a caller starts waiting for it."""

        def __init__(self) -> None:
            self.lock, self.waiting = threading.Lock(), threading.Event()

        def __enter__(self):
            self.waiting.set()
            self.lock.acquire()

        def __exit__(self, *exc) -> None:
            self.lock.release()

    cache = OfflineFeatures(10)
    cache.network_lock = gate = Gate()
    ids, images = ["a", "b"], np.zeros((2, 32, 32, 3), np.uint8)
    got = {}
    with gate.lock:  # another caller is computing
        waiter = threading.Thread(target=lambda: got.update(f=cache(ids, images)))
        waiter.start()
        assert gate.waiting.wait(timeout=60)  # the waiter found them missing and waits
        done = {i: torch.full((4, 1, 1), float(k)) for k, i in enumerate(ids)}
        cache._keep(ids, done, len(ids))  # ... and the other caller keeps its result
    waiter.join(timeout=600)
    assert cache.computed == len(ids)  # the waiter computed nothing
    assert torch.equal(got["f"], torch.stack([done["a"], done["b"]]))


def test_propose_with_names_what_it_accepts():
    from feedbackcam.service.settings import Settings

    with pytest.raises(ValueError, match="propose_with"):
        Settings(data_dir="x", propose_with="imagenet")
