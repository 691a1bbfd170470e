"""The database, on SQLite and on a real PostgreSQL server (conftest.db_url): migrations from
release 0.1.0's schema lose nothing, a repeated submission is stored once, clinicians see their
own feedback, and of two app processes on one database only one updates at a time."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import legacy_schema_0_1_0 as legacy
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, func, select, update
from sqlalchemy.orm import Session
from test_service_api import (  # noqa: F401  (assets is a fixture)
    Env,
    assets,
    box_mask,
    other_class,
    png,
    predict_upload,
    wait_used,
)

from feedbackcam.service import worker as worker_module
from feedbackcam.service.auth import hash_token
from feedbackcam.service.db import Base, Item, Lease, Version, Worklist, connect, utcnow
from feedbackcam.service.lease import DbLease
from feedbackcam.service.migrations import current_revision


def url_of(tmp_path, db_url) -> str:
    return db_url or f"sqlite:///{tmp_path / 'data' / 'feedbackcam.db'}"


def schema_diff(engine) -> list:
    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


# ------------------------------------------------------------------ migrations
def test_a_new_database_is_made_by_the_migrations_and_matches_the_models(tmp_path, db_url):
    engine, _ = connect(url_of(tmp_path, db_url))
    assert current_revision(engine) == "0004"
    assert schema_diff(engine) == []
    engine.dispose()
    engine, _ = connect(url_of(tmp_path, db_url))  # opening it again changes nothing
    assert current_revision(engine) == "0004"
    engine.dispose()


def test_a_release_0_1_0_database_is_upgraded_without_losing_a_row(tmp_path, db_url):
    url = url_of(tmp_path, db_url)
    (tmp_path / "data").mkdir()
    old = create_engine(url)
    legacy.Base.metadata.create_all(old)
    with Session(old) as session:
        session.add_all(
            [
                legacy.User(id=1, name="dr-lee", role="clinician", token_hash=hash_token("t1")),
                legacy.User(id=2, name="admin", role="admin", token_hash=hash_token("t2")),
                legacy.Version(id=1, path="/m.pt", sha256="a" * 64, status="promoted"),
                legacy.Version(
                    id=2,
                    path="c/v2.pt",
                    sha256="b" * 64,
                    parent_id=1,
                    status="promoted",
                    metrics={"accuracy": 0.5},
                ),
            ]
        )
        session.flush()
        session.add(legacy.Current(id=1, version_id=2))
        for k in range(5):
            session.add(
                legacy.Item(
                    image_path=f"images/{k:064d}.png",
                    user_id=1,
                    label="MEL",
                    predicted="NV",
                    mask_path=None if k % 2 else f"masks/{k:064d}.png",
                    shown_version_id=1,
                    status="used" if k < 3 else "pending",
                    update_id=2 if k < 3 else None,
                )
            )
        session.commit()
        rows = {
            name: session.execute(select(table).order_by(*table.primary_key)).all()
            for name, table in legacy.Base.metadata.tables.items()
        }
    old.dispose()

    engine, sessions = connect(url)
    assert current_revision(engine) == "0004" and schema_diff(engine) == []
    with engine.connect() as connection:
        for name, table in legacy.Base.metadata.tables.items():
            after = connection.execute(select(table).order_by(*table.primary_key)).all()
            assert after == rows[name], name
    with sessions() as session:  # the new column is there, empty, and new rows can use it
        assert session.scalar(select(func.count()).where(Item.idempotency_key.is_(None))) == 5
        assert session.scalar(select(func.count()).where(Item.ignore_mask_path.is_(None))) == 5
        assert session.scalar(select(func.count()).select_from(Worklist)) == 0
        session.add(
            Item(
                image_path="images/x.png",
                user_id=1,
                label="MEL",
                predicted="NV",
                shown_version_id=2,
                idempotency_key="k" * 64,
                ignore_mask_path="masks/y.png",
            )
        )
        session.commit()
    engine.dispose()


# ------------------------------------------------------------------ idempotent feedback
@pytest.fixture
def env(tmp_path, assets, db_url):  # noqa: F811
    e = Env(tmp_path, assets, db_url=db_url)
    yield e
    e.engine.dispose()


def submit(client, env, p, key=None, role="clinician", **fields):
    data = {"image_id": p["image_id"], "shown_version": p["version"], "predicted": p["predicted"]}
    headers = {**env.auth(role), **({"Idempotency-Key": key} if key else {})}
    return client.post("/api/feedback", data={**data, **fields}, headers=headers)


def test_a_repeated_submission_is_stored_once(env):
    with env.app(worker=False) as client:
        p = predict_upload(client, env)
        label = other_class(p)
        first = submit(client, env, p, key="visit-17", label=label)
        again = submit(client, env, p, key="visit-17", label=label)
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.json() == first.json()
        reused = submit(client, env, p, key="visit-17", label=p["predicted"], agree="true")
        assert reused.status_code == 409 and "Idempotency-Key" in reused.json()["detail"]
        # without a key, the same content from the same user is the same item
        # (the same image got another class above: keep both, do not ask)
        plain = [submit(client, env, p, agree="true", on_conflict="keep_both") for _ in range(3)]
        assert [r.status_code for r in plain] == [201, 200, 200]
        assert len({r.json()["id"] for r in plain}) == 1
        # ...but another clinician's identical feedback is theirs
        other = submit(client, env, p, role="admin", agree="true", on_conflict="keep_both")
        assert other.status_code == 201 and other.json()["id"] != plain[0].json()["id"]
        # a retry storm on one key from eight threads stores one item
        codes = []

        def retry():
            codes.append(
                submit(
                    client, env, p, key="storm", label=label, on_conflict="keep_both"
                ).status_code
            )

        threads = [threading.Thread(target=retry) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [200] * 7 + [201]
    assert env.count(Item) == 4


def test_clinicians_see_their_own_feedback_and_admins_everyones(env):
    with env.sessions() as session:
        from feedbackcam.service.auth import add_user

        env.tokens["dana"] = add_user(session, "dana", "clinician")
    with env.app(worker=False) as client:
        p = predict_upload(client, env)
        mine = submit(client, env, p, label=other_class(p)).json()
        hers = submit(client, env, p, role="dana", agree="true").json()

        def ids(role):
            return [i["id"] for i in client.get("/api/feedback", headers=env.auth(role)).json()]

        assert ids("clinician") == [mine["id"]] and ids("dana") == [hers["id"]]
        assert ids("admin") == [hers["id"], mine["id"]]
        theirs = client.get(f"/api/feedback/{hers['id']}", headers=env.auth("clinician"))
        assert theirs.status_code == 404
        assert client.get(f"/api/feedback/{hers['id']}", headers=env.auth("admin")).json() == hers


# ------------------------------------------------------------------ one updater per database
def test_the_lease_has_one_holder_until_released_or_expired(tmp_path, db_url):
    engine, sessions = connect(url_of(tmp_path, db_url))
    a, b = DbLease(sessions, holder="a"), DbLease(sessions, holder="b")
    assert a.acquire() and a.acquire()  # renewing one's own lease
    assert not b.acquire() and b.held_by_other() and not a.held_by_other()
    a.release()
    assert b.acquire() and not a.acquire()
    with sessions.begin() as session:  # b dies; its lease runs out
        session.execute(update(Lease).values(expires=utcnow() - timedelta(seconds=1)))
    assert a.acquire() and not b.acquire()
    # a holder killed on this machine (kill -9) gives the lease up at once, expired or not
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    dead = DbLease(sessions, holder=f"{socket.gethostname()}:{gone}:x")
    a.release()
    assert dead.acquire() and not a.held_by_other() and a.acquire()
    engine.dispose()


def test_two_apps_on_one_database_never_update_at_once_and_learn_all_feedback(env, monkeypatch):
    running, peak, lock = [0], [0], threading.Lock()
    real = worker_module.fine_tune

    def tracked(*args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.3)  # long enough for the other app to try
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(worker_module, "fine_tune", tracked)
    sent = []
    with env.app() as one, env.app() as two:
        for k in range(6):
            client = (one, two)[k % 2]
            p = predict_upload(client, env, index=k)
            r = client.post(
                "/api/feedback",
                data={
                    "image_id": p["image_id"],
                    "shown_version": p["version"],
                    "predicted": p["predicted"],
                    "label": other_class(p),
                },
                files={"mask": ("m.png", png(box_mask()), "image/png")},
                headers=env.auth("clinician"),
            )
            assert r.status_code == 201, r.text
            sent.append(r.json()["id"])
        for item_id in sent:
            wait_used(one, env, item_id, timeout=60)
    assert peak[0] == 1
    with env.sessions() as session:
        trained = [
            i
            for v in session.scalars(select(Version).where(Version.parent_id.is_not(None)))
            if v.status == "promoted"
            for i in v.metrics["update"]["items"]
        ]
        assert sorted(trained) == sorted(sent)  # each item learnt once, by one app or the other
        statuses = session.scalars(select(Item.status)).all()
        assert statuses == ["used"] * 6
