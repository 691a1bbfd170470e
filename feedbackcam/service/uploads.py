"""Checking what users send: images and masks are decoded, never trusted by name or extension.

Every refusal is an :class:`UploadError` carrying the HTTP status the API answers with: 413 for
too many bytes or pixels, 415 for a type other than PNG/JPEG, 422 for data that does not decode
(truncated, corrupt) or a mask that does not fit the image.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


class UploadError(ValueError):
    """A refused upload; ``status`` is the HTTP status code to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_size(data: bytes, what: str, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise UploadError(413, f"{what}: more than the {max_bytes} bytes allowed")
    if not data:
        raise UploadError(422, f"{what}: empty file")


def read_limited(stream, what: str, max_bytes: int) -> bytes:
    """Read at most ``max_bytes`` (plus one, to tell) from a file object; refuse more."""
    data = stream.read(max_bytes + 1)
    check_size(data, what, max_bytes)
    return data


ORIENTATION = 0x0112  # the EXIF tag
_TURNED = {5, 6, 7, 8}  # orientations that swap width and height


def decode_image(
    data: bytes,
    what: str,
    *,
    max_pixels: int,
    formats=("PNG", "JPEG"),
    expect_size: tuple[int, int] | list[tuple[int, int]] | None = None,
) -> Image.Image:
    """Decode PNG or JPEG bytes fully; refuse other types, damaged data and too many pixels.

    The image is turned upright as its EXIF orientation says (a phone photo is stored sideways
    with Orientation 6), which is how browsers show it: the size, the model's input and any
    mask drawn on the page all refer to the image as the clinician sees it.

    The pixel count (and ``expect_size``, (w, h) or a list of them, if given) is read from the
    header and checked before
    any pixel is decoded, so a decompression bomb costs nothing; Pillow's own bomb check stays
    on as a second guard. Callers decoding large images hold a ``limits.decode_slot()`` for
    as long as the decoded image lives, which bounds the memory concurrent uploads take.
    """
    kind = next((k for sig, k in _SIGNATURES.items() if data.startswith(sig)), None)
    if kind not in formats:
        raise UploadError(415, f"{what}: expected a {' or '.join(formats)} image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[kind])
            w, h = img.size
            if img.getexif().get(ORIENTATION) in _TURNED:
                w, h = h, w
            sizes = [expect_size] if isinstance(expect_size, tuple) else expect_size
            if sizes is not None and (w, h) not in sizes:
                expected = " or ".join(f"{ew}x{eh}" for ew, eh in sizes)
                raise UploadError(422, f"{what}: {w}x{h}; expected {expected}, the shown image")
            if w * h > max_pixels:
                raise UploadError(
                    413, f"{what}: {w}x{h} pixels, more than the {max_pixels} allowed"
                )
            img.load()
            img = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UploadError(413, f"{what}: too many pixels ({err})") from err
    except UnidentifiedImageError as err:
        raise UploadError(415, f"{what}: not a readable {kind} image") from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
        if isinstance(err, UploadError):
            raise
        raise UploadError(422, f"{what}: damaged {kind} data ({err})") from err
    return img


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer greys scaled to 8 bits (``convert`` would clip them at 255)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        levels = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(levels / 257), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        levels = np.nan_to_num(np.asarray(img, dtype=np.float64))
        top = 1.0 if levels.max(initial=0) <= 1 else 255.0
        return Image.fromarray(np.clip(np.round(levels / top * 255), 0, 255).astype(np.uint8))
    return img


def model_rgb(img: Image.Image, size: int) -> np.ndarray:
    """The image as the model sees it: RGB, squashed to size x size (nearest neighbour, the
    way the training data was prepared)."""
    img = to_8bit(img)
    rgb = img if img.mode == "RGB" else img.convert("RGB")  # no copy of a large RGB image
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(rgb, dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def decode_mask_png(data: bytes, size: int, *, max_bytes: int, what: str = "mask") -> np.ndarray:
    """A mask image the size of the shown image; a pixel is in the region when its grey level
    (times its alpha, if any) is above half. A mask of only 0 and 1 (as array libraries write
    a boolean mask) counts 1 as in. Returns (size, size) uint8 in {0, 1}."""
    check_size(data, what, max_bytes)
    img = decode_image(
        data, what, max_pixels=max(size * size, 1), formats=("PNG",), expect_size=(size, size)
    )
    return mask_of(img)


def mask_of(img: Image.Image) -> np.ndarray:
    """A decoded mask image as (h, w) uint8 in {0, 1}: in where the grey level (times the
    alpha, if any) is above half; an image of only 0 and 1 counts 1 as in."""
    rgba = np.asarray(to_8bit(img).convert("RGBA"), dtype=np.float32)
    colour = rgba[..., :3].mean(axis=-1)
    if colour.max(initial=0) <= 1:
        colour = colour * 255
    grey = colour * rgba[..., 3] / 255
    return (grey > 127.5).astype(np.uint8)


def decode_base64(text: str, what: str, max_bytes: int) -> bytes:
    """The bytes of base64 text or of a ``data:...;base64,`` URL (what a canvas exports);
    413 beyond ``max_bytes``, 422 if it is not base64 (``what`` names the field)."""
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise UploadError(413, f"{what}: more than the {max_bytes} bytes allowed")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise UploadError(422, f"{what}: not base64 ({err})") from err


def decode_mask_base64(text: str, size: int, *, max_bytes: int) -> np.ndarray:
    """A PNG mask as base64 or a ``data:image/png;base64,`` URL (what a canvas exports)."""
    data = decode_base64(text, "mask_base64", max_bytes)
    return decode_mask_png(data, size, max_bytes=max_bytes, what="mask_base64")


def decode_mask_rle(
    text: str, size: int, shapes: list[tuple[int, int]] | None = None, what: str = "mask_rle"
) -> np.ndarray:
    """An uncompressed run-length mask, JSON ``{"size": [h, w], "counts": [...]}``: row-major
    runs alternating off/on, starting with off (COCO's uncompressed RLE, but row-major).

    Counts are whole numbers from 0 to h * w, at most h * w + 1 of them; anything else (floats,
    1e999, NaN, deep nesting, other keys' junk) is refused with 422 before any array is built.
    ``shapes``: the (h, w) allowed (default: size x size only).
    """
    shapes = shapes or [(size, size)]
    sizes = " or ".join(f"[{h}, {w}]" for h, w in shapes)
    expected = f"{what}: expected {{'size': {sizes}, 'counts': [whole numbers]}}"
    if len(text) > 12 * (max(h * w for h, w in shapes) + 2) + 64:
        raise UploadError(422, f"{expected}; the text is longer than such a mask can be")
    try:
        rle = json.loads(text, parse_float=_no_float, parse_constant=_no_float)
    except RecursionError as err:
        raise UploadError(422, f"{expected}; it is nested too deeply") from err
    except ValueError as err:
        raise UploadError(422, f"{expected} ({err})") from err
    if not isinstance(rle, dict) or not {"size", "counts"} <= rle.keys():
        raise UploadError(422, expected)
    shape, counts = rle["size"], rle["counts"]
    if not _ints(shape) or len(shape) != 2 or not _ints(counts):
        raise UploadError(422, expected)
    h, w = shape
    if (h, w) not in shapes:
        wanted = " or ".join(f"{sw}x{sh}" for sh, sw in shapes)
        raise UploadError(422, f"{what}: {w}x{h}; expected {wanted}, the shown image")
    if len(counts) > h * w + 1 or any(not 0 <= c <= h * w for c in counts):
        raise UploadError(422, f"{what}: expected at most {h * w + 1} counts, each 0..{h * w}")
    if sum(counts) != h * w:
        raise UploadError(422, f"{what}: counts must be >= 0 and sum to {h * w}")
    values = np.arange(len(counts)) % 2
    return np.repeat(values, counts).astype(np.uint8).reshape(h, w)


def _no_float(token: str):
    raise ValueError(f"{token[:20]!r} is not a whole number")


def _ints(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )
