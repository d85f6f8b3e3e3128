"""Synthetic anomalies made from normal calibration images, with masks.

Generic kinds (pasted patches, saturated scratches, noise blobs) and MTD-like low-contrast ones
(hair cracks, dark holes, large stains) that keep the surface texture.

Works on preprocessed arrays (3, S, S) the caller read from the normal calibration pool (held-out,
then training normals); nothing here opens a file, so the test split cannot leak in. Seeded per image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qtool.errors import DataError
from qtool.registry import Registry

#: kind(base (3,S,S), pool (N,3,S,S), index of base in pool, rng) -> (image, mask (S,S) {0,1}, details)
AnomalyKind = Callable[[np.ndarray, np.ndarray, int, np.random.Generator], tuple[np.ndarray, np.ndarray, dict]]
ANOMALY_KINDS: Registry[AnomalyKind] = Registry("synthetic anomaly kind")
DEFAULT_KINDS = ("patch", "scratch", "noise")


@dataclass
class SyntheticAnomalies:
    """Anomalous images made from normals, their defect masks, and what was done to each."""

    images: np.ndarray  # (N, 3, S, S) float32
    masks: np.ndarray  # (N, S, S) float32 in {0, 1}
    records: list[dict[str, Any]] = field(default_factory=list)  # per image: base, kind, details


def _box(size: int, rng: np.random.Generator, lo: float = 0.12, hi: float = 0.3) -> tuple[int, int, int, int]:
    """A random rectangle (top, left, height, width) covering lo..hi of the side, inside the image."""
    h = max(2, int(round(size * rng.uniform(lo, hi))))
    w = max(2, int(round(size * rng.uniform(lo, hi))))
    top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    return top, left, h, w


@ANOMALY_KINDS.register("patch")
def pasted_patch(base: np.ndarray, pool: np.ndarray, index: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, dict]:
    """A rectangle cut from another pool image (rotated by a random quarter turn) pasted elsewhere."""
    size = base.shape[-1]
    others = [j for j in range(len(pool)) if j != index] or [index]
    donor = int(others[int(rng.integers(len(others)))])
    top, left, h, w = _box(size, rng)
    turns = int(rng.integers(1, 4))
    src = pool[donor] if donor != index else base[:, ::-1, ::-1]
    sh, sw = (w, h) if turns % 2 else (h, w)  # the cut is rotated into an h x w patch
    st, sl = int(rng.integers(0, size - sh + 1)), int(rng.integers(0, size - sw + 1))
    patch = np.rot90(src[:, st : st + sh, sl : sl + sw], turns, axes=(1, 2))
    out = base.copy()
    out[:, top : top + h, left : left + w] = patch
    mask = np.zeros((size, size), np.float32)
    mask[top : top + h, left : left + w] = 1.0
    return out, mask, {"donor": donor, "box": [top, left, h, w], "quarter_turns": turns}


def _polyline_mask(points: np.ndarray, size: int, width: int) -> np.ndarray:
    """A {0, 1} mask of the polyline through ``points`` ((K, 2) as y, x), ``width`` pixels thick."""
    mask = np.zeros((size, size), np.float32)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        steps = int(max(abs(y1 - y0), abs(x1 - x0))) * 2 + 1
        ys, xs = np.linspace(y0, y1, steps), np.linspace(x0, x1, steps)
        for dy in range(width):
            for dx in range(width):
                mask[np.clip(np.round(ys).astype(int) + dy, 0, size - 1),
                     np.clip(np.round(xs).astype(int) + dx, 0, size - 1)] = 1.0
    return mask


def _pool_stats(pool: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel, shaped (3, 1, 1): the pool's spread, minimum and maximum."""
    return (pool.std(axis=(0, 2, 3))[:, None, None], pool.min(axis=(0, 2, 3))[:, None, None],
            pool.max(axis=(0, 2, 3))[:, None, None])


def _shifted(base: np.ndarray, pool: np.ndarray, profile: np.ndarray, spreads: float) -> np.ndarray:
    """``base`` plus ``spreads`` pool spreads times ``profile`` ((S, S) in [0, 1]), clipped to the pool's range."""
    std, lo, hi = _pool_stats(pool)
    return np.clip(base + spreads * std * profile[None], lo, hi).astype(np.float32)


