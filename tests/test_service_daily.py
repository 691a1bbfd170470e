"""The app as a daily tool (issue 12): feedback during an update, originals and the exact mask
map, the ignore mask, withdrawing, token expiry and revocation, rollback confirmation, flagged
regressions, uncertainty warnings, worklists and the export. Same tiny model and data as
test_service_api, whose fixtures are imported (hence F811: pytest passes them by name)."""

# ruff: noqa: F811

from __future__ import annotations

import csv
import io
import re
import threading
import zipfile
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from test_service_api import (  # noqa: F401
    SIZE,
    Env,
    assets,
    box_mask,
    env,
    other_class,
    png,
    predict_upload,
    send_feedback,
    wait_used,
)

import feedbackcam.service
import feedbackcam.train as train_module
from feedbackcam.cli import main
from feedbackcam.data.prepared import load_prepared, load_prepared_ignore
from feedbackcam.data.synth import CLASSES
from feedbackcam.service.db import Item, User, Version, utcnow
from feedbackcam.service.ood import energies
from feedbackcam.service.originals import source_index, to_model


def store_args(env) -> list[str]:
    """The CLI's options for the env's data dir and database (SQLite or PostgreSQL)."""
    url = env.base.get("db_url")
    return ["--data-dir", str(env.data), *(["--db", url] if url else [])]


def hold_training(monkeypatch):
    """Make updates wait inside their first optimizer step until ``release`` is set."""
    release, entered = threading.Event(), threading.Event()
    real_step = train_module.feedback_step

    def held_step(*args, **kwargs):
        entered.set()
        release.wait(10)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "feedback_step", held_step)
    return release, entered


# ------------------------------------------------------------------ never blocked
def test_feedback_given_during_an_update_is_learned_by_the_next_one(env, monkeypatch):
    release, entered = hold_training(monkeypatch)
    with env.app() as client:
        p = predict_upload(client, env)
        first = send_feedback(client, env, p, label=other_class(p)).json()["id"]
        assert entered.wait(10)
        status = client.get("/api/update/status", headers=env.auth("viewer")).json()
        assert status["phase"] == "training" and status["training_items"] == 1
        assert 1 <= status["step"] <= status["steps"] == 4
        # while it trains, feedback is accepted and waits for the next update
        q = predict_upload(client, env, index=1)
        r = send_feedback(client, env, q, mask=box_mask(), label=other_class(q))
        assert r.status_code == 201 and r.json()["status"] == "pending"
        second = r.json()["id"]
        status = client.get("/api/update/status", headers=env.auth("viewer")).json()
        assert status["pending"] == 2 and status["running"]
        release.set()
        one, two = wait_used(client, env, first), wait_used(client, env, second)
        assert one["update_version"] == 2 and two["update_version"] == 3
        # "does the model now agree with you" is kept with the item, for after a reload: the
        # class the promoted version gives the image, as the served model answers now
        for item in (one, two):
            assert item["update_status"] == "promoted"
            assert item["now_predicted"] in CLASSES
        served = client.post(
            "/api/predict", data={"image_id": q["image_id"]}, headers=env.auth("viewer")
        ).json()
        assert served["version"] == 3 and served["predicted"] == two["now_predicted"]
        with env.sessions() as session:
            assert session.get(Version, 3).metrics["update"]["items"] == [second]
        status = client.get("/api/update/status", headers=env.auth("viewer")).json()
        assert status["phase"] == "idle" and status["pending"] == 0 and status["step"] is None
        # feedback on an answer of version 1, now that version 3 is in use: stored, and said
        late = send_feedback(client, env, p, mask=box_mask(), label=other_class(p))
        assert late.status_code == 201
        assert "shown version 1's answer; version 3 is in use now" in late.json()["notes"][0]


# ------------------------------------------------------------------ originals and the mask map
def coordinate_image(w: int, h: int) -> np.ndarray:
    """Red = column, green = row: a model pixel tells which original pixel it shows."""
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = np.arange(w)[None, :]
    image[..., 1] = np.arange(h)[:, None]
    image[..., 2] = 77
    return image


