"""The API's JSON shapes (they also make the OpenAPI docs at /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Role = Literal["viewer", "clinician", "admin"]


class Me(BaseModel):
    name: str
    role: Role


class NewUser(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    role: Role


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
    size: int = Field(description="side of the shown image and of any mask, in pixels")


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
    label: str
    predicted: str
    agree: bool
    mask_url: str | None
    shown_version: int
    status: Literal["pending", "used"]
    update_version: int | None = Field(description="the update that used it (see its status)")
    update_status: str | None
    update_reason: str | None


class VersionInfo(BaseModel):
    id: int
    parent: int | None
    created: str
    status: Literal["candidate", "promoted", "rejected"]
    reason: str
    current: bool
    metrics: dict[str, Any]


class UpdateStatus(BaseModel):
    enabled: bool
    message: str
    current_version: int
    pending: int
    update_every: int
    running: bool
    candidate: int | None
    last_update: VersionInfo | None
    last_error: str | None


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
