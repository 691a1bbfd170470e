"""SynthDerm's renderer: one sample drawn from its random generator (skin, hairs, the lesion
and its dermoscopic structures with their masks, the optional artifact, the vignette).

:mod:`feedbackcam.data.synth` says what is drawn and why (the class rule, the confounder);
this module is how. Coordinates are normalised to [-1, 1] across the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .records import ATTRIBUTES

_GLOB, _MILIA, _NEG, _NET, _STREAK = range(5)
_NV, _MEL, _BKL = range(3)
# Share of the structure budget each attribute gets when several are present.
_WEIGHT = {_NET: 1.0, _NEG: 0.8, _STREAK: 0.6, _GLOB: 0.5, _MILIA: 1.0}
_F32 = np.float32


# --------------------------------------------------------------------------- drawing helpers


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise, roughly unit variance, `cells` lattice cells across the image."""
    g = rng.standard_normal((cells + 1, cells + 1)).astype(_F32)
    t = (np.arange(size, dtype=_F32) + 0.5) * (cells / size)
    i = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i
    f = f * f * (3 - 2 * f)
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f


def _aa(half_width: np.ndarray | float, dist: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased coverage of a stroke of the given half width at distance `dist`."""
    return np.clip((half_width - dist) / px + 0.5, 0.0, 1.0)


def _lerp(img: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> None:
    img += (np.asarray(colour, _F32) - img) * alpha[..., None]


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        for k in range(1, r + 1):
            if axis == 0:
                out[k:] |= src[:-k]
                out[:-k] |= src[k:]
            else:
                out[:, k:] |= src[:, :-k]
                out[:, :-k] |= src[:, k:]
    return out


@dataclass
class _Canvas:
    size: int
    px: float  # one pixel in normalised units
    x: np.ndarray
    y: np.ndarray


@dataclass
class _Lesion:
    cx: float
    cy: float
    r0: float
    r: np.ndarray  # distance to the centre
    theta: np.ndarray
    rho: np.ndarray  # r / border radius: < 1 inside
    colour: np.ndarray  # (H, W, 3) pigment colour field
    body: np.ndarray  # bool, rho < 1


def _canvas(size: int) -> _Canvas:
    c = (np.arange(size, dtype=_F32) + 0.5) * (2 / size) - 1
    return _Canvas(size, 2 / size, c[None, :].repeat(size, 0), c[:, None].repeat(size, 1))


def render(
    rng: np.random.Generator, label: int, size: int, artifact: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image, attributes, artifact mask, lesion mask) of one sample, with ``artifact`` drawn
    (None: none)."""
    clean, patched, attrs, art_mask, lesion = render_versions(rng, label, size, artifact)
    return (clean if artifact is None else patched), attrs, art_mask, lesion


def render_versions(
    rng: np.random.Generator, label: int, size: int, artifact: str | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]:
    """One sample without and with its artifact: (clean image, image with ``artifact`` or
    None, attributes, artifact mask, lesion mask). The artifact has its own random stream, so
    the clean image is the one drawn with ``artifact=None``."""
    art_rng = np.random.default_rng(rng.integers(2**63))
    cv = _canvas(size)
    img = _skin(rng, cv)
    les = _lesion(rng, cv, img)
    attrs = _structures(rng, label, cv, les, img)
    lesion_mask = les.body | attrs[_STREAK]
    _hairs(rng, cv, img)
    vignette = _vignette(rng, cv)
    grain = rng.normal(0.0, 0.012, img.shape).astype(_F32)

    def finish(img: np.ndarray) -> np.ndarray:
        return np.clip((img * vignette[..., None] + grain) * 255 + 0.5, 0, 255).astype(np.uint8)

    clean, patched = finish(img), None
    art_mask = np.zeros((size, size), bool)
    if artifact is not None:
        art_mask = _artifact(art_rng, artifact, cv, img, lesion_mask)
        patched = finish(img)
    u8 = np.uint8
    return clean, patched, attrs.astype(u8), art_mask.astype(u8), lesion_mask.astype(u8)


def _skin(rng: np.random.Generator, cv: _Canvas) -> np.ndarray:
    light, tan = np.array([0.94, 0.80, 0.74], _F32), np.array([0.86, 0.66, 0.54], _F32)
    base = light + (tan - light) * rng.uniform()
    # Many dermatoscopes give a cold bluish-white cast.
    base += (np.array([0.86, 0.86, 0.92], _F32) - base) * rng.uniform(0.0, 0.5)
    tex = 1 + 0.05 * _noise(rng, cv.size, 4) + 0.025 * _noise(rng, cv.size, 14)
    img = base * tex[..., None]
    redness = np.clip(_noise(rng, cv.size, 5), 0, None) * rng.uniform(0.0, 0.5)
    _lerp(img, np.array([0.85, 0.50, 0.50], _F32), 0.25 * redness)
    return img


def _lesion(rng: np.random.Generator, cv: _Canvas, img: np.ndarray) -> _Lesion:
    cx, cy = rng.uniform(-0.12, 0.12, 2)
    k = np.arange(2, 6)
    amp = rng.uniform(0, 1, 4) * np.array([0.18, 0.08, 0.05, 0.04])
    phase = rng.uniform(0, 2 * np.pi, 4)
    frac = rng.uniform(0.15, 0.33)
    # Area of r(theta) = r0 (1 + sum a cos) is pi r0^2 (1 + sum a^2 / 2); the image area is 4.
    r0 = float(np.sqrt(frac * 4 / np.pi / (1 + (amp**2).sum() / 2)))
    dx, dy = cv.x - cx, cv.y - cy
    r, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
    border = r0 * (
        1 + (amp[:, None, None] * np.cos(k[:, None, None] * theta + phase[:, None, None])).sum(0)
    )
    border *= 1 + 0.04 * _noise(rng, cv.size, 9)
    rho = (r / border).astype(_F32)
    light, dark = np.array([0.70, 0.48, 0.34], _F32), np.array([0.36, 0.21, 0.14], _F32)
    base = light + (dark - light) * rng.uniform()
    shade = 1 - rng.uniform(0.05, 0.3) * np.clip(1 - rho, 0, 1)
    mottle = 1 + 0.13 * _noise(rng, cv.size, 5) + 0.05 * _noise(rng, cv.size, 12)
    colour = base * (shade * mottle)[..., None]
    edge = rng.uniform(0.04, 0.15)
    _lerp(img, colour, 0.95 * _smoothstep(1 + edge, 1 - edge, rho))
    return _Lesion(cx, cy, r0, r, theta, rho, colour, rho < 1)


def _plan(rng: np.random.Generator, label: int) -> dict[int, str]:
    if label == _NV:
        plan = {_NET: "regular"}
        if rng.random() < 0.4:
            plan[_GLOB] = "regular"
        if rng.random() < 0.1:
            plan[_MILIA] = "sparse"
    elif label == _MEL:
        u = rng.random()
        plan = {_STREAK: "radial"} if u < 0.4 else {_NEG: "negative"}
        if u >= 0.7:
            plan[_STREAK] = "radial"
        if rng.random() < 0.5:
            plan[_NET] = "atypical"
        if rng.random() < 0.3:
            plan[_GLOB] = "irregular"
    else:
        plan = {_MILIA: "dense"}
    return plan


def _structures(
    rng: np.random.Generator, label: int, cv: _Canvas, les: _Lesion, img: np.ndarray
) -> np.ndarray:
    plan = _plan(rng, label)
    weights = {
        a: _WEIGHT[a] * (0.25 if s == "sparse" else 1) * rng.uniform(0.7, 1.3)
        for a, s in plan.items()
    }
    budget = rng.uniform(0.25, 0.55) * les.body.sum() / sum(weights.values())
    attrs = np.zeros((len(ATTRIBUTES), cv.size, cv.size), bool)
    free = les.rho < 0.92  # keep area structures off the fuzzy border
    # Streaks claim the periphery first; later structures take what is left, so the union stays
    # close to the budget instead of piling up.
    for a in (_STREAK, _NET, _NEG, _GLOB, _MILIA):
        if a not in plan:
            continue
        n_pix = budget * weights[a]
        if a == _STREAK:
            attrs[a] = _streaks(rng, cv, les, img, n_pix / les.body.sum())
        elif a in (_NET, _NEG):
            attrs[a] = _network(rng, cv, les, img, free, n_pix, plan[a])
        else:
            attrs[a] = _dots(rng, cv, les, img, free, n_pix, a, plan[a])
        free &= ~attrs[a]
    return attrs


def _region(
    rng: np.random.Generator, cv: _Canvas, les: _Lesion, free: np.ndarray, n_pix: float
) -> tuple[np.ndarray, np.ndarray]:
    """A blobby region of about `n_pix` free pixels, and a soft version fading in at its edge."""
    a = rng.uniform(0, 2 * np.pi)
    # A random linear or radial bias makes the region central, peripheral or eccentric.
    bias = rng.choice([-1.5, 0.0, 1.5]) * np.minimum(les.rho, 1)
    bias += (
        rng.uniform(0, 1.5) * ((cv.x - les.cx) * np.cos(a) + (cv.y - les.cy) * np.sin(a)) / les.r0
    )
    field = _noise(rng, cv.size, 5) + bias
    vals = field[free]
    if vals.size == 0:
        return free.copy(), free.astype(_F32)
    k = int(np.clip(round(n_pix), 1, vals.size))
    thr = np.partition(vals, vals.size - k)[vals.size - k]
    region = free & (field >= thr)
    return region, _smoothstep(thr, thr + 0.3, field) * region


def _network(
    rng: np.random.Generator,
    cv: _Canvas,
    les: _Lesion,
    img: np.ndarray,
    free: np.ndarray,
    n_pix: float,
    style: str,
) -> np.ndarray:
    region, soft = _region(rng, cv, les, free, n_pix)
    regular = style == "regular"
    period = rng.uniform(0.13, 0.18) if regular else rng.uniform(0.15, 0.24)
    if style == "negative":
        period = rng.uniform(0.2, 0.27)
    warp = 0.018 if regular else 0.05
    x = cv.x + warp * _noise(rng, cv.size, 7)
    y = cv.y + warp * _noise(rng, cv.size, 7)
    # Three plane waves 120 degrees apart peak on a hexagonal lattice; their low set is a
    # honeycomb, which reads as the reticular mesh of a pigment network.
    kk = 4 * np.pi / (np.sqrt(3) * period)
    ang = rng.uniform(0, np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
    f = sum(np.cos(kk * (x * np.cos(t) + y * np.sin(t))) for t in ang)
    if style == "regular":
        line = _smoothstep(-0.4, -1.1, f - rng.uniform(-0.15, 0.15))
        img *= (1 - 0.45 * line * soft)[..., None]
        img *= (1 + 0.03 * (1 - line) * soft)[..., None]
    elif style == "atypical":
        thr = rng.uniform(0.0, 0.4) + 0.7 * _noise(rng, cv.size, 6)
        line = _smoothstep(0.5, -0.5, f - thr) * _smoothstep(-0.8, -0.1, _noise(rng, cv.size, 8))
        _lerp(img, np.array([0.13, 0.10, 0.11], _F32), 0.8 * line * soft)
    else:
        img *= (1 - 0.35 * soft)[..., None]
        line = _smoothstep(-0.4, -1.0, f)
        light = les.colour + (np.array([0.93, 0.85, 0.78], _F32) - les.colour) * 0.6
        _lerp(img, light, 0.85 * line * soft)
    return region


def _dots(
    rng: np.random.Generator,
    cv: _Canvas,
    les: _Lesion,
    img: np.ndarray,
    free: np.ndarray,
    n_pix: float,
    attr: int,
    style: str,
) -> np.ndarray:
    """Globules or milia-like cysts scattered over a region; returns the annotated region."""
    region, _ = _region(rng, cv, les, free, n_pix)
    idx = np.flatnonzero(region)
    if idx.size == 0:
        return region
    m = min(idx.size, 150)
    cand = rng.choice(idx, size=m, replace=False)
    jitter = rng.uniform(-0.5, 0.5, (m, 2)) * cv.px
    xy = (np.stack([cv.x.flat[cand], cv.y.flat[cand]], 1) + jitter).astype(_F32)
    if attr == _MILIA:
        rad = rng.uniform(0.035, 0.05) * rng.uniform(0.85, 1.15, m)
    elif style == "regular":
        rad = rng.uniform(0.05, 0.065) * rng.uniform(0.9, 1.1, m)
    else:
        rad = rng.uniform(0.035, 0.09, m)
    rad = rad.astype(_F32)
    # Uneven spacing reads as an atypical cluster.
    gap = rng.uniform(1.25, 2.2, m) if style == "irregular" else np.full(m, 1.5)
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    min_d = (rad[:, None] + rad[None, :]) * (gap[:, None] + gap[None, :]) / 2
    # Random sequential packing fills about 60% of the plane with the exclusion disks.
    target = round(0.6 * n_pix * cv.px**2 / (np.pi * np.mean(rad * gap) ** 2))
    target = max(target, 4 if attr == _GLOB else 1)  # a lone globule is not a cluster
    alive = np.ones(m, bool)
    keep: list[int] = []
    while alive.any() and len(keep) < target:
        j = int(alive.argmax())
        keep.append(j)
        alive &= d[j] >= min_d[j]
    xy, rad = xy[keep], rad[keep]
    # Dots do not overlap, so every pixel only needs its nearest dot (in units of its radius).
    q = np.hypot(cv.x[None] - xy[:, 0, None, None], cv.y[None] - xy[:, 1, None, None])
    q /= rad[:, None, None]
    k = q.argmin(0)
    q = np.take_along_axis(q, k[None], 0)[0]
    r = rad[k]
    # An annotator outlines the cluster, not each dot: the region reaches ~2 radii out.
    mask = (q * r < np.maximum(2.0 * r, r + 1.5 * cv.px)) & (les.rho < 0.95)
    cover = _aa(r, q * r, cv.px) * mask
    if attr == _MILIA:
        glow = np.clip(1 - (q / 1.8) ** 2, 0, 1) * mask
        _lerp(img, np.array([0.96, 0.92, 0.80], _F32), 0.25 * glow)
        _lerp(img, np.array([0.99, 0.97, 0.86], _F32), 0.92 * cover)
        return mask
    tint = les.colour.reshape(-1, 3)[cand[keep]]
    if style == "regular":
        col = tint * 0.42
    else:
        blue = np.array([0.22, 0.22, 0.30], _F32)
        shade = rng.uniform(0.2, 0.6, (len(keep), 1))
        col = tint * shade + blue * rng.uniform(0, 0.6, (len(keep), 1))
    _lerp(img, col.astype(_F32)[k], 0.95 * cover)
    return mask


def _streaks(
    rng: np.random.Generator, cv: _Canvas, les: _Lesion, img: np.ndarray, frac: float
) -> np.ndarray:
    # Ring rho in [0.5, 1] covers 3/4 of a sector's body area, hence the half angle below.
    half = float(np.clip(frac * np.pi / 0.75, 0.4, 1.8))
    psi = rng.uniform(-np.pi, np.pi)
    step = rng.uniform(0.09, 0.12) / (0.9 * les.r0)
    k = max(3, int(2 * half / step) + 1)
    step = 2 * half / k
    ang = -half + (np.arange(k) + 0.5) * step + rng.uniform(-0.2, 0.2, k) * step
    start = rng.uniform(0.55, 0.72, k)
    end = rng.uniform(1.02, 1.12, k)
    width = rng.uniform(0.035, 0.05, k)
    t = _wrap(les.theta - psi)
    region = (np.abs(t) < half + step / 2) & (les.rho > 0.48) & (les.rho < 1.15)
    j = np.clip(np.round((t + half) / step - 0.5).astype(np.int64), 0, k - 1)
    a = t - ang[j]
    perp = les.r * np.abs(np.sin(a))
    along = (les.rho - start[j]) / (end[j] - start[j])
    taper = 1 - 0.5 * np.clip(along, 0, 1)
    ends = _smoothstep(0, 0.15, along) * _smoothstep(1, 0.85, along) * (np.cos(a) > 0)
    alpha = _aa(width[j] * taper / 2, perp, cv.px) * ends * region
    col = np.array([0.22, 0.13, 0.09], _F32) * rng.uniform(0.6, 1.2)
    _lerp(img, col, 0.9 * alpha)
    return region


def _hairs(rng: np.random.Generator, cv: _Canvas, img: np.ndarray) -> None:
    # Hairs are arcs of large circles: one distance evaluation per hair, no polyline.
    for _ in range(int(rng.integers(0, 4))):
        radius = rng.uniform(1.0, 4.0)
        p = rng.uniform(-0.9, 0.9, 2)
        a = rng.uniform(0, 2 * np.pi)
        ox, oy = p[0] + radius * np.cos(a), p[1] + radius * np.sin(a)
        span = rng.uniform(0.8, 2.2) / (2 * radius)
        dx, dy = cv.x - ox, cv.y - oy
        along = np.abs(_wrap(np.arctan2(dy, dx) - a - np.pi)) / span
        alpha = _aa(rng.uniform(0.006, 0.011), np.abs(np.hypot(dx, dy) - radius), cv.px)
        _lerp(img, np.array([0.10, 0.07, 0.06], _F32), 0.85 * alpha * _smoothstep(1, 0.8, along))


def _vignette(rng: np.random.Generator, cv: _Canvas) -> np.ndarray:
    centre = rng.uniform(-0.04, 0.04, 2)
    radius, soft = rng.uniform(1.1, 1.4), rng.uniform(0.04, 0.12)
    dist = np.hypot(cv.x - centre[0], cv.y - centre[1])
    return 1 - rng.uniform(0.85, 0.95) * _smoothstep(radius - soft, radius + soft, dist)


def _artifact(
    rng: np.random.Generator, kind: str, cv: _Canvas, img: np.ndarray, lesion: np.ndarray
) -> np.ndarray:
    keepout = _dilate(lesion, max(2, int(np.ceil(0.06 / cv.px))))
    draw = _patch if kind == "patch" else _ruler
    best, best_score = None, -1
    for attempt in range(40):
        # After a while, fall back to the corners, which a centred lesion never reaches.
        shape = draw(rng, cv, corner=attempt >= 30)
        region, full = shape[2], shape[3]
        inside = int((region & ~keepout).sum())
        if inside >= 0.5 * full and not (region & keepout).any():
            best = shape
            break
        if inside > best_score:
            best, best_score = shape, inside
    cover, colour, region, _ = best
    region &= ~keepout
    _lerp(img, colour, cover * region)
    return region


def _patch(
    rng: np.random.Generator, cv: _Canvas, corner: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """A band-aid: rounded strip, lighter central pad, darker rim."""
    if corner:
        cx, cy = rng.choice([-0.8, 0.8], 2)
    else:
        r, a = rng.uniform(0.6, 0.95), rng.uniform(0, 2 * np.pi)
        cx, cy = r * np.cos(a), r * np.sin(a)
    bx, by, rr, bw = rng.uniform(0.16, 0.26), rng.uniform(0.08, 0.13), 0.05, 0.025
    a = rng.uniform(0, np.pi)
    u = (cv.x - cx) * np.cos(a) + (cv.y - cy) * np.sin(a)
    v = -(cv.x - cx) * np.sin(a) + (cv.y - cy) * np.cos(a)
    qx, qy = np.abs(u) - (bx - rr), np.abs(v) - (by - rr)
    sdf = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - rr
    cover = np.clip(0.5 - sdf / cv.px, 0, 1)
    cover[cover < 0.05] = 0  # no faint fringe outside the returned mask
    palette = np.array([[0.20, 0.40, 0.85], [0.88, 0.74, 0.56], [0.25, 0.65, 0.30]], _F32)
    fill = palette[rng.integers(3)]
    rim = _smoothstep(-bw - cv.px, -bw, sdf)[..., None]
    pad = ((np.abs(u) < 0.35 * bx) & (np.abs(v) < by - 2 * bw))[..., None]
    colour = np.where(pad, fill + (1 - fill) * 0.45, fill)
    colour = colour + (fill * 0.5 - colour) * rim
    full = (np.pi * rr**2 + 4 * (bx * by - rr**2)) / cv.px**2
    return cover, colour, cover > 0, full


def _ruler(
    rng: np.random.Generator, cv: _Canvas, corner: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """A baseline with mm-like ticks (every fifth longer) running along one image edge."""
    side = int(rng.integers(4))  # bottom, top, right, left
    length = rng.uniform(0.6, 1.0)
    depth = rng.uniform(0.15, 0.28)
    start = rng.choice([-0.95, 0.95 - length]) if corner else rng.uniform(-0.95, 0.95 - length)
    spacing, w, m, tall = rng.uniform(0.09, 0.12), 0.03, 0.04, 0.12
    along, across = (cv.x, cv.y) if side < 2 else (cv.y, cv.x)
    # v: distance from the baseline towards the image edge, where the ticks point.
    v = (1 if side % 2 == 0 else -1) * across - (1 - depth)
    u = along - start
    i = np.round(u / spacing)
    tick_len = np.where(i % 5 == 0, tall, 0.55 * tall)
    in_u = (u > -w) & (u < length + w)
    ticks = _aa(w / 2, np.abs(u - i * spacing), cv.px) * (v >= 0) * (v <= tick_len) * in_u
    base = _aa(w / 2, np.abs(v), cv.px) * (u >= 0) * (u <= length)
    cover = np.maximum(ticks, base) * 0.9
    region = (u > -m) & (u < length + m) & (v > -m) & (v < tall + m)
    full = (length + 2 * m) * (tall + 2 * m) / cv.px**2
    return cover, np.array([0.14, 0.14, 0.16], _F32), region, full