def test_the_original_is_kept_and_a_mask_drawn_on_it_maps_exactly_to_the_model_input(env):
    w, h = 160, 120  # not square; 160 / 48 puts a model pixel centre exactly on a boundary
    original = png(coordinate_image(w, h))
    with env.app(worker=False) as client:
        r = client.post(
            "/api/predict",
            files={"file": ("wide.png", original, "image/png")},
            headers=env.auth("clinician"),
        )
        p = r.json()
        assert (p["width"], p["height"], p["size"]) == (w, h, SIZE)
        shown = client.get(p["original_url"], headers=env.auth("viewer"))
        assert shown.content == original  # as received, byte for byte
        model_input = np.asarray(
            Image.open(io.BytesIO(client.get(p["image_url"], headers=env.auth("viewer")).content))
        )
        assert model_input.shape == (SIZE, SIZE, 3)
        # the documented map: the original pixel under each model pixel's centre
        assert np.array_equal(model_input[0, :, 0], source_index(w, SIZE))
        assert np.array_equal(model_input[:, 0, 1], source_index(h, SIZE))
        # a rectangle drawn on the original, columns 85..121, rows 20..83: model column 25 shows
        # column 85 exactly (25.5 * 160 / 48 = 85); a float resize rounds it to 84
        x0, x1, y0, y1 = 85, 122, 20, 84
        drawn = np.zeros((h, w), np.uint8)
        drawn[y0:y1, x0:x1] = 255
        item = send_feedback(client, env, p, mask=drawn, label=other_class(p)).json()
        stored = np.asarray(
            Image.open(io.BytesIO(client.get(item["mask_url"], headers=env.auth("admin")).content))
        )
        cols, rows = model_input[..., 0].astype(int), model_input[..., 1].astype(int)
        expected = (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)
        assert np.array_equal(stored > 0, expected)
        # other sizes are refused, naming the two accepted
        r = send_feedback(client, env, p, mask=drawn[:, :150], label=other_class(p))
        assert r.status_code == 422 and f"{SIZE}x{SIZE} or {w}x{h}" in r.json()["detail"]


def test_a_phone_photo_is_turned_upright_as_its_exif_orientation_says(env):
    # stored sideways (120 wide, 160 tall) with Orientation 6: shown 160 wide, 120 tall
    upright = np.zeros((120, 160, 3), np.uint8)
    upright[:, :80] = (230, 40, 40)  # left half red as the clinician sees it
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # the sensor's view
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show"
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif, quality=95)
    with env.app(worker=False) as client:
        r = client.post(
            "/api/predict",
            files={"file": ("phone.jpg", buf.getvalue(), "image/jpeg")},
            headers=env.auth("clinician"),
        )
        p = r.json()
        assert (p["width"], p["height"]) == (160, 120), p
        model_input = np.asarray(
            Image.open(io.BytesIO(client.get(p["image_url"], headers=env.auth("viewer")).content))
        ).astype(int)
        left, right = model_input[:, : SIZE // 2 - 2], model_input[:, SIZE // 2 + 2 :]
        assert left[..., 0].mean() > 200 and right[..., 0].mean() < 30  # red left, as shown
        # a mask drawn on the image as shown (160 x 120) is accepted and lands on the left
        drawn = np.zeros((120, 160), np.uint8)
        drawn[:, :80] = 255
        item = send_feedback(client, env, p, mask=drawn, label=other_class(p)).json()
        stored_mask = np.asarray(
            Image.open(io.BytesIO(client.get(item["mask_url"], headers=env.auth("admin")).content))
        )
        assert stored_mask[:, : SIZE // 2 - 2].all() and not stored_mask[:, SIZE // 2 + 2 :].any()


def test_to_model_is_the_identity_at_the_input_size_and_samples_centres():
    a = np.arange(SIZE * SIZE).reshape(SIZE, SIZE)
    assert np.array_equal(to_model(a, SIZE), a)
    assert source_index(160, 48).tolist() == [(2 * i + 1) * 160 // 96 for i in range(48)]
    assert source_index(160, 48)[25] == 85  # 25.5 * 160 / 48 = 85 exactly: no float rounding


def test_the_ignore_mask_is_stored_beside_the_keep_mask(env):
    with env.app(worker=False) as client:
        p = predict_upload(client, env)
        ignore = np.zeros((SIZE, SIZE), np.uint8)
        ignore[40:, :] = 255
        files = {
            "mask": ("m.png", png(box_mask()), "image/png"),
            "ignore_mask": ("i.png", png(ignore), "image/png"),
        }
        data = {"image_id": p["image_id"], "shown_version": 1, "predicted": p["predicted"]}
        item = client.post("/api/feedback", data=data, files=files, headers=env.auth("clinician"))
        item = item.json()
        got = client.get(item["ignore_mask_url"], headers=env.auth("clinician")).content
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(got))), ignore)
        assert item["mask_url"] != item["ignore_mask_url"]
        with env.sessions() as session:
            assert session.get(Item, item["id"]).ignore_mask_path.startswith("masks/")
        # an ignore mask alone with the same class says nothing the model can learn
        empty = {"ignore_mask": ("i.png", png(np.zeros_like(ignore)), "image/png")}
        r = client.post("/api/feedback", data=data, files=empty, headers=env.auth("clinician"))
        assert r.status_code == 422


