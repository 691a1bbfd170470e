"""POST /api/predict: classify and explain an uploaded image or a stored one."""

from __future__ import annotations

import base64
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, UploadFile

from ..deps import RuntimeDep, Viewer
from ..limits import decode_slot
from ..runtime import Runtime
from ..schemas import Prediction
from ..store import read_image
from ..uploads import decode_image, model_rgb, png_bytes, read_limited

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
    file: Annotated[UploadFile | None, File(description="a PNG or JPEG image")] = None,
    image_id: Annotated[str | None, Form(description="an image stored before")] = None,
) -> Prediction:
    """Predict the class of an image and explain it (Grad-CAM of the predicted class).

    Send either ``file`` or ``image_id`` (from an earlier prediction or the gallery). An
    uploaded image is checked, squashed to the model's input size and stored, so feedback can
    refer to it by ``image_id``.
    """
    served = runtime.registry.served
    size = served.spec.input_size
    if (file is None) == (image_id is None):
        raise HTTPException(422, "send an image file or an image_id, exactly one of them")
    if file is not None:
        limits = runtime.settings
        data = read_limited(file.file, "file", limits.max_upload_bytes)
        with decode_slot():  # the decoded image is large until it is squashed to the input size
            rgb = model_rgb(decode_image(data, "file", max_pixels=limits.max_pixels), size)
        image_id = runtime.store.put("images", png_bytes(rgb))
    else:
        rgb = stored_rgb(runtime, image_id, size)
    explanation = served.explain(rgb)
    probs = explanation.probs[0].tolist()
    saliency = (explanation.saliency[0].numpy() * 255).round().astype(np.uint8)
    return Prediction(
        image_id=image_id,
        image_url=f"/api/images/{image_id}",
        version=served.version_id,
        predicted=served.spec.classes[int(explanation.targets[0])],
        probabilities=dict(zip(served.spec.classes, probs)),
        saliency_png="data:image/png;base64," + base64.b64encode(png_bytes(saliency)).decode(),
        size=size,
    )
