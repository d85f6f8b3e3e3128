"""Scene renderers (normal images per synthetic category) and defect painters, numpy only.

A category renders a :class:`Scene` from a seeded generator; a defect paints onto a scene and
returns the pixel mask of what it changed. Both are found by name in registries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qtool.registry import Registry


@dataclass(frozen=True)
class Scene:
    """A clean rendered image and what defects need to know about it.

    Attributes:
        image: float32 (S, S, 3) in [0, 1].
        foreground: bool (S, S), where defects may land (the object, or everywhere for textures).
        background: float32 (S, S, 3), what a missing part of the object reveals.
    """

    image: np.ndarray
    foreground: np.ndarray
    background: np.ndarray


@dataclass(frozen=True)
class CategoryKind:
    """A synthetic category: how its normals look and which defects it gets.

    Attributes:
        render: ``(rng, size) -> Scene``.
        defects: names in :data:`DEFECTS`, used round-robin for the defective test images.
        gray: whether images are saved as single-channel grayscale.
    """

    render: Callable[[np.random.Generator, int], Scene]
    defects: tuple[str, ...]
    gray: bool = False


Defect = Callable[[np.random.Generator, Scene], tuple[np.ndarray, np.ndarray]]
CATEGORIES: Registry[CategoryKind] = Registry("synthetic category")
DEFECTS: Registry[Defect] = Registry("synthetic defect")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _lerp_axis(a: np.ndarray, n: int, axis: int) -> np.ndarray:
    m = a.shape[axis]
    t = np.linspace(0.0, m - 1, n, dtype=np.float32)
    i0 = np.floor(t).astype(int)
    i1 = np.minimum(i0 + 1, m - 1)
    f = t - i0
    shape = [1, 1]
    shape[axis] = n
    f = f.reshape(shape)
    return np.take(a, i0, axis=axis) * (1 - f) + np.take(a, i1, axis=axis) * f


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise, smooth over ``size / cells`` pixels: float32 (S, S)."""
    small = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return _lerp_axis(_lerp_axis(small, size, 0), size, 1)


def _rgb(gray: np.ndarray, tint: tuple[float, float, float]) -> np.ndarray:
    return gray[..., None] * np.asarray(tint, dtype=np.float32)


def _texture_scene(image: np.ndarray) -> Scene:
    fg = np.ones(image.shape[:2], dtype=bool)
    return Scene(image=image.astype(np.float32), foreground=fg, background=image.astype(np.float32))


def _render_grid(rng: np.random.Generator, size: int) -> Scene:
    yy, xx = _grid(size)
    theta = rng.uniform(-0.08, 0.08)
    period = size / rng.uniform(7.0, 9.0)
    thick = max(1.0, size / 64) * rng.uniform(1.0, 1.5)
    u = xx * np.cos(theta) + yy * np.sin(theta) + rng.uniform(0, period)
    v = -xx * np.sin(theta) + yy * np.cos(theta) + rng.uniform(0, period)
    lines = (np.mod(u, period) < thick) | (np.mod(v, period) < thick)
    gray = 0.6 * (1 - 0.5 * lines) + 0.03 * smooth_noise(rng, size, 8)
    return _texture_scene(_rgb(gray, (1.0, 0.95, 0.85)))


def _render_stripes(rng: np.random.Generator, size: int) -> Scene:
    yy, xx = _grid(size)
    theta = 0.6 + rng.uniform(-0.1, 0.1)
    period = size / rng.uniform(9.0, 11.0)
    u = xx * np.cos(theta) + yy * np.sin(theta) + rng.uniform(0, period)
    gray = 0.5 + 0.22 * np.sin(2 * np.pi * u / period) + 0.03 * smooth_noise(rng, size, 6)
    return _texture_scene(_rgb(gray, (0.8, 0.9, 1.0)))