# ------------------------------------------------------------------ safety and access
def test_withdraw_own_pending_feedback_only(env):
    with env.app(worker=False) as client:
        p = predict_upload(client, env)
        mine = send_feedback(client, env, p, label=other_class(p)).json()["id"]
        kept = send_feedback(client, env, p, mask=box_mask(), label=other_class(p)).json()["id"]
        admin = client.delete(f"/api/feedback/{mine}", headers=env.auth("admin"))
        assert admin.status_code == 403  # not the admin's own
        r = client.delete(f"/api/feedback/{mine}", headers=env.auth("clinician"))
        assert r.status_code == 200 and r.json()["status"] == "withdrawn"
        again = client.delete(f"/api/feedback/{mine}", headers=env.auth("clinician"))
        assert again.status_code == 409
        assert client.delete("/api/feedback/99", headers=env.auth("clinician")).status_code == 404
        status = client.get("/api/update/status", headers=env.auth("viewer")).json()
        assert status["pending"] == 1
    with env.app() as client:  # the next update learns from the other item only
        assert wait_used(client, env, kept)["update_version"] == 2
        with env.sessions() as session:
            assert session.get(Version, 2).metrics["update"]["items"] == [kept]
            assert session.get(Item, mine).status == "withdrawn"
        used = client.delete(f"/api/feedback/{kept}", headers=env.auth("clinician"))
        assert used.status_code == 409 and "used" in used.json()["detail"]


def test_an_automatic_update_waits_out_the_withdraw_window(env):
    with env.app(worker=False, grace_seconds=3600) as client:
        worker = client.app.state.runtime.worker
        p = predict_upload(client, env)
        item = send_feedback(client, env, p, label=other_class(p)).json()
        created = datetime.fromisoformat(item["created"])
        assert datetime.fromisoformat(item["learn_after"]) - created == timedelta(hours=1)
        assert worker.run_once() is None  # inside the window: nothing is learnt
        with env.sessions() as session:
            assert session.get(Item, item["id"]).status == "pending"
        # the author can still take it back, and an item given earlier is learnt
        r = client.delete(f"/api/feedback/{item['id']}", headers=env.auth("clinician"))
        assert r.status_code == 200 and r.json()["learn_after"] is None
        older = send_feedback(client, env, p, mask=box_mask(), label=other_class(p)).json()
        with env.sessions() as session:
            session.get(Item, older["id"]).created = utcnow() - timedelta(hours=2)
            session.commit()
        version = worker.run_once()
        assert version is not None
        with env.sessions() as session:
            assert session.get(Version, version.id).metrics["update"]["items"] == [older["id"]]
        # an admin's "update now" does not wait
        fresh = send_feedback(client, env, p, label=other_class(p), agree=False).json()
        assert worker.run_once(force=True) is not None
        with env.sessions() as session:
            assert session.get(Item, fresh["id"]).status == "used"


