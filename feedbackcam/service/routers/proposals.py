"""One mark, many images: from a clinician's ignore marks, propose the same artifact on the app's
other images; accepted proposals become that clinician's ignore feedback, marked as propagated.

The scorer is :mod:`feedbackcam.propagate`'s ``outlined``: a linear concept of the marked
locations in a network's activations chooses the images and where, and a model of the marked
pixels' colour and local texture outlines the artifact there. The network is (by default,
``serve --propose-with offline``) the offline ImageNet EfficientNet-Lite0's ``blocks.5`` at
256 px with query expansion and its own threshold, the setting measured on ISIC 2017's real
patches (docs/propagation.md), its masks resized to the served model's input; or
(``--propose-with served``) the served model's explanation layer.
"""

from __future__ import annotations

import base64
import functools
import threading
from collections import OrderedDict
from pathlib import PurePosixPath
from typing import Annotated

import numpy as np
import torch
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import select

from ...counterfactual import dilate
from ...propagate import MAX_MARKS
from ..datasets import resize_nearest
from ..db import Item, Version, WorklistEntry
from ..deps import Clinician, RuntimeDep, SessionDep
from ..limits import MAX_ID, decode_slot
from ..originals import admit, decode_region, read_original
from ..schemas import FeedbackItem
from ..store import content_path, read_image
from ..uploads import UploadError, png_bytes
from .feedback import _key, _out, _stored

router = APIRouter(tags=["proposals"])

MAX_CANDIDATES = 2000  # stored images scored per request, newest first
MAX_SHOWN = 500
BATCH = 32  # images per forward pass while the served model's lock is held
OFFLINE_SIZE = 256  # the offline network's side: the size its threshold was chosen at


@functools.lru_cache(maxsize=1)
def _offline_network():
    """:func:`feedbackcam.propagate.offline_network`, built once per process (on the CPU)."""
    from ...propagate import offline_network

    return offline_network()


