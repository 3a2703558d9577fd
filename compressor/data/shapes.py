"""`shapes`: a procedural RGB classification set, generated from the seed in a few seconds.

Ten classes of geometric figures drawn with PIL at random position, scale,
rotation and colour on a cluttered, noisy gradient background, with colour
jitter. It needs no download, is bitwise reproducible for a seed, and is hard
enough that a small CNN does not reach 100% quickly, so pruning costs show up
in the accuracy numbers.

Images are drawn at twice the target size and box-downsampled (anti-aliasing).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from compressor.errors import BadInput
from compressor.data.splits import DataSplits, check_input_size, make_splits

CLASS_NAMES = ["circle", "square", "triangle", "cross", "ring", "ellipse", "star", "diamond",
               "horizontal_bars", "vertical_bars"]
DEFAULT_TRAIN = 4000
_SUPERSAMPLE = 2


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _outline(cls: int, rng: np.random.Generator) -> tuple[list[np.ndarray], float]:
    """Unit-size polygon(s) for class `cls` (centred, radius ~1) and the rotation to apply."""
    small = math.radians(25.0)
    if cls == 0:  # circle
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        return [np.stack([np.cos(t), np.sin(t)], 1)], 0.0
    if cls == 1:  # square
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.8], rng.uniform(-small, small)
    if cls == 2:  # triangle
        t = np.array([0, 2, 4]) * math.pi / 3 - math.pi / 2
        return [np.stack([np.cos(t), np.sin(t)], 1)], rng.uniform(0, 2 * math.pi)
    if cls == 3:  # cross (plus sign)
        a, b = 1.0, rng.uniform(0.25, 0.4)
        pts = [[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b], [-a, -b],
               [-b, -b]]
        return [np.array(pts, float)], rng.uniform(-small, small)
    if cls == 4:  # ring: outer circle; the hole is drawn by the caller
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        return [np.stack([np.cos(t), np.sin(t)], 1)], 0.0
    if cls == 5:  # ellipse
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        return [np.stack([np.cos(t), rng.uniform(0.4, 0.6) * np.sin(t)], 1)], rng.uniform(0, math.pi)
    if cls == 6:  # five-pointed star
        t = np.arange(10) * math.pi / 5 - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        return [np.stack([r * np.cos(t), r * np.sin(t)], 1)], rng.uniform(0, 2 * math.pi)
    if cls == 7:  # diamond: a rhombus taller than wide
        w = rng.uniform(0.5, 0.7)
        return [np.array([[0, -1], [w, 0], [0, 1], [-w, 0]], float)], rng.uniform(-small, small)
    # 8/9: three parallel bars, horizontal or vertical
    h = rng.uniform(0.14, 0.22)
    bars = [np.array([[-1, y - h], [1, y - h], [1, y + h], [-1, y + h]], float) for y in (-0.65, 0.0, 0.65)]
    if cls == 9:
        bars = [b[:, ::-1].copy() for b in bars]
    return bars, rng.uniform(-small, small)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _contrasting(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A random colour at least moderately far from the background (sometimes only just)."""
    for _ in range(20):
        col = rng.integers(0, 256, size=3)
        if np.abs(col - background).sum() > rng.uniform(90, 200):
            break
    return tuple(int(v) for v in col)