def test_the_repeat_digest_covers_the_ignore_mask_and_withdrawing_is_private(env):
    with env.sessions() as session:
        from feedbackcam.service.auth import add_user

        env.tokens["dana"] = add_user(session, "dana", "clinician")
    with env.app(worker=False) as client:
        p = predict_upload(client, env)
        data = {"image_id": p["image_id"], "shown_version": 1, "predicted": p["predicted"]}

        def submit(ignore_rows, role="clinician"):
            ignore = np.zeros((SIZE, SIZE), np.uint8)
            ignore[:ignore_rows] = 255
            files = {
                "mask": ("m.png", png(box_mask()), "image/png"),
                "ignore_mask": ("i.png", png(ignore), "image/png"),
            }
            return client.post("/api/feedback", data=data, files=files, headers=env.auth(role))

        first, again, other = submit(5), submit(5), submit(9)
        assert (first.status_code, again.status_code, other.status_code) == (201, 200, 201)
        assert again.json()["id"] == first.json()["id"] != other.json()["id"]
        mine = first.json()["id"]
        # another clinician's item is not found, as for reading it
        r = client.delete(f"/api/feedback/{mine}", headers=env.auth("dana"))
        assert r.status_code == 404
        r = client.delete(f"/api/feedback/{mine}", headers=env.auth("clinician"))
        assert r.status_code == 200 and r.json()["status"] == "withdrawn"
        # given again after withdrawing it, the same feedback is new feedback
        anew = submit(5)
        assert anew.status_code == 201 and anew.json()["id"] not in (mine, other.json()["id"])
        assert anew.json()["status"] == "pending"


def test_tokens_expire_and_can_be_revoked(env, capsys):
    with env.app(worker=False) as client:
        made = client.post(
            "/api/users",
            json={"name": "erin", "role": "clinician", "days": 1},
            headers=env.auth("admin"),
        )
        erin = {"Authorization": f"Bearer {made.json()['token']}"}
        assert client.get("/api/me", headers=erin).status_code == 200
        with env.sessions() as session:
            user = session.scalar(select(User).where(User.name == "erin"))
            assert timedelta(hours=23) < user.expires - utcnow() <= timedelta(days=1)
            user.expires = utcnow() - timedelta(seconds=1)
            session.commit()
        r = client.get("/api/me", headers=erin)
        assert r.status_code == 401 and "expired" in r.json()["detail"]
        # revoked through the API (admin) ...
        assert client.get("/api/me", headers=env.auth("viewer")).status_code == 200
        assert client.post("/api/users/viewer/revoke", headers=env.auth("admin")).status_code == 204
        assert client.get("/api/me", headers=env.auth("viewer")).status_code == 401
        assert client.post("/api/users/nobody/revoke", headers=env.auth("admin")).status_code == 404
        # an admin cannot lock themselves (and, the last admin, everyone) out from the page
        own = client.post("/api/users/admin/revoke", headers=env.auth("admin"))
        assert own.status_code == 409 and "your own token" in own.json()["detail"]
        assert client.get("/api/me", headers=env.auth("admin")).status_code == 200
        # ... and on the command line
        assert main(["users", "revoke", "clinician", *store_args(env)]) == 0
        assert client.get("/api/me", headers=env.auth("clinician")).status_code == 401
        assert client.get("/api/me", headers=env.auth("admin")).status_code == 200
    assert main(["users", "list", *store_args(env)]) == 0
    assert "clinician\tclinician\trevoked" in capsys.readouterr().out


def test_rollback_needs_confirmation(env):
    with env.app() as client:
        p = predict_upload(client, env)
        wait_used(client, env, send_feedback(client, env, p, label=other_class(p)).json()["id"])
        for query in ("", "?confirm=false"):
            r = client.post(f"/api/versions/1/activate{query}", headers=env.auth("admin"))
            assert r.status_code == 422 and "confirm=true" in r.json()["detail"]
            assert predict_upload(client, env)["version"] == 2  # nothing changed
        r = client.post("/api/versions/1/activate?confirm=true", headers=env.auth("admin"))
        assert r.status_code == 200 and predict_upload(client, env)["version"] == 1
        # a missing version is missing, confirmed or not
        assert client.post("/api/versions/9/activate", headers=env.auth("admin")).status_code == 404


