"""Real photographed textures (scikit-image's brick, grass, gravel) as synthetic-defect categories.

Normals are random crops (with flips) of the 512x512 photograph resized to the requested size;
defects are painted by the same defect registry as the synthetic scenes, so masks are exact.
Registered in :data:`qtool.data.synth_scenes.CATEGORIES`; usable in ``data.synth.categories``.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from qtool.data.synth_scenes import CATEGORIES, CategoryKind, Scene
from qtool.errors import DataError

TEXTURES = ("brick", "grass", "gravel")


@functools.lru_cache(maxsize=len(TEXTURES))
def _photo(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError as e:
        raise DataError(f"texture category {name!r} needs scikit-image (pip install scikit-image)") from e
    return np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)


def _render(name: str, rng: np.random.Generator, size: int) -> Scene:
    photo = _photo(name)
    side = int(rng.integers(int(0.45 * photo.shape[0]), int(0.6 * photo.shape[0]) + 1))
    y, x = (int(rng.integers(0, photo.shape[i] - side + 1)) for i in (0, 1))
    crop = photo[y : y + side, x : x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    gray = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BILINEAR))
    image = np.repeat((gray.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    return Scene(image=image, foreground=np.ones((size, size), dtype=bool), background=image.copy())


for _name in TEXTURES:
    CATEGORIES.add(_name, CategoryKind(render=functools.partial(_render, _name), defects=("scratch", "hole", "spot"),
                                       gray=True))