class OfflineFeatures:
    """The offline network's activations per stored image, computed once: images are stored
    under their content's hash and the network never changes, so an image's activations never
    do. The ``limit`` most recently used are kept (49 KB an image at 256 px: 100 MB for the
    2,050 kept by default; the same float32 values the command scores with); a
    request then pays the network only for images it has not seen (about 90 ms an image on a
    2-core CPU)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.rows, self.computed = limit, OrderedDict(), 0
        self.lock = threading.Lock()
        self.network_lock = threading.Lock()  # its forward hooks serve one call at a time

    def clear(self) -> None:
        with self.lock:
            self.rows.clear()
            self.computed = 0

    def __call__(self, ids: list[str], images: np.ndarray) -> torch.Tensor:
        from ...propagate import LITE0_LAYER
        from ...self_explaining import layer_activations

        with self.lock:
            known = {i: self.rows[i] for i in ids if i in self.rows}
        if len(known) < len(set(ids)):
            # one caller computes at a time, and looks again once it may: what another caller
            # (the start-up's warm-up, a second request) computed meanwhile is not computed twice
            with self.network_lock:
                with self.lock:
                    known.update({i: self.rows[i] for i in ids if i in self.rows})
                missing = [k for k, i in enumerate(ids) if i not in known]
                if missing:
                    new = layer_activations(_offline_network(), images[missing], LITE0_LAYER, BATCH)
                    known.update({ids[k]: f.clone() for k, f in zip(missing, new, strict=True)})
                self._keep(ids, known, len(missing))
        else:
            self._keep(ids, known, 0)
        return torch.stack([known[i] for i in ids])

    def _keep(self, ids: list[str], known: dict, computed: int) -> None:
        with self.lock:
            self.computed += computed
            for i in ids:
                self.rows[i] = known[i]
                self.rows.move_to_end(i)
            while len(self.rows) > self.limit:
                self.rows.popitem(last=False)


offline_features = OfflineFeatures(MAX_CANDIDATES + 50)


def _features(runtime, ids: list[str], images: np.ndarray, offline: bool) -> torch.Tensor:
    """Activations of the scoring network for uint8 (N, H, W, 3) ``images`` (stored as ``ids``)."""
    from ...self_explaining import layer_activations

    if offline:
        return offline_features(ids, images)
    served = runtime.registry.served
    parts = []
    for start in range(0, len(images), BATCH):  # the lock per batch: predictions interleave
        with served.lock:
            parts.append(layer_activations(served.model, images[start : start + BATCH]))
    return torch.cat(parts)


class ProposalRequest(BaseModel):
    items: Annotated[
        list[Annotated[int, Field(ge=1, le=MAX_ID)]],
        Field(min_length=1, max_length=MAX_MARKS, description="feedback items whose marks to fit"),
    ]
    exclude: Annotated[
        list[Annotated[str, Field(max_length=128)]],
        Field(
            max_length=MAX_CANDIDATES,
            description="image ids already reviewed (accepted or rejected in earlier rounds of "
            "'Find more like these'): scored, but neither shown nor counted",
        ),
    ] = []
    worklist: int | None = Field(None, ge=1, le=MAX_ID, description="score its images only")
    threshold: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False, description="default: propagate's 0.9"
    )
    limit: int = Field(100, ge=1, le=MAX_SHOWN, description="the highest scores returned")


class Proposal(BaseModel):
    image_id: str
    image_url: str
    score: float
    proposed: bool = Field(description="the score reaches the threshold")
    outlined: bool = Field(description="the proposed mask is not empty (it can be accepted)")
    mask_png: str = Field(description="the proposed mask at the model's input, a PNG data URL")


class Proposals(BaseModel):
    version: int = Field(description="the served version that scored them (accept's shown_version)")
    threshold: float
    scored: int
    proposed: int
    proposals: list[Proposal]


class Accepted(BaseModel):
    image_id: str
    mask_base64: str = Field(max_length=2_000_000, description="PNG (data URL or base64)")


class AcceptRequest(BaseModel):
    items: Annotated[
        list[Annotated[int, Field(ge=1, le=MAX_ID)]], Field(min_length=1, max_length=50)
    ]
    shown_version: int = Field(ge=1, le=MAX_ID)
    accepted: Annotated[list[Accepted], Field(min_length=1, max_length=MAX_SHOWN)]


def _marks(session, user, ids: list[int], runtime, size: int) -> dict[str, np.ndarray]:
    """{image_id: ignore mask} of the user's own items (404 for another's, 422 without one)."""
    marks = {}
    for item_id in ids:
        item = session.get(Item, item_id)
        if item is None or item.user_id != user.id:
            raise HTTPException(404, f"no feedback item {item_id} of yours")
        if not item.ignore_mask_path:
            raise HTTPException(422, f"feedback {item_id} has no ignore mask to propagate")
        mask = read_image(runtime.store.absolute(item.ignore_mask_path), "L", size) > 127
        image_id = PurePosixPath(item.image_path).stem
        marks[image_id] = mask.astype(np.uint8)
    return marks


def _marked_already(session, user, runtime, ids: list[str], side: int) -> dict[str, np.ndarray]:
    """{image id: the union of this user's ignore masks on it} for the images ``ids`` that
    carry one (withdrawn feedback left out), at ``side`` px."""
    paths = {f"images/{i}.png": i for i in ids}
    items = session.scalars(
        select(Item).where(
            Item.user_id == user.id,
            Item.ignore_mask_path.is_not(None),
            Item.status != "withdrawn",
            Item.image_path.in_(list(paths)),
        )
    ).all()
    out: dict[str, np.ndarray] = {}
    for item in items:
        mask = read_image(runtime.store.absolute(item.ignore_mask_path), "L", side) > 127
        image_id = paths[item.image_path]
        out[image_id] = out[image_id] | mask if image_id in out else mask
    return out


def _newest_stored(runtime) -> list[str]:
    """The newest :data:`MAX_CANDIDATES` stored images' ids, newest first."""
    files = sorted(
        (runtime.store.root / "images").glob("*.png"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    return [p.stem for p in files[:MAX_CANDIDATES]]


def _read_images(runtime, ids: list[str], size: int) -> np.ndarray:
    """uint8 (N, size, size, 3): the stored images ``ids``."""
    root = runtime.store.root / "images"
    return np.stack([read_image(root / f"{i}.png", "RGB", size) for i in ids])


def warm_offline(runtime) -> int:
    """Compute the offline network's activations of the stored images a request would score
    (the newest :data:`MAX_CANDIDATES`) before anyone asks, a batch at a time; return how many
    were computed. ``serve`` (with the default ``--propose-with offline``) runs it in the
    background at start, so the first "Find more like this" does not pay for every stored
    image (40-90 ms an image on a 2-core CPU: 1.5-3 min for 2,000; predictions meanwhile
    take about twice as long at the 95th percentile, bench/offline_warmup.py)."""
    ids = _newest_stored(runtime)
    before = offline_features.computed
    for start in range(0, len(ids), 4 * BATCH):
        part = ids[start : start + 4 * BATCH]
        offline_features(part, _read_images(runtime, part, OFFLINE_SIZE))
    return offline_features.computed - before


def _candidates(runtime, session, worklist: int | None, size: int) -> list[str]:
    """Image ids to score: a worklist's entries (their originals admitted as model inputs) or
    the stored images, newest first."""
    if worklist is None:
        return _newest_stored(runtime)
    entries = session.scalars(
        select(WorklistEntry).where(WorklistEntry.worklist_id == worklist)
    ).all()
    if not entries:
        raise HTTPException(404, f"no worklist {worklist}")
    ids = []
    for entry in entries[:MAX_CANDIDATES]:
        if entry.image_id is None:
            try:
                with decode_slot():
                    data, img = read_original(
                        runtime.store, entry.original_id, max_pixels=runtime.settings.max_pixels
                    )
                    rgb = admit(runtime.store, session, data, img, size)
            except UploadError:
                continue  # a damaged original is not a candidate (the worklist shows it)
            ids.append(runtime.store.put("images", png_bytes(rgb)))
        else:
            ids.append(entry.image_id)
    return list(dict.fromkeys(ids))


def _data_url(mask: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(mask * 255)).decode()


@router.post("/proposals", response_model=Proposals)
def propose(
    body: ProposalRequest, user: Clinician, runtime: RuntimeDep, session: SessionDep
) -> Proposals:
    """The images that look like the marked ones: every stored image (or a worklist's) scored
    for the artifact the given feedback items' ignore masks mark, highest first, each with a
    proposed mask; the images in ``exclude`` (reviewed in earlier rounds), and those where this
    clinician's ignore feedback already covers the place found, are left out. Nothing
    is stored: accept with ``POST /api/proposals/accept``. The page's "Find more like these"
    asks again with the source mark and the newest accepted proposals
    (:func:`feedbackcam.propagate.round_marks`), excluding what was reviewed."""
    from ...propagate import (
        DEFAULT_THRESHOLD,
        LITE0_EXPAND_AT,
        LITE0_THRESHOLD,
        concept_proposals,
        outlined_masks,
    )

    served = runtime.registry.served
    size = served.spec.input_size
    offline = runtime.settings.propose_with == "offline"
    side = OFFLINE_SIZE if offline else size  # where the scorer and its masks work
    marks_by_id = _marks(session, user, body.items, runtime, side)
    ids = list(marks_by_id) + [
        i for i in _candidates(runtime, session, body.worklist, size) if i not in marks_by_id
    ]
    if len(ids) == len(marks_by_id):
        raise HTTPException(422, "no other images to look at yet")
    images = _read_images(runtime, ids, side)
    marks = {k: marks_by_id[i] for k, i in enumerate(ids) if i in marks_by_id}
    features = _features(runtime, ids, images, offline)
    others = [i for i in ids if i not in marks_by_id]
    already = _marked_already(session, user, runtime, others, side)
    props = concept_proposals(features, marks, side, expand_at=LITE0_EXPAND_AT if offline else None)
    default = LITE0_THRESHOLD if offline else DEFAULT_THRESHOLD
    threshold = default if body.threshold is None else body.threshold
    reviewed = set(body.exclude)
    skip = set(marks) | {k for k, i in enumerate(ids) if i in reviewed}
    # an image this clinician already marked where the artifact is found (the concept's peak
    # within a feature cell of the mark) is not offered again: a new chain from a new mark
    # would otherwise offer every image accepted before; one marked elsewhere still is
    grow = side // features.shape[-1]
    for k, i in enumerate(ids):
        if i in already and k not in skip:
            near = dilate(torch.from_numpy(already[i])[None], grow)[0].numpy() > 0
            y, x = np.unravel_index(np.argmax(props.maps[k]), props.maps[k].shape)
            if near[y, x]:
                skip.add(k)
    order = [k for k in np.argsort(-props.scores, kind="stable") if k not in skip]
    chosen = props.proposed(threshold)
    # outlined only where a mask is shown or counted: the shown images and the chosen ones
    need = sorted({*order[: body.limit], *(k for k in order if chosen[k])})
    outlines = outlined_masks(props, images, marks, need, grow)
    masks = {k: resize_nearest(m, size) for k, m in zip(need, outlines, strict=True)}
    shown = [
        Proposal(
            image_id=ids[k],
            image_url=f"/api/images/{ids[k]}",
            score=round(float(props.scores[k]), 4),
            proposed=bool(chosen[k] and masks[k].any()),
            outlined=bool(masks[k].any()),
            mask_png=_data_url(masks[k]),
        )
        for k in order[: body.limit]
    ]
    return Proposals(
        version=served.version_id,
        threshold=threshold,
        scored=len(order),
        proposed=int(sum(bool(masks[k].any()) for k in order if chosen[k])),
        proposals=shown,
    )


@router.post("/proposals/accept", response_model=list[FeedbackItem], status_code=201)
def accept(
    body: AcceptRequest, user: Clinician, runtime: RuntimeDep, session: SessionDep
) -> list[FeedbackItem]:
    """Store accepted proposals as this clinician's ignore feedback, each marked as propagated
    from the first of ``items``. The clinician confirmed the artifact, not the diagnosis: the
    item's class is the served model's prediction (so the update learns that the artifact must
    not matter, not a new label). Everything is checked before anything is stored; a proposal
    accepted twice is stored once."""
    served = runtime.registry.served
    size = served.spec.input_size
    _marks(session, user, body.items, runtime, size)  # the user's own items with ignore masks
    if session.get(Version, body.shown_version) is None:
        raise HTTPException(422, f"shown_version: no version {body.shown_version}")
    regions, images = [], []
    for k, a in enumerate(body.accepted):
        path = runtime.store.path_of("images", a.image_id)
        if path is None:
            raise HTTPException(404, f"accepted[{k}]: no image {a.image_id!r}")
        region = decode_region(
            b64=a.mask_base64,
            size=size,
            original=None,
            max_bytes=runtime.settings.max_upload_bytes,
            what=f"accepted[{k}].mask_base64",
        )
        if not region.any():
            raise HTTPException(422, f"accepted[{k}]: the mask is empty")
        regions.append(region)
        images.append(read_image(path, "RGB", size))
    from ...evaluate import predict_classes

    with served.lock:
        device = next(served.model.parameters()).device
        predicted = predict_classes(served.model, np.stack(images), device=device)
    out = []
    for a, region, cls in zip(body.accepted, regions, predicted.tolist(), strict=True):
        png = png_bytes(region * 255)
        name = served.spec.classes[int(cls)]
        item = Item(
            image_path=f"images/{a.image_id}.png",
            user_id=user.id,
            label=name,
            predicted=name,
            agree=False,
            mask_path=None,
            ignore_mask_path=content_path("masks", png),
            shown_version_id=body.shown_version,
            propagated_from=body.items[0],
        )
        item.idempotency_key = _key(item, None)
        first = _stored(session, user, item, False)
        if first is not None:
            out.append(_out(first, user.name, None, runtime.settings.grace_seconds))
            continue
        runtime.store.put("masks", png)
        session.add(item)
        session.flush()
        out.append(_out(item, user.name, None, runtime.settings.grace_seconds))
    session.commit()
    runtime.worker.notify()
    return out
