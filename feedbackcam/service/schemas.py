"""The API's JSON shapes (they also make the OpenAPI docs at /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Role = Literal["viewer", "clinician", "admin"]


class Me(BaseModel):
    name: str
    role: Role
    expires: str | None = Field(None, description="when the token stops signing in (UTC)")


class NewUser(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    role: Role
    days: float | None = Field(
        None,
        gt=0,
        le=36_500,
        allow_inf_nan=False,
        description="the token expires after this many days (at most 36,500)",
    )


class CreatedUser(Me):
    token: str = Field(description="shown only this once; only its hash is stored")


class Prediction(BaseModel):
    image_id: str = Field(description="content id of the image; use it for feedback")
    image_url: str
    version: int = Field(description="the model version that answered")
    predicted: str
    probabilities: dict[str, float]
    saliency_png: str = Field(
        description="data URL of a greyscale PNG at the image's size: 255 = the most salient"
    )
    size: int = Field(description="side of the model's input, in pixels")
    original_url: str = Field(description="the image as uploaded (the model input if unknown)")
    width: int = Field(description="the original's width; masks may be drawn at this size")
    height: int = Field(description="the original's height")
    energy: float = Field(description="energy score -logsumexp(logits), for the record")
    energy_threshold: float | None = Field(
        description="the validation set's quantile of it (None: no check); it does not decide"
    )
    unfamiliar: bool = Field(
        False, description="the image is unlike the validation images (see familiarity)"
    )
    familiarity: dict[str, float | None] = Field(
        default_factory=dict,
        description="the unfamiliar-input checks (ood.py): 'features' and 'image' Mahalanobis "
        "distances, each with its '_threshold' (the validation set's out-of-fold quantile)",
    )
    warnings: list[str] = Field(description="unfamiliar input, low confidence, in words")


class GalleryEntry(BaseModel):
    image_id: str
    name: str
    label: str | None
    image_url: str


class FeedbackItem(BaseModel):
    id: int
    image_id: str
    image_url: str
    user: str
    created: str
    notes: list[str] = Field(
        default_factory=list,
        description="said once, on submission: e.g. that the answer shown came from an older "
        "version than the one now in use",
    )
    now_predicted: str | None = Field(
        None,
        description="once an update learnt from it and was promoted: the class that version "
        "gives the image (compare with label: does the model now agree?)",
    )
    learn_after: str | None = Field(
        None,
        description="while pending: when an automatic update may first learn from it (until "
        "then its author can withdraw it; serve --grace-seconds)",
    )
    label: str
    predicted: str
    agree: bool
    mask_url: str | None
    ignore_mask_url: str | None = Field(None, description="the region that must not matter")
    shown_version: int
    status: Literal["pending", "used", "withdrawn"]
    update_version: int | None = Field(description="the update that used it (see its status)")
    update_status: str | None
    update_reason: str | None
    propagated_from: int | None = Field(
        None, description="accepted from a proposal: the feedback item it was found from"
    )


class VersionInfo(BaseModel):
    id: int
    parent: int | None
    created: str
    status: Literal["candidate", "promoted", "rejected"]
    reason: str
    current: bool
    metrics: dict[str, Any]
    parent_metrics: dict[str, float | None] = Field(
        {}, description="the parent's validation scores, to compare (before -> after)"
    )
    regressions: list[str] = Field(
        [], description="validation scores a promotion lowered, in words (even within tolerance)"
    )


class UpdateStatus(BaseModel):
    enabled: bool
    message: str
    current_version: int
    pending: int
    update_every: int
    running: bool
    candidate: int | None
    phase: Literal["idle", "queued", "training", "checking"] = Field(
        description="queued: feedback waits for the next update"
    )
    step: int | None = Field(description="optimizer steps started, while training")
    steps: int | None
    training_items: int | None = Field(description="items the running update learns from")
    last_update: VersionInfo | None
    last_error: str | None
    learning: dict[str, Any] = Field(
        default_factory=dict,
        description="how updates learn (serve's flags): lambda, the explanation loss on keep "
        "masks, the ignore loss on ignore masks, the CAM",
    )


class Problem(BaseModel):
    """Every error's body: a sentence, or FastAPI's list of field errors for a malformed request."""

    detail: str | list[dict[str, Any]]


_ERRORS = {
    401: "no token, or an unknown or revoked one",
    403: "the token's role may not do this",
    404: "no such item, image or version",
    409: "the request conflicts with the current state",
    413: "too many bytes or pixels",
    415: "not a PNG or JPEG image",
    422: "a field is missing, malformed or out of range",
    429: "too many requests from this token; see Retry-After",
    503: "storage (disk or database) unavailable for now; see Retry-After",
}
# string keys: FastAPI then documents 422 with this shape instead of its own
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    str(code): {"model": Problem, "description": text} for code, text in _ERRORS.items()
}
