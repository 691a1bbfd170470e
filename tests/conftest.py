"""Tiny seeded models and generated data shared by the tests (no downloads, no ../shared)."""

from __future__ import annotations

import os

import pytest
import torch

from feedbackcam.data.dataset import FeedbackBatch
from feedbackcam.models import small_cnn

# Two threads for the serial run CI makes; one per worker under pytest-xdist (`-n 2`), or the
# workers' spinning thread pools share two cores 4 ways and a step runs many times slower (a
# load test once waited over its 120 s for updates that take 10 s alone).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def toy_feedback(n: int, size: int = 32, seed: int = 0) -> FeedbackBatch:
    """A two-class task: a striped square (the mask, what matters) and a plain square of the
    same class colour elsewhere (a distractor). Classification alone can look at either."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = 0.5 + 0.05 * torch.randn(n, 3, size, size, generator=g)
    masks = torch.zeros(n, size, size)
    s = size // 4
    colours = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.9, 0.2]])
    for i in range(n):
        y, x, y2, x2 = torch.randint(0, size - s, (4,), generator=g).tolist()
        colour = colours[labels[i]][:, None, None]
        images[i, :, y2 : y2 + s, x2 : x2 + s] = colour
        images[i, :, y : y + s, x : x + s] = colour
        images[i, :, y : y + s : 2, x : x + s] *= 0.5
        masks[i] = 0
        masks[i, y : y + s, x : x + s] = 1
    return FeedbackBatch(images.clamp(0, 1), labels, masks, torch.ones(n, dtype=torch.bool))


@pytest.fixture
def toy():
    return toy_feedback


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return small_cnn(num_classes=3, width=8)


def magenta_reader(reads: float, num_classes: int = 3):
    """A model whose class 0 is how magenta the most magenta pixel of the image is (scaled by
    ``reads``: 0 reads nothing), the others constants (1 above 0's offset, 2 far below): the
    shortcut a marked patch stands for, in a few weights."""
    from feedbackcam.models import SelfExplaining

    net = torch.nn.Sequential()
    net.add_module("features", torch.nn.Conv2d(3, num_classes, 1))
    net.add_module("pool", torch.nn.AdaptiveMaxPool2d(1))
    net.add_module("flat", torch.nn.Flatten())
    with torch.no_grad():
        net.features.weight.zero_()
        net.features.weight[0, :, 0, 0] = reads * torch.tensor([4.0, -8.0, 4.0])
        net.features.bias.copy_(torch.tensor([-1.0, 0.5, -5.0])[:num_classes])
    return SelfExplaining(net, "features", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@pytest.fixture
def magenta():
    return magenta_reader


# ------------------------------------------------------------------ databases for the service
POSTGRES_ENV = "FEEDBACKCAM_TEST_POSTGRES"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    """None (SQLite in the data dir) or the URL of a fresh PostgreSQL database, dropped after.

    The PostgreSQL run needs FEEDBACKCAM_TEST_POSTGRES (an admin URL, e.g. from
    ``.ci/start-postgres``); without it the test is skipped with a message, except in CI
    (CI=true), where it fails: CI must never pass without having run against a real server.
    """
    if request.param == "sqlite":
        yield None
        return
    import os
    import uuid

    from sqlalchemy import create_engine, make_url, text

    admin = os.environ.get(POSTGRES_ENV)

    def unavailable(message: str):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: the PostgreSQL tests must run)")
        pytest.skip(message)

    if not admin:
        unavailable(f"no PostgreSQL server: set {POSTGRES_ENV} (.ci/start-postgres starts one)")
    name = f"feedbackcam_test_{uuid.uuid4().hex[:12]}"
    try:
        engine = create_engine(admin, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as err:  # no driver, no server, no rights: say which
        unavailable(f"PostgreSQL at {POSTGRES_ENV} is not usable: {type(err).__name__}: {err}")
    yield make_url(admin).set(database=name).render_as_string(hide_password=False)
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()
