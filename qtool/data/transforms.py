"""Image and mask files -> normalised float arrays of one size, with identical geometry for both.

One function (:func:`apply_geometry`) resizes images (bilinear) and masks (nearest), so a defect
and its mask always land on the same pixels whatever ``DataConfig.resize`` is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from qtool.data.samples import Sample
from qtool.errors import DataError
from qtool.recipe import DataConfig

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def _half_up(x: float) -> int:
    return max(1, int(np.floor(x + 0.5)))


def _stretch(img: Image.Image, size: int, resample: Image.Resampling, scale_ref: int) -> np.ndarray:
    return np.asarray(img.resize((size, size), resample))


def _pad(img: Image.Image, size: int, resample: Image.Resampling, scale_ref: int) -> np.ndarray:
    return _pad_scaled(img, size, resample, size / max(img.size))


def _scale(img: Image.Image, size: int, resample: Image.Resampling, scale_ref: int) -> np.ndarray:
    # one scale factor for every image (pixels keep their physical size across images of varying
    # size, as in MTD), shrunk further only for an image that would not fit the canvas
    return _pad_scaled(img, size, resample, min(size / scale_ref, size / max(img.size)))


def _pad_scaled(img: Image.Image, size: int, resample: Image.Resampling, scale: float) -> np.ndarray:
    w, h = img.size
    nw, nh = min(size, _half_up(w * scale)), min(size, _half_up(h * scale))
    arr = np.asarray(img.resize((nw, nh), resample))
    top, left = (size - nh) // 2, (size - nw) // 2
    pad = [(top, size - nh - top), (left, size - nw - left)] + [(0, 0)] * (arr.ndim - 2)
    # reflect (not zeros) so the padding looks like more of the part, not like an anomaly
    return np.pad(arr, pad, mode="reflect")


def _crop(img: Image.Image, size: int, resample: Image.Resampling, scale_ref: int) -> np.ndarray:
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, _half_up(w * scale)), max(size, _half_up(h * scale))
    arr = np.asarray(img.resize((nw, nh), resample))
    top, left = (nh - size) // 2, (nw - size) // 2
    return arr[top : top + size, left : left + size]


GEOMETRIES: dict[str, Callable[[Image.Image, int, Image.Resampling, int], np.ndarray]] = {
    "stretch": _stretch,
    "pad": _pad,
    "crop": _crop,
    "scale": _scale,
}
"""``DataConfig.resize`` modes: stretch to SxS; pad (longer side to S, reflect-pad); crop (shorter
side to S, centre crop); scale (every image by S / scale_ref, reflect-pad; fit if larger)."""


def apply_geometry(img: Image.Image, size: int, mode: str, resample: Image.Resampling,
                   scale_ref: int = 640) -> np.ndarray:
    """Bring ``img`` to ``size`` x ``size`` with the geometry ``mode``; returns (S, S[, C]) of its dtype.

    Raises:
        DataError: if ``mode`` is not one of :data:`GEOMETRIES`.
    """
    try:
        fn = GEOMETRIES[mode]
    except KeyError:
        raise DataError(f"unknown resize mode {mode!r}; available: {', '.join(GEOMETRIES)}") from None
    return fn(img, size, resample, scale_ref)


def _imagenet(x: np.ndarray) -> np.ndarray:
    return (x - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]


def _per_image(x: np.ndarray) -> np.ndarray:
    # one mean/std over all pixels and channels: zero mean, unit variance, about the spread of
    # ImageNet-normalised inputs; colour ratios between channels are kept
    return (x - x.mean()) / (x.std() + 1e-6)


NORMALIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"imagenet": _imagenet, "per-image": _per_image}
"""``DataConfig.normalize`` modes, applied to (3, S, S) float32 values in [0, 1]."""


def open_image(path: Path, what: str = "image") -> Image.Image:
    """Open and fully decode an image file.

    Raises:
        DataError: naming the file, if it is missing or cannot be decoded (corrupt, truncated).
    """
    try:
        img = Image.open(path)
        img.load()  # decode now: a truncated file fails here, not later in a worker
    except FileNotFoundError:
        raise DataError(f"{what} file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode {what} {path}: {e}") from e
    return img


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


class ImageTransform:
    """Turn image and mask files into arrays of size ``cfg.image_size`` (S).

    Args:
        cfg: the data section; uses ``image_size``, ``resize`` and ``normalize``.

    Raises:
        DataError: if ``cfg.resize`` or ``cfg.normalize`` is unknown.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.size = cfg.image_size
        self.resize = cfg.resize
        self.scale_ref = cfg.scale_ref
        if cfg.resize not in GEOMETRIES:
            raise DataError(f"unknown resize mode {cfg.resize!r}; available: {', '.join(GEOMETRIES)}")
        if cfg.normalize not in NORMALIZERS:
            raise DataError(f"unknown normalization {cfg.normalize!r}; available: {', '.join(NORMALIZERS)}")
        self._normalize = NORMALIZERS[cfg.normalize]

    def image(self, path: Path) -> np.ndarray:
        """Read an image: float32 (3, S, S), grayscale replicated to 3 channels, normalised.

        Raises:
            DataError: naming the file, if it is missing, corrupt or of an unsupported pixel mode.
        """
        img = open_image(Path(path))
        if img.mode in _SIXTEEN_BIT_MODES:
            img = Image.fromarray(np.asarray(img, dtype=np.float32) / 65535.0)  # float32 -> mode F
            scale = 1.0
        elif img.mode == "F":
            raise DataError(f"image {path} has floating-point pixels (mode F); save it as 8 or 16 bit")
        else:
            if img.mode != "L":
                img = img.convert("RGB")
            scale = 1.0 / 255.0
        arr = apply_geometry(img, self.size, self.resize, Image.Resampling.BILINEAR, self.scale_ref).astype(np.float32)
        arr *= scale
        chw = np.repeat(arr[None], 3, axis=0) if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return np.ascontiguousarray(self._normalize(np.clip(chw, 0.0, 1.0)), dtype=np.float32)

    def mask(self, sample: Sample) -> np.ndarray:
        """The ground-truth mask of ``sample``: float32 (S, S) in {0, 1}, same geometry as its image.

        A None mask gives zeros. Mask pixels > 127 are defect.

        Raises:
            DataError: naming both files, if the mask is missing, corrupt, or not the image's size.
        """
        if sample.mask is None:
            return np.zeros((self.size, self.size), dtype=np.float32)
        image_size = _image_size(sample.path)
        m = open_image(sample.mask, what=f"mask (of image {sample.path})")
        if m.size != image_size:
            raise DataError(
                f"mask {sample.mask} is {m.size[0]}x{m.size[1]} but its image {sample.path} is "
                f"{image_size[0]}x{image_size[1]}"
            )
        binary = Image.fromarray(np.where(np.asarray(m.convert("L")) > 127, 255, 0).astype(np.uint8))
        arr = apply_geometry(binary, self.size, self.resize, Image.Resampling.NEAREST, self.scale_ref)
        return (arr > 127).astype(np.float32)