# ------------------------------------------------------------------ honest outcomes
def test_a_promotion_that_lowers_jaccard_or_sensitivity_is_flagged(env):
    with env.app(worker=False) as client:
        base = {"validation": "v1", "accuracy": 0.6, "avg_sensitivity": 0.5}
        with env.sessions.begin() as session:
            session.get(Version, 1).metrics = {**base, "jaccard_mean": 0.572}
            for parent, jaccard, sensitivity in ((1, 0.55, 0.5), (2, 0.6, 0.52)):
                metrics = {**base, "jaccard_mean": jaccard, "avg_sensitivity": sensitivity}
                session.add(Version(parent_id=parent, status="promoted", metrics=metrics))
        versions = {
            v["id"]: v for v in client.get("/api/versions", headers=env.auth("admin")).json()
        }
        assert versions[2]["regressions"] == ["validation Jaccard fell 0.572 -> 0.550"]
        assert versions[2]["parent_metrics"]["jaccard_mean"] == 0.572
        assert versions[3]["regressions"] == [] and versions[1]["regressions"] == []
        one = client.get("/api/versions/2", headers=env.auth("clinician")).json()
        assert one == versions[2]  # a clinician sees what the update that used their item did
        assert client.get("/api/versions/9", headers=env.auth("clinician")).status_code == 404


# ------------------------------------------------------------------ uncertainty
def test_low_confidence_and_unfamiliar_images_are_warned_about(tmp_path, assets):
    from feedbackcam.service.ood import probe_images

    e = Env(tmp_path, assets, low_confidence=1.0)
    with e.app(worker=False) as client:
        served = client.app.state.runtime.registry.served
        threshold = float(np.quantile(energies(served, assets["validation"].images), 0.99))
        flagged = 0
        for index in range(6):  # images like the validation set's
            p = predict_upload(client, e, index=index)
            assert p["energy_threshold"] == pytest.approx(threshold, rel=1e-5)
            assert any(w.startswith("The model is unsure") for w in p["warnings"])
            f = p["familiarity"]
            assert p["unfamiliar"] == (
                f["features"] > f["features_threshold"] or f["image"] > f["image_threshold"]
            )
            assert any("does not look like" in w for w in p["warnings"]) == p["unfamiliar"]
            flagged += p["unfamiliar"]
        assert flagged <= 1
        # an invoice, plain colours, noise: every one is warned about
        for name, image in probe_images(SIZE).items():
            files = {"file": (f"{name}.png", png(image), "image/png")}
            p = client.post("/api/predict", files=files, headers=e.auth("viewer")).json()
            assert p["unfamiliar"], (name, p["familiarity"])
            assert p["warnings"][0].startswith("This does not look like"), name
    e.engine.dispose()
    e = Env(tmp_path / "calm", assets, low_confidence=0.0)
    with e.app(worker=False) as client:
        assert not any("unsure" in w for w in predict_upload(client, e)["warnings"])
    e.engine.dispose()


