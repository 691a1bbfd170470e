"""Hostile and odd input gets a clear 4xx, storage faults a 503 that clears without a restart,
and the app bounds what it spends: decodes at once, requests per token, bodies read unsigned."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import event
from test_service_api import (  # noqa: F401  (assets is a fixture)
    SIZE,
    Env,
    assets,
    box_mask,
    other_class,
    png,
    predict_upload,
)

from feedbackcam.service import limits
from feedbackcam.service.db import Item
from feedbackcam.service.limits import RateLimiter
from feedbackcam.service.uploads import UploadError, decode_mask_rle


@pytest.fixture
def env(tmp_path, assets):  # noqa: F811
    e = Env(tmp_path, assets)
    yield e
    e.engine.dispose()


def feedback(client, env, p, role="clinician", files=None, headers=None, **fields):
    data = {
        "image_id": p["image_id"],
        "shown_version": p["version"],
        "predicted": p["predicted"],
        **fields,
    }
    return client.post(
        "/api/feedback", data=data, files=files, headers={**env.auth(role), **(headers or {})}
    )


def send(client, env, p, key):
    """A distinct submission each time (its own Idempotency-Key)."""
    return feedback(client, env, p, label=other_class(p), headers={"Idempotency-Key": f"k{key}"})


def png16(levels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(levels.astype(np.uint16)).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    return buf.getvalue()


# ------------------------------------------------------------------ numbers out of range
def test_ids_beyond_64_bits_or_below_one_are_422_not_500(env):
    with env.app(worker=False) as client:
        p = predict_upload(client, env)
        for bad in (2**70, 2**63, 0, -1):
            r = feedback(client, env, p, shown_version=bad, label=other_class(p))
            assert r.status_code == 422, (bad, r.text)
            r = client.get(f"/api/feedback/{bad}", headers=env.auth("clinician"))
            assert r.status_code == 422, (bad, r.text)
            r = client.post(f"/api/versions/{bad}/activate", headers=env.auth("admin"))
            assert r.status_code == 422, (bad, r.text)
        assert (
            client.get(f"/api/feedback/{2**63 - 1}", headers=env.auth("admin")).status_code == 404
        )
        assert env.count(Item) == 0


RLE_CASES = {
    "a count of 1e999": '{"size": [48, 48], "counts": [1e999]}',
    "NaN": '{"size": [48, 48], "counts": [NaN]}',
    "Infinity": '{"size": [48, 48], "counts": [0, Infinity]}',
    "a float count": '{"size": [48, 48], "counts": [1000.5, 1303.5]}',
    "a huge int": '{"size": [48, 48], "counts": [' + "9" * 5000 + "]}",
    "nested 100k deep": "[" * 100_000 + "]" * 100_000,
    "nested counts": '{"size": [48, 48], "counts": [[1, 2], 3]}',
    "a count over h*w": '{"size": [48, 48], "counts": [0, 99999, 0]}',
    "too many counts": json.dumps({"size": [48, 48], "counts": [0] * 3000 + [2304]}),
    "a negative count": '{"size": [48, 48], "counts": [2305, -1]}',
    "booleans": '{"size": [48, 48], "counts": [true, 2303]}',
    "a 10^9 square": '{"size": [1000000000, 1000000000], "counts": [1]}',
    "not an object": "[1, 2, 3]",
    "a string size": '{"size": "48x48", "counts": [2304]}',
}


@pytest.mark.parametrize("case", list(RLE_CASES))
def test_hostile_run_length_masks_are_refused(case):
    with pytest.raises(UploadError) as caught:
        decode_mask_rle(RLE_CASES[case], SIZE)
    assert caught.value.status == 422 and str(caught.value).startswith("mask_rle")


def test_hostile_run_length_masks_are_422_through_the_api_and_store_nothing(env):
    with env.app(worker=False) as client:
        p = predict_upload(client, env)
        before = env.files()
        for case, text in RLE_CASES.items():
            r = feedback(client, env, p, mask_rle=text, label=other_class(p))
            assert r.status_code == 422, (case, r.text)
        assert env.files() == before and env.count(Item) == 0
        good = {"size": [SIZE, SIZE], "counts": [100, 50, SIZE * SIZE - 150]}
        assert feedback(client, env, p, mask_rle=json.dumps(good)).status_code == 201


# ------------------------------------------------------------------ masks and image modes
def test_a_mask_of_another_size_is_422_even_when_larger(env):
    with env.app(worker=False) as client:
        p = predict_upload(client, env)
        big = np.zeros((SIZE * 3, SIZE * 3), np.uint8)
        big[10:50, 10:50] = 255
        r = feedback(client, env, p, files={"mask": ("m.png", png(big), "image/png")})
        assert r.status_code == 422 and f"expected {SIZE}x{SIZE}" in r.json()["detail"]


def test_a_zero_one_mask_is_a_region_not_empty(env):
    with env.app(worker=False) as client:
        p = predict_upload(client, env)
        region = (box_mask() > 0).astype(np.uint8)  # values 0 and 1, as numpy writes a bool mask
        r = feedback(client, env, p, files={"mask": ("m.png", png(region), "image/png")})
        assert r.status_code == 201, r.text
        stored = client.get(r.json()["mask_url"], headers=env.auth("clinician"))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored.content))), box_mask())


def test_sixteen_bit_pngs_are_scaled_not_clipped(env):
    levels = np.full((SIZE, SIZE), 30_000)
    levels[:, : SIZE // 2] = 10_000
    with env.app(worker=False) as client:
        r = client.post(
            "/api/predict",
            files={"file": ("x.png", png16(levels), "image/png")},
            headers=env.auth("viewer"),
        )
        assert r.status_code == 200, r.text
        stored = client.get(r.json()["image_url"], headers=env.auth("viewer"))
        rgb = np.asarray(Image.open(io.BytesIO(stored.content)))
        assert rgb[0, 0].tolist() == [39] * 3 and rgb[0, -1].tolist() == [117] * 3
        # a 16-bit mask: 65535 inside the box, 0 outside
        p = r.json()
        mask16 = (box_mask() > 0) * 65535
        r = feedback(client, env, p, files={"mask": ("m.png", png16(mask16), "image/png")})
        assert r.status_code == 201, r.text
        stored = client.get(r.json()["mask_url"], headers=env.auth("clinician"))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored.content))), box_mask())


# ------------------------------------------------------------------ headers
def test_security_headers_on_the_page_the_api_and_the_docs(env):
    with env.app(worker=False) as client:
        for path, auth in (("/", {}), ("/api/me", env.auth("viewer")), ("/api/me", {})):
            r = client.get(path, headers=auth)
            csp = r.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("style-src")[0]
            assert "frame-ancestors 'none'" in csp
            assert r.headers["x-frame-options"] == "DENY"
            assert r.headers["x-content-type-options"] == "nosniff"
        docs = client.get("/docs")
        assert docs.status_code == 200 and "x-frame-options" in docs.headers


# ------------------------------------------------------------------ storage faults
def test_a_missing_image_folder_is_503_and_clears_without_a_restart(env):
    with env.app(worker=False) as client:
        images = env.data / "images"
        images.rename(env.data / "images-away")
        images.write_text("not a folder")  # root ignores chmod; a file in its place does bite
        files = {"file": ("x.png", png(env.assets["images"][0]), "image/png")}
        r = client.post("/api/predict", files=files, headers=env.auth("viewer"))
        assert r.status_code == 503, r.text
        assert "storage unavailable" in r.json()["detail"] and r.headers["retry-after"]
        images.unlink()
        (env.data / "images-away").rename(images)
        assert (
            client.post("/api/predict", files=files, headers=env.auth("viewer")).status_code == 200
        )


@pytest.fixture
def db_env(tmp_path, assets, db_url):  # noqa: F811  (on SQLite and PostgreSQL)
    e = Env(tmp_path, assets, db_url=db_url)
    yield e
    e.engine.dispose()


def test_a_read_only_database_is_503_and_clears_without_a_restart(db_env):
    env = db_env
    with env.app(worker=False) as client:
        engine = client.app.state.runtime.engine
        p = predict_upload(client, env)
        sqlite = engine.dialect.name == "sqlite"

        def read_only(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute(
                "PRAGMA query_only = ON"
                if sqlite
                else "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"
            )
            cursor.close()
            dbapi_connection.commit()  # a session setting survives a commit, not a rollback

        event.listen(engine, "connect", read_only)
        engine.dispose()
        r = feedback(client, env, p, label=other_class(p))
        assert r.status_code == 503, r.text
        assert "storage unavailable: the database failed" in r.json()["detail"]
        assert "read" in r.json()["detail"]
        event.remove(engine, "connect", read_only)  # the fault clears; the app is not told
        codes = [send(client, env, p, k).status_code for k in range(15)]
        assert codes == [201] * 15
    assert env.count(Item) == 15


def test_lost_database_connections_are_replaced_without_a_restart(db_env):
    env = db_env
    with env.app(worker=False) as client:
        engine = client.app.state.runtime.engine
        p = predict_upload(client, env)
        held = [engine.raw_connection() for _ in range(3)]
        for connection in held:
            connection.close()  # back into the pool...
        for record in list(engine.pool._pool.queue):
            record.dbapi_connection.close()  # ...where the server side goes away
        codes = [send(client, env, p, k).status_code for k in range(16)]
        if engine.dialect.name == "sqlite":
            # the first write meets a dead connection: 503, and the whole pool is replaced
            assert codes == [503] + [201] * 15, codes
        else:  # pool_pre_ping finds the dead connections before they are used
            assert codes == [201] * 16, codes
    assert env.count(Item) == codes.count(201)


def test_a_bug_answers_json_500_and_keeps_serving(env, monkeypatch):
    from feedbackcam.service.routers import users

    with env.app(worker=False) as client:
        monkeypatch.setattr(users, "Me", lambda **kw: 1 / 0)
        r = client.get("/api/me", headers=env.auth("viewer"))
        assert r.status_code == 500 and r.json() == {"detail": "internal error; it has been logged"}
        monkeypatch.undo()
        assert client.get("/api/me", headers=env.auth("viewer")).status_code == 200


# ------------------------------------------------------------------ bounded resources
def test_an_unsigned_body_is_refused_before_it_is_read(env):
    with env.app(worker=False) as client:
        for auth in ({}, {"Authorization": "Bearer not-a-token"}):
            read: list[int] = []

            def body(read=read):
                for _ in range(20):
                    read.append(1)
                    yield b"x" * 100_000

            headers = {**auth, "Content-Type": "multipart/form-data; boundary=b"}
            r = client.post("/api/predict", content=body(), headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert read == [], "the body was read before the token was checked"
        assert predict_upload(client, env)["version"] == 1


def test_the_rate_limit_is_per_token_and_says_when_to_retry(env):
    with env.app(worker=False, rate_limit_per_minute=5) as client:
        codes = [client.get("/api/me", headers=env.auth("viewer")).status_code for _ in range(7)]
        assert codes == [200] * 5 + [429] * 2
        r = client.get("/api/me", headers=env.auth("viewer"))
        assert 1 <= int(r.headers["retry-after"]) <= 60 and "5 a minute" in r.json()["detail"]
        assert client.get("/api/me", headers=env.auth("clinician")).status_code == 200


def test_the_rate_limiter_window_slides():
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert [limiter.retry_after("a") for _ in range(3)] == [0, 0, 60]
    assert limiter.retry_after("b") == 0
    now[0] = 30.0
    assert limiter.retry_after("a") == 30
    now[0] = 60.5
    assert limiter.retry_after("a") == 0
    assert RateLimiter(0).retry_after("a") == 0  # off


def test_concurrent_decodes_are_bounded_by_the_settings(env, monkeypatch):
    inside, peak, lock = [0], [0], threading.Lock()
    real = Image.Image.load

    def slow_load(self):
        if not getattr(self, "tile", None):  # decoded already, or made in memory
            return real(self)
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        time.sleep(0.05)
        try:
            return real(self)
        finally:
            with lock:
                inside[0] -= 1

    with env.app(worker=False, max_concurrent_decodes=2) as client:
        monkeypatch.setattr(Image.Image, "load", slow_load)
        files = {"file": ("x.png", png(env.assets["images"][0]), "image/png")}
        codes = []

        def send():
            r = client.post("/api/predict", files=files, headers=env.auth("viewer"))
            codes.append(r.status_code)

        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert codes == [200] * 6 and peak[0] == 2


def test_a_decode_that_waits_too_long_is_503():
    limits.configure(1)
    try:
        with (
            limits.decode_slot(),
            pytest.raises(UploadError) as caught,
            limits.decode_slot(wait=0.05),
        ):
            pass
        assert caught.value.status == 503 and "busy" in str(caught.value)
    finally:
        limits.configure(2)


def test_a_viewers_body_is_refused_before_it_is_read_where_the_route_needs_more(env):
    with env.app(worker=False) as client:
        read: list[int] = []

        def body():
            for _ in range(20):
                read.append(1)
                yield b"x" * 100_000

        headers = {**env.auth("viewer"), "Content-Type": "multipart/form-data; boundary=b"}
        r = client.post("/api/feedback", content=body(), headers=headers)
        assert r.status_code == 403 and "needs the clinician role" in r.json()["detail"]
        assert read == [], "the body was read before the role was checked"
        # a route a viewer may use still reads the viewer's body
        assert predict_upload(client, env, role="viewer")["version"] == 1


def test_made_up_tokens_share_their_address_bucket(env):
    with env.app(worker=False, rate_limit_per_minute=5) as client:
        codes = [
            client.get("/api/me", headers={"Authorization": f"Bearer made-up-{k}"}).status_code
            for k in range(7)
        ]
        assert codes == [401] * 5 + [429] * 2
        # a real token has its own allowance
        assert client.get("/api/me", headers=env.auth("viewer")).status_code == 200


def test_rate_limiting_is_on_by_default():
    from feedbackcam.service import Settings

    assert Settings().rate_limit_per_minute > 0


# ------------------------------------------------------------------ bursts
def test_a_request_waiting_for_the_model_holds_no_database_connection(env, monkeypatch):
    with env.app(worker=False) as client:
        runtime = client.app.state.runtime
        p = predict_upload(client, env)
        served = runtime.registry.served
        real, inside, go = served.explain, threading.Event(), threading.Event()

        def waiting_explain(rgb):
            inside.set()
            assert go.wait(30)
            return real(rgb)

        monkeypatch.setattr(served, "explain", waiting_explain)
        result = {}
        thread = threading.Thread(
            target=lambda: result.update(
                r=client.post(
                    "/api/predict", data={"image_id": p["image_id"]}, headers=env.auth("viewer")
                )
            )
        )
        thread.start()
        assert inside.wait(30)
        try:
            assert runtime.engine.pool.checkedout() == 0
        finally:
            go.set()
            thread.join(30)
        assert result["r"].status_code == 200


def test_no_free_slot_or_connection_is_503_with_retry_after(env, monkeypatch):
    import anyio
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from feedbackcam.service.limits import Concurrency

    # requests beyond the bound wait briefly, then are told to come back
    entered, release = [], None

    async def slow_app(scope, receive, send):
        entered.append(1)
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def burst():
        nonlocal release
        release = anyio.Event()
        bounded = Concurrency(slow_app, limit=2, wait=0.2)
        answers: list[tuple[int, dict]] = []

        async def one():
            sent = []

            async def send(message):
                sent.append(message)

            await bounded({"type": "http", "path": "/api/predict"}, None, send)
            start = sent[0]
            answers.append((start["status"], dict(start["headers"])))

        async with anyio.create_task_group() as tasks:
            for _ in range(5):
                tasks.start_soon(one)
            await anyio.sleep(0.5)  # the three beyond the bound have given up by now
            assert len(entered) == 2
            release.set()
        return answers

    answers = anyio.run(burst)
    assert sorted(status for status, _ in answers) == [200, 200, 503, 503, 503]
    assert all(h[b"retry-after"] == b"5" for status, h in answers if status == 503)

    # and an exhausted database pool is 503, not 500
    from feedbackcam.service import auth

    with env.app(worker=False) as client:

        def exhausted(*_args, **_kwargs):
            raise PoolTimeout("QueuePool limit of size 5 overflow 0 reached")

        monkeypatch.setattr(auth, "hash_token", exhausted)
        r = client.get("/api/me", headers=env.auth("viewer"))
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert "busy" in r.json()["detail"]


# ------------------------------------------------------------------ non-JSON numbers, NUL bytes
def _json_operations(spec):
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            content = op.get("requestBody", {}).get("content", {})
            if "application/json" not in content:
                continue
            schema = content["application/json"]["schema"]
            if "$ref" in schema:
                schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
            yield method, path.replace("{", "").replace("}", ""), schema.get("properties", {})


def test_nan_infinity_and_nul_bytes_are_4xx_on_every_route_and_keep_the_pool(db_env):
    import re

    env = db_env
    with env.app(worker=False, rate_limit_per_minute=0) as client:
        engine = client.app.state.runtime.engine
        disposed = []
        event.listen(engine.pool, "close", lambda *_: disposed.append(1))
        p = predict_upload(client, env)
        spec = client.get("/openapi.json").json()
        sent = 0
        for method, path, properties in _json_operations(spec):
            url = re.sub(r"[a-z_]+id\b|\bentry\b", "1", path)
            for name in properties:
                for constant in ("NaN", "Infinity", "-Infinity"):
                    body = "{" + f'"{name}": {constant}' + "}"
                    r = client.request(
                        method.upper(),
                        url,
                        content=body,
                        headers={**env.auth("admin"), "Content-Type": "application/json"},
                    )
                    sent += 1
                    assert r.status_code < 500, (method, url, body, r.text)
        assert sent > 30
        # a NUL byte in a path, a query or a form field (PostgreSQL cannot store or match one)
        for url in ("/api/originals/a%00b", "/api/images/a%00b", "/api/feedback?mine=a%00b"):
            r = client.get(url, headers=env.auth("viewer" if "feedback" not in url else "admin"))
            assert r.status_code < 500, (url, r.text)
        r = client.post("/api/users/a%00b/revoke", headers=env.auth("admin"))
        assert r.status_code < 500, r.text
        r = feedback(client, env, p, label="a\x00b")
        assert r.status_code == 422, r.text
        r = client.post("/api/worklists", json={"name": "a\x00b"}, headers=env.auth("admin"))
        assert r.status_code < 500, r.text
        assert disposed == [], "a bad value threw the connection pool away"
        assert predict_upload(client, env)["version"] == 1


def test_a_prediction_is_one_forward_pass_and_its_check_reads_the_same_pass(env):
    """Predict + explain + the unfamiliar-input check: one forward of the served model (the
    check used to forward the image a second time); the check's numbers are those a separate
    forward gives."""
    from feedbackcam.service.ood import forward

    with env.app(worker=False) as client:
        runtime = client.app.state.runtime
        served = runtime.registry.served
        runtime.familiarity.reference(served)  # measured once per version, not per request
        p = predict_upload(client, env)
        calls = []
        handle = served.model.register_forward_hook(lambda *a: calls.append(1))
        try:
            r = client.post(
                "/api/predict", data={"image_id": p["image_id"]}, headers=env.auth("viewer")
            )
        finally:
            handle.remove()
        assert r.status_code == 200, r.text
        assert len(calls) == 1
        got = client.get(p["image_url"], headers=env.auth("viewer"))
        rgb = np.asarray(Image.open(io.BytesIO(got.content)).convert("RGB"))
        energy, pooled = forward(served, rgb[None])
        assert r.json()["energy"] == pytest.approx(float(energy[0]), rel=1e-4, abs=1e-4)
        ref = runtime.familiarity.reference(served)
        assert r.json()["familiarity"]["features"] == pytest.approx(
            float(ref.features.distance(pooled)[0]), rel=1e-3
        )


@pytest.mark.parametrize(("n", "dim"), [(40, 300), (300, 20), (64, 64), (5, 1)])
def test_the_shrunk_precision_is_scikit_learns_ledoit_wolf(n, dim):
    """The unfamiliar-input check's precision from the small Gram matrix equals scikit-learn's
    ``LedoitWolf(assume_centered=True).precision_`` (a D x D inverse), fewer rows than
    dimensions or more, and for rows with no spread."""
    from sklearn.covariance import LedoitWolf

    from feedbackcam.service.ood import shrunk_precision

    rng = np.random.default_rng(n + dim)
    x = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.1
    x -= x.mean(axis=0)
    want = LedoitWolf(assume_centered=True).fit(x).precision_
    np.testing.assert_allclose(shrunk_precision(x), want, rtol=1e-7, atol=1e-9 * np.abs(want).max())
    flat = np.zeros((n, dim))
    np.testing.assert_allclose(
        shrunk_precision(flat), LedoitWolf(assume_centered=True).fit(flat).precision_
    )
