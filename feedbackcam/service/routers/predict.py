"""POST /api/predict: classify and explain an uploaded image or a stored one."""

from __future__ import annotations

import base64
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, UploadFile

from ..db import Original
from ..deps import RuntimeDep, SessionDep, Viewer
from ..limits import decode_slot
from ..originals import admit, read_original
from ..runtime import Runtime
from ..schemas import Prediction
from ..store import read_image
from ..uploads import decode_image, png_bytes, read_limited

router = APIRouter(tags=["predict"])


def stored_rgb(runtime: Runtime, image_id: str, size: int) -> np.ndarray:
    path = runtime.store.path_of("images", image_id)
    if path is None:
        raise HTTPException(404, f"no image {image_id!r}: upload it to /api/predict first")
    return read_image(path, "RGB", size)


@router.post("/predict", response_model=Prediction)
def predict(
    user: Viewer,
    runtime: RuntimeDep,
    session: SessionDep,
    file: Annotated[UploadFile | None, File(description="a PNG or JPEG image")] = None,
    image_id: Annotated[str | None, Form(description="an image stored before")] = None,
    original_id: Annotated[str | None, Form(description="a stored original (worklists)")] = None,
) -> Prediction:
    """Predict the class of an image and explain it (Grad-CAM of the predicted class).

    Send one of ``file``, ``image_id`` (from an earlier prediction or the gallery) or
    ``original_id`` (a worklist entry's). An uploaded image is checked and kept twice: as
    received (the original, shown on the page) and at the model's input size (see
    ``originals.py`` for the exact map), so feedback can refer to it by ``image_id``.
    """
    served = runtime.registry.served
    size = served.spec.input_size
    if sum(v is not None for v in (file, image_id, original_id)) != 1:
        raise HTTPException(422, "send an image file, an image_id or an original_id: one of them")
    limits = runtime.settings
    if file is not None or original_id is not None:
        data = None
        if file is not None:
            data = read_limited(file.file, "file", limits.max_upload_bytes)
        # the decoded image is large until it is squashed to the input size
        with decode_slot():
            if data is not None:
                img = decode_image(data, "file", max_pixels=limits.max_pixels)
            else:
                data, img = read_original(runtime.store, original_id, max_pixels=limits.max_pixels)
            rgb = admit(runtime.store, session, data, img, size)
            del img
        image_id = runtime.store.put("images", png_bytes(rgb))
    else:
        rgb = stored_rgb(runtime, image_id, size)
    seen = served.explain(rgb)
    explanation = seen.explanation
    probs = explanation.probs[0].tolist()
    saliency = (explanation.saliency[0].numpy() * 255).round().astype(np.uint8)
    familiar, warnings = runtime.familiarity.warnings(
        served, rgb, max(probs), limits.low_confidence, (seen.logits, seen.pooled)
    )
    original = session.get(Original, image_id)
    return Prediction(
        image_id=image_id,
        image_url=f"/api/images/{image_id}",
        original_url=f"/api/originals/{image_id}" if original else f"/api/images/{image_id}",
        width=original.width if original else size,
        height=original.height if original else size,
        version=served.version_id,
        predicted=served.spec.classes[int(explanation.targets[0])],
        probabilities=dict(zip(served.spec.classes, probs)),
        saliency_png="data:image/png;base64," + base64.b64encode(png_bytes(saliency)).decode(),
        size=size,
        energy=familiar.energy,
        energy_threshold=familiar.energy_threshold,
        unfamiliar=familiar.unfamiliar,
        familiarity={
            "features": familiar.features,
            "features_threshold": familiar.features_threshold,
            "image": familiar.image,
            "image_threshold": familiar.image_threshold,
        },
        warnings=warnings,
    )