# ------------------------------------------------------------------ worklists
def write_folder(folder, images) -> None:
    folder.mkdir(parents=True)
    for k, image in enumerate(images):
        Image.fromarray(image).save(folder / f"lesion{k}.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(png(images[0])[:-40])


def test_a_worklist_from_a_folder_is_walked_and_survives_a_restart(env):
    write_folder(env.data / "incoming", env.assets["images"][:3])
    with env.app(worker=False) as client:
        refused = client.post("/api/worklists", json={"folder": "../.."}, headers=env.auth("admin"))
        assert refused.status_code == 422
        r = client.post("/api/worklists", json={"folder": "incoming"}, headers=env.auth("admin"))
        assert r.status_code == 201, r.text
        made = r.json()
        assert [e["name"] for e in made["entries"]] == [f"lesion{k}.png" for k in range(3)]
        assert len(made["skipped_files"]) == 1 and "broken.png" in made["skipped_files"][0]
        assert made["counts"] == {"new": 3, "reviewed": 0, "feedback": 0, "skipped": 0, "total": 3}
        first, second, third = made["entries"]
        p = client.post(
            "/api/predict", data={"original_id": first["original_id"]}, headers=env.auth("viewer")
        ).json()
        assert p["original_url"] == f"/api/originals/{p['image_id']}"
        base = f"/api/worklists/{made['id']}/entries"
        change = {"state": "reviewed", "image_id": p["image_id"]}
        assert client.patch(f"{base}/{first['id']}", json=change, headers=env.auth("clinician"))
        item = send_feedback(client, env, p, label=other_class(p)).json()
        done = {"state": "feedback", "feedback_id": item["id"]}
        r = client.patch(f"{base}/{first['id']}", json=done, headers=env.auth("clinician"))
        assert r.json()["state"] == "feedback" and r.json()["feedback_id"] == item["id"]
        skip = client.patch(
            f"{base}/{second['id']}", json={"state": "skipped"}, headers=env.auth("clinician")
        )
        assert skip.status_code == 200
        lacking = client.patch(
            f"{base}/{third['id']}", json={"state": "feedback"}, headers=env.auth("clinician")
        )
        assert lacking.status_code == 422
        # a viewer looks but does not move the shared progress
        viewed = client.patch(
            f"{base}/{third['id']}", json={"state": "skipped"}, headers=env.auth("viewer")
        )
        assert viewed.status_code == 403
        # the clinician cannot import from the server's disk
        denied = client.post(
            "/api/worklists", json={"folder": "incoming"}, headers=env.auth("clinician")
        )
        assert denied.status_code == 403
    with env.app(worker=False) as client:
        got = client.get(f"/api/worklists/{made['id']}", headers=env.auth("viewer")).json()
        assert got["entries"][2]["state"] == "new"
        assert [e["state"] for e in got["entries"]] == ["feedback", "skipped", "new"]
        assert got["entries"][0]["image_id"] == p["image_id"]
        assert got["counts"] == {"new": 1, "reviewed": 0, "feedback": 1, "skipped": 1, "total": 3}
        listed = client.get("/api/worklists", headers=env.auth("viewer")).json()
        assert [w["id"] for w in listed] == [made["id"]]
    # the export traces the item back to the worklist and the file it came from
    out = env.data.parent / "export"
    assert main(["export", *store_args(env), "--out", str(out)]) == 0
    (row,) = csv.DictReader((out / "labels.csv").open())
    assert (row["worklist"], row["source_name"]) == ("incoming", "lesion0.png")
    assert (out / row["original"]).read_bytes() == (
        env.data / "incoming" / "lesion0.png"
    ).read_bytes()


def test_worklists_from_uploads_and_the_command_line(env, capsys):
    write_folder(env.data.parent / "elsewhere", env.assets["images"][3:5])
    assert main(["worklist", "add", str(env.data.parent / "elsewhere"), *store_args(env)]) == 0
    assert "2 image(s)" in capsys.readouterr().out
    with env.app(worker=False) as client:
        files = [
            ("files", (f"u{k}.png", png(env.assets["images"][k]), "image/png")) for k in range(2)
        ]
        r = client.post(
            "/api/worklists/upload",
            files=files,
            data={"name": "morning"},
            headers=env.auth("clinician"),
        )
        assert r.status_code == 201 and r.json()["counts"]["total"] == 2
        listed = client.get("/api/worklists", headers=env.auth("viewer")).json()
        assert [(w["name"], w["counts"]["total"]) for w in listed] == [
            ("morning", 2),
            ("elsewhere", 2),
        ]
        entry = r.json()["entries"][1]
        shown = client.get(entry["original_url"], headers=env.auth("viewer"))
        assert shown.content == png(env.assets["images"][1])


# ------------------------------------------------------------------ export
def test_export_writes_the_documented_dataset_layout(env):
    with env.app(worker=False) as client:
        p = predict_upload(client, env)
        ignore = np.zeros((SIZE, SIZE), np.uint8)
        ignore[:5] = 255
        files = {
            "mask": ("m.png", png(box_mask()), "image/png"),
            "ignore_mask": ("i.png", png(ignore), "image/png"),
        }
        data = {"image_id": p["image_id"], "shown_version": 1, "predicted": p["predicted"]}
        client.post("/api/feedback", data=data, files=files, headers=env.auth("clinician"))
        send_feedback(client, env, p, agree="true")
        gone = send_feedback(client, env, p, label=other_class(p), on_conflict="keep_both")
        gone = gone.json()["id"]
        client.delete(f"/api/feedback/{gone}", headers=env.auth("clinician"))
        zipped = client.get("/api/export.zip", headers=env.auth("admin"))
        assert zipped.status_code == 200
        assert client.get("/api/export.zip", headers=env.auth("clinician")).status_code == 403
    out = env.data.parent / "export"
    assert main(["export", *store_args(env), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "labels.csv").open()))
    assert list(rows[0]) == [
        "id", "label", "user", "created_at", "model_version", "propagated_from", "predicted",
        "agree", "worklist", "source_name", "original", "conflicts",
    ]  # fmt: skip
    assert rows[0]["propagated_from"] == "" and rows[0]["predicted"] == p["predicted"]
    assert [r["agree"] for r in rows] == ["0", "1"] and rows[0]["conflicts"] == ""
    assert rows[0]["original"] == "originals/fb000001.png"  # the upload, as received
    assert (out / rows[0]["original"]).read_bytes() == png(env.assets["images"][0])
    assert [r["id"] for r in rows] == ["fb000001", "fb000002"]  # the withdrawn one is left out
    assert rows[1]["label"] == p["predicted"] and rows[0]["user"] == "clinician"
    assert rows[0]["model_version"] == "1" and rows[0]["created_at"].endswith("+00:00")
    assert sorted(f.name for f in (out / "images").iterdir()) == ["fb000001.png", "fb000002.png"]
    assert [f.name for f in (out / "masks").iterdir()] == ["fb000001.png"]
    image = np.asarray(Image.open(out / "images" / "fb000001.png"))
    assert np.array_equal(image, env.assets["images"][0])
    assert np.array_equal(np.asarray(Image.open(out / "masks" / "fb000001.png")), box_mask())
    assert np.array_equal(np.asarray(Image.open(out / "ignore" / "fb000001.png")), ignore)
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive:
        names = set(archive.namelist())
        assert {f"feedback/{p.relative_to(out).as_posix()}" for p in out.rglob("*.*")} == names
        assert archive.read("feedback/labels.csv") == (out / "labels.csv").read_bytes()
    assert main(["export", *store_args(env), "--out", str(out)]) == 2  # not empty
    # the generic dataset layout reads it: data check passes, data prepare keeps every item
    assert main(["data", "check", str(out)]) == 0
    prepared = env.data.parent / "prepared"
    assert main(["data", "prepare", str(out), "--size", "24", "--out", str(prepared)]) == 0
    data = load_prepared(prepared)
    ignore_prepared, has_ignore = load_prepared_ignore(prepared)
    assert list(data.ids) == ["fb000001", "fb000002"] and data.labels.tolist() == [
        CLASSES.index(rows[0]["label"]),
        CLASSES.index(rows[1]["label"]),
    ]
    assert data.has_mask.tolist() == [True, False] and has_ignore.tolist() == [True, False]
    assert ignore_prepared[0].any() and not (ignore_prepared[0] & data.masks[0]).any()