def _draw_image(cls: int, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    h, w = size[0] * _SUPERSAMPLE, size[1] * _SUPERSAMPLE
    side = min(h, w)
    # Background: a linear gradient between two random colours.
    c0, c1 = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = (math.cos(angle) * xx / w + math.sin(angle) * yy / h)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    bg = c0[None, None, :] * (1 - ramp[..., None]) + c1[None, None, :] * ramp[..., None]
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    # Clutter: short lines and small blobs, never as large as the figure.
    for _ in range(int(rng.integers(2, 6))):
        col = _colour(rng)
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        if rng.random() < 0.5:
            length, a = rng.uniform(0.1, 0.4) * side, rng.uniform(0, 2 * math.pi)
            draw.line([(x0, y0), (x0 + length * math.cos(a), y0 + length * math.sin(a))], fill=col,
                      width=int(rng.integers(1, 2 * _SUPERSAMPLE + 1)))
        else:
            r = rng.uniform(0.02, 0.07) * side
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=col)
    # The figure.
    mean_bg = bg.reshape(-1, 3).mean(0)
    fill = _contrasting(rng, mean_bg)
    radius = rng.uniform(0.2, 0.4) * side
    cx = rng.uniform(radius * 0.8, w - radius * 0.8)
    cy = rng.uniform(radius * 0.8, h - radius * 0.8)
    polys, rot = _outline(cls, rng)
    for poly in polys:
        pts = _rotate(poly, rot) * radius + np.array([cx, cy])
        draw.polygon([tuple(p) for p in pts], fill=fill)
    if cls == 4:  # punch the ring's hole with a background-ish colour
        r_in = radius * rng.uniform(0.45, 0.65)
        hole = tuple(int(v) for v in np.clip(mean_bg + rng.normal(0, 20, 3), 0, 255))
        draw.ellipse([cx - r_in, cy - r_in, cx + r_in, cy + r_in], fill=hole)
    return np.asarray(img.reduce(_SUPERSAMPLE), dtype=np.float32)


def generate_shapes(n: int, *, seed: int, size: tuple[int, int] = (32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images (uint8 [n, 3, H, W]) with balanced labels in shuffled order, a pure function of `seed`."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASS_NAMES)
    rng.shuffle(labels)
    images = np.empty((n, size[0], size[1], 3), dtype=np.float32)
    for i, cls in enumerate(labels):
        images[i] = _draw_image(int(cls), rng, size)
    # Colour jitter (per-image contrast, brightness, channel gains) and sensor noise, vectorised.
    contrast = rng.uniform(0.6, 1.2, size=(n, 1, 1, 1)).astype(np.float32)
    brightness = rng.uniform(-30, 30, size=(n, 1, 1, 1)).astype(np.float32)
    gains = rng.uniform(0.85, 1.15, size=(n, 1, 1, 3)).astype(np.float32)
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    images = ((images - mean) * contrast + mean + brightness) * gains
    sigma = rng.uniform(4, 18, size=(n, 1, 1, 1)).astype(np.float32)
    images += rng.standard_normal(images.shape, dtype=np.float32) * sigma
    out = np.clip(np.rint(images), 0, 255).astype(np.uint8).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(out)), torch.from_numpy(labels.astype(np.int64))


def parse_shapes_spec(spec: str) -> int:
    """`shapes` -> default train size; `shapes:N` -> N training images."""
    _, sep, rest = spec.partition(":")
    if not sep:
        return DEFAULT_TRAIN
    try:
        n = int(rest)
    except ValueError as exc:
        raise BadInput(f"malformed data spec {spec!r}: expected shapes or shapes:N (N = train images)") from exc
    if n < 2 * len(CLASS_NAMES):
        raise BadInput(f"shapes:N needs N >= {2 * len(CLASS_NAMES)} (two images per class), got {n}")
    return n


def load_shapes_splits(spec: str, *, input_size: tuple[int, int] | None, seed: int, calib_size: int,
                       val_fraction: float) -> DataSplits:
    """Train and val are drawn independently (different sub-seeds); val has n * f / (1 - f) images."""
    n_train = parse_shapes_spec(spec)
    if not 0.0 < val_fraction < 1.0:
        raise BadInput(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    n_val = max(len(CLASS_NAMES), round(n_train * val_fraction / (1.0 - val_fraction)))
    size = check_input_size(input_size, (32, 32))
    seeds = np.random.SeedSequence(int(seed)).spawn(2)
    train_x, train_y = generate_shapes(n_train, seed=int(seeds[0].generate_state(1)[0]), size=size)
    val_x, val_y = generate_shapes(n_val, seed=int(seeds[1].generate_state(1)[0]), size=size)
    return make_splits("shapes", train_x, train_y, val_x, val_y, class_names=list(CLASS_NAMES), seed=seed,
                       calib_size=calib_size)