@ANOMALY_KINDS.register("scratch")
def scratch(base: np.ndarray, pool: np.ndarray, index: int, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, dict]:
    """A thin polyline at the pool's brightest (or darkest) value per channel: a saturated scratch."""
    size = base.shape[-1]
    bright = bool(rng.integers(2))
    value = (pool.max(axis=(0, 2, 3)) if bright else pool.min(axis=(0, 2, 3))).astype(np.float32)
    width = max(1, size // 64)
    points = rng.uniform(0.1, 0.9, size=(int(rng.integers(2, 4)) + 1, 2)) * (size - 1)
    mask = _polyline_mask(points, size, width)
    out = np.where(mask[None] > 0, value[:, None, None], base).astype(np.float32)
    return out, mask, {"bright": bright, "segments": len(points) - 1, "width": width}


@ANOMALY_KINDS.register("crack")
def crack(base: np.ndarray, pool: np.ndarray, index: int, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray, dict]:
    """A jagged, hair-thin dark line that keeps the texture (1 to 2.5 pool spreads darker): an MTD-like crack."""
    size = base.shape[-1]
    width = max(1, size // 128)
    steps = int(rng.integers(6, 14))
    step = size * rng.uniform(0.02, 0.04)
    heading = rng.uniform(0.0, 2.0 * np.pi)
    points = [rng.uniform(0.2, 0.8, size=2) * (size - 1)]
    for _ in range(steps):
        heading += rng.uniform(-0.6, 0.6)
        points.append(np.clip(points[-1] + step * np.array([np.sin(heading), np.cos(heading)]), 0, size - 1))
    mask = _polyline_mask(np.array(points), size, width)
    depth = float(rng.uniform(1.0, 2.5))
    return _shifted(base, pool, mask, -depth), mask, {"steps": steps, "width": width, "depth_spreads": depth}


def _ellipse(size: int, center: tuple[float, float], axes: tuple[float, float]) -> np.ndarray:
    """Normalised squared radius of every pixel from an axis-aligned ellipse (<= 1 inside)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return ((yy - center[0]) / axes[0]) ** 2 + ((xx - center[1]) / axes[1]) ** 2


@ANOMALY_KINDS.register("hole")
def hole(base: np.ndarray, pool: np.ndarray, index: int, rng: np.random.Generator
         ) -> tuple[np.ndarray, np.ndarray, dict]:
    """A small dark spot, deepest at its centre (1.5 to 3 pool spreads): an MTD-like blowhole."""
    size = base.shape[-1]
    axes = (size * rng.uniform(0.015, 0.05), size * rng.uniform(0.015, 0.05))
    center = (rng.uniform(0.1, 0.9) * (size - 1), rng.uniform(0.1, 0.9) * (size - 1))
    r2 = _ellipse(size, center, axes)
    mask = (r2 <= 1.0).astype(np.float32)
    mask.flat[int(np.argmin(r2))] = 1.0  # at least the centre pixel
    depth = float(rng.uniform(1.5, 3.0))
    profile = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0)).astype(np.float32)
    return _shifted(base, pool, np.maximum(profile, mask * 0.5), -depth), mask, {
        "center": list(center), "axes": list(axes), "depth_spreads": depth}


@ANOMALY_KINDS.register("stain")
def stain(base: np.ndarray, pool: np.ndarray, index: int, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray, dict]:
    """A large region 0.5 to 1.2 pool spreads darker or brighter, texture kept: MTD-like uneven or fray.

    The ellipse's centre may lie near the border, which then cuts it, as uneven regions often are.
    """
    size = base.shape[-1]
    axes = (size * rng.uniform(0.15, 0.4), size * rng.uniform(0.15, 0.4))
    center = (rng.uniform(0.0, 1.0) * (size - 1), rng.uniform(0.0, 1.0) * (size - 1))
    mask = (_ellipse(size, center, axes) <= 1.0).astype(np.float32)
    shift = float(rng.uniform(0.5, 1.2)) * (1.0 if rng.integers(2) else -1.0)
    return _shifted(base, pool, mask, shift), mask, {"center": list(center), "axes": list(axes),
                                                      "shift_spreads": shift}


@ANOMALY_KINDS.register("noise")
def noise_blob(base: np.ndarray, pool: np.ndarray, index: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, dict]:
    """An elliptic blob of Gaussian noise (the pool's spread per channel), clipped to the pool's range."""
    size = base.shape[-1]
    top, left, h, w = _box(size, rng, 0.1, 0.25)
    cy, cx = top + h / 2.0, left + w / 2.0
    mask = (_ellipse(size, (cy, cx), (h / 2.0, w / 2.0)) <= 1.0).astype(np.float32)
    std, lo, hi = _pool_stats(pool)
    noisy = np.clip(base + std * rng.standard_normal(base.shape), lo, hi)
    out = np.where(mask[None] > 0, noisy, base).astype(np.float32)
    return out, mask, {"center": [cy, cx], "axes": [h / 2.0, w / 2.0]}


def synthesize(normals: np.ndarray, kinds: Sequence[str] = DEFAULT_KINDS, seed: int = 0) -> SyntheticAnomalies:
    """Make one anomaly from each normal image, the kinds taken in turn; deterministic for a seed.

    Args:
        normals: (N, 3, S, S) preprocessed normal images (the only source of every pixel used).
        kinds: names in :data:`ANOMALY_KINDS`.
        seed: image ``i`` uses the generator seeded ``(seed, i)``: its defect's geometry does not
            depend on ``N`` (its values may: patches, extremes and spread come from the pool).

    Returns:
        The anomalous images, masks and one record per image (base index, kind, details).

    Raises:
        DataError: no normal images, or images that are not (N, 3, S, S).
        RegistryError: an unknown kind (the message lists them).
    """
    pool = np.asarray(normals, dtype=np.float32)
    if pool.ndim != 4 or pool.shape[1] != 3 or pool.shape[2] != pool.shape[3] or len(pool) == 0:
        raise DataError(f"synthetic anomalies need normal images (N, 3, S, S); got shape {pool.shape}")
    if not kinds:
        raise DataError("synthetic anomalies need at least one kind; available: " + ", ".join(ANOMALY_KINDS.names()))
    makers = [(k, ANOMALY_KINDS.get(k)) for k in kinds]
    images, masks, records = [], [], []
    for i, base in enumerate(pool):
        kind, make = makers[i % len(makers)]
        image, mask, details = make(base, pool, i, np.random.default_rng([seed, i]))
        images.append(image)
        masks.append(mask)
        records.append({"base": i, "kind": kind, "defect_pixels": int(mask.sum()), **details})
    return SyntheticAnomalies(np.stack(images), np.stack(masks), records)