def test_replacing_feedback_an_update_is_learning_from_is_refused(env, monkeypatch):
    release, entered = hold_training(monkeypatch)
    with env.app() as client:
        p = predict_upload(client, env)
        first = send_feedback(client, env, p, label=other_class(p)).json()
        assert entered.wait(10)  # the update took it and is training
        r = send_feedback(client, env, p, agree="true", on_conflict="replace")
        assert r.status_code == 409 and "being learned from right now" in r.text
        release.set()
        assert wait_used(client, env, first["id"])["status"] == "used"
    assert env.count(Item) == 1


def test_contradictory_feedback_is_asked_about_and_shown_in_the_export(env):
    with env.app(worker=False) as client:
        p = predict_upload(client, env)
        first = send_feedback(client, env, p, agree="true").json()
        other = other_class(p)
        r = send_feedback(client, env, p, label=other)
        assert r.status_code == 409 and f"#{first['id']} ({p['predicted']}, pending)" in r.text
        assert env.count(Item) == 1  # nothing stored on a question
        # replace: the earlier one is withdrawn, the new one stored
        second = send_feedback(client, env, p, label=other, on_conflict="replace").json()
        with env.sessions() as session:
            assert session.get(Item, first["id"]).status == "withdrawn"
        # keep both: both stay, and the export says they disagree
        third = send_feedback(client, env, p, agree="true", on_conflict="keep_both").json()
        # replace is also an edit of the region: the same class, another mask
        edited = send_feedback(
            client,
            env,
            p,
            mask=box_mask(),
            agree="false",
            label=p["predicted"],
            on_conflict="replace",
        ).json()
        with env.sessions() as session:
            assert session.get(Item, third["id"]).status == "withdrawn"
            assert session.get(Item, edited["id"]).mask_path is not None
        third = edited
        # a used item cannot be replaced
        with env.sessions() as session:
            session.get(Item, second["id"]).status = "used"
            session.commit()
        r = send_feedback(
            client, env, p, mask=box_mask(2, 20, 2, 20), label=p["predicted"], on_conflict="replace"
        )
        assert r.status_code == 409 and "already learnt" in r.text
    out = env.data.parent / "export"
    assert main(["export", *store_args(env), "--out", str(out)]) == 0
    rows = {r["id"]: r for r in csv.DictReader((out / "labels.csv").open())}
    assert rows[f"fb{second['id']:06d}"]["conflicts"] == f"fb{third['id']:06d}"
    assert rows[f"fb{third['id']:06d}"]["conflicts"] == f"fb{second['id']:06d}"
    # and `data check` says so (the same image under two labels), naming both rows
    from feedbackcam.data.check import check_dataset

    report = check_dataset(out)
    said = [p for p in report.warnings if p.kind == "the same image with another label"]
    assert sorted(p.id for p in said) == sorted(f"fb{i['id']:06d}" for i in (second, third))