def _render_noise_texture(rng: np.random.Generator, size: int) -> Scene:
    coarse = smooth_noise(rng, size, max(2, size // 8))
    gray = 0.5 + 0.1 * coarse + 0.05 * smooth_noise(rng, size, max(2, size // 4))
    return _texture_scene(_rgb(gray, (1.0, 1.0, 1.0)))


def _render_disc(rng: np.random.Generator, size: int) -> Scene:
    yy, xx = _grid(size)
    background = _rgb(0.15 + 0.08 * xx / size + 0.02 * smooth_noise(rng, size, 4), (1.0, 1.0, 1.0))
    cy, cx = size / 2 + rng.normal(0.0, size * 0.03, 2)
    r = size * 0.3 * (1 + rng.uniform(-0.05, 0.05))
    dist = np.hypot(yy - cy, xx - cx)
    disc = dist <= r
    body = 0.85 - 0.2 * (dist / r) ** 2
    ring = np.abs(dist - 0.6 * r) < max(1.0, size / 48)
    body = np.where(ring, body - 0.35, body)
    pose = rng.uniform(0, 2 * np.pi)  # an orientation mark gives the object a pose
    my, mx = cy + 0.8 * r * np.sin(pose), cx + 0.8 * r * np.cos(pose)
    body = np.where(np.hypot(yy - my, xx - mx) < max(1.5, 0.08 * r), 0.3, body)
    image = np.where(disc[..., None], _rgb(body, (1.0, 0.85, 0.6)), background)
    return Scene(image=image.astype(np.float32), foreground=disc, background=background.astype(np.float32))


CATEGORIES.add("grid", CategoryKind(_render_grid, ("scratch", "hole", "color")))
CATEGORIES.add("stripes", CategoryKind(_render_stripes, ("scratch", "spot", "color")))
CATEGORIES.add("noise-texture", CategoryKind(_render_noise_texture, ("scratch", "hole", "spot"), gray=True))
CATEGORIES.add("disc", CategoryKind(_render_disc, ("scratch", "hole", "color", "cut")))


def _point_in(rng: np.random.Generator, where: np.ndarray) -> tuple[float, float]:
    idx = rng.choice(np.flatnonzero(where))
    y, x = divmod(int(idx), where.shape[1])
    return float(y), float(x)


def _ellipse(rng: np.random.Generator, scene: Scene, rmin: float, rmax: float) -> np.ndarray:
    size = scene.image.shape[0]
    yy, xx = _grid(size)
    cy, cx = _point_in(rng, scene.foreground)
    a, b = rng.uniform(max(2.0, rmin), max(2.5, rmax), 2)
    t = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
    v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    return ((u / a) ** 2 + (v / b) ** 2 <= 1.0) & scene.foreground


def _scratch(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    size = scene.image.shape[0]
    yy, xx = _grid(size)
    y0, x0 = _point_in(rng, scene.foreground)
    angle, length = rng.uniform(0, np.pi), rng.uniform(size / 8, size / 3)
    dy, dx = np.sin(angle), np.cos(angle)
    s = np.clip((yy - y0) * dy + (xx - x0) * dx, 0.0, length)
    dist = np.hypot(yy - (y0 + s * dy), xx - (x0 + s * dx))
    mask = (dist <= max(1.0, size / 128) * rng.uniform(0.7, 1.2)) & scene.foreground
    shade = rng.choice([-0.45, 0.4])
    return np.where(mask[..., None], np.clip(scene.image + shade, 0, 1), scene.image), mask


def _hole(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    size = scene.image.shape[0]
    mask = _ellipse(rng, scene, size / 40, size / 10)
    return np.where(mask[..., None], scene.image * 0.2 + 0.02, scene.image), mask


def _spot(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    size = scene.image.shape[0]
    mask = _ellipse(rng, scene, size / 32, size / 8)
    shift = rng.choice([-0.3, 0.3])
    return np.where(mask[..., None], np.clip(scene.image + shift, 0, 1), scene.image), mask


def _color(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    size = scene.image.shape[0]
    mask = _ellipse(rng, scene, size / 32, size / 8)
    tints = ((0.35, -0.2, -0.2), (-0.2, 0.3, -0.2), (-0.2, -0.2, 0.35))
    tint = np.asarray(tints[rng.integers(3)], np.float32)
    return np.where(mask[..., None], np.clip(scene.image + tint, 0, 1), scene.image), mask


def _cut(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    size = scene.image.shape[0]
    fg = scene.foreground
    inner = fg & np.roll(fg, 1, 0) & np.roll(fg, -1, 0) & np.roll(fg, 1, 1) & np.roll(fg, -1, 1)
    cy, cx = _point_in(rng, fg & ~inner)  # a bite out of the object's rim
    yy, xx = _grid(size)
    mask = (np.hypot(yy - cy, xx - cx) <= rng.uniform(size / 16, size / 8)) & fg
    return np.where(mask[..., None], scene.background, scene.image), mask


for _name, _fn in (("scratch", _scratch), ("hole", _hole), ("spot", _spot), ("color", _color), ("cut", _cut)):
    DEFECTS.add(_name, _fn)


def paint_defect(
    rng: np.random.Generator, scene: Scene, kind: str, min_pixels: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Paint defect ``kind`` on ``scene``; returns (image, bool mask) with at least ``min_pixels`` marked.

    Raises:
        RegistryError: unknown defect kind.
    """
    fn = DEFECTS.get(kind)
    for _ in range(20):
        image, mask = fn(rng, scene)
        if mask.sum() >= min_pixels:
            return image, mask
    return image, mask  # a tiny defect is still a defect; the foreground is never this small in practice