# ------------------------------------------------------------------ the page's colours
def contrast(a: str, b: str) -> float:
    """WCAG 2.1 contrast ratio of two #rrggbb colours."""

    def luminance(colour: str) -> float:
        channels = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_controls_and_focus_have_at_least_3_to_1_contrast_and_the_colormap_is_viridis():
    static = Path(feedbackcam.service.__file__).parent / "static"
    css = (static / "style.css").read_text()
    colours = dict(re.findall(r"--([a-z-]+): (#[0-9a-f]{6});", css))
    for background in (colours["panel"], colours["page"]):
        for name in ("control", "focus", "accent"):  # borders, focus ring, primary buttons
            assert contrast(colours[name], background) >= 3, name
        for name in ("ink", "muted", "accent"):  # text
            assert contrast(colours[name], background) >= 4.5, name
    assert "outline: 3px solid var(--focus)" in css
    assert "border: 1px solid var(--control)" in css
    script = (static / "app.js").read_text()
    assert "const VIRIDIS = [[68, 1, 84]" in script and "jet(" not in script


def test_the_ignore_mask_reaches_the_updates_batches(env, monkeypatch):
    seen = []
    real_step = train_module.feedback_step

    def recording_step(model, batch, *args, **kwargs):
        seen.append(batch)
        return real_step(model, batch, *args, **kwargs)

    monkeypatch.setattr(train_module, "feedback_step", recording_step)
    ignore = np.zeros((SIZE, SIZE), np.uint8)
    ignore[:, :6] = 255
    with env.app() as client:
        p = predict_upload(client, env)
        data = {"image_id": p["image_id"], "shown_version": 1, "predicted": p["predicted"]}
        files = {
            "mask": ("m.png", png(box_mask()), "image/png"),
            "ignore_mask": ("i.png", png(ignore), "image/png"),
        }
        first = client.post("/api/feedback", data=data, files=files, headers=env.auth("clinician"))
        wait_used(client, env, first.json()["id"])
        first_update = list(seen)
        seen.clear()
        q = predict_upload(client, env, index=1)  # no ignore mask: replays the first item's
        wait_used(client, env, send_feedback(client, env, q, label=other_class(q)).json()["id"])
    batch = first_update[0]
    assert batch.has_ignore.tolist() == [True] and batch.ignore.shape == (1, SIZE, SIZE)
    assert np.array_equal(batch.ignore[0].cpu().numpy() > 0, ignore > 0)
    assert batch.masks[0].cpu().numpy().sum() == (box_mask() > 0).sum()
    replayed = [b for b in seen if b.ignore is not None and b.has_ignore.any()]
    assert replayed and all(len(b.labels) > 1 for b in replayed)  # new item + earlier feedback
