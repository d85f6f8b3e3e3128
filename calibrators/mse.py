"""MSE calibrator: the range minimising the expected squared quantization error (clipping + rounding)."""

from __future__ import annotations

from typing import Any

import numpy as np

from calibrators.base import TensorRange
from calibrators.histogram import HistogramCalibrator


def symmetric_mse(
    centers: np.ndarray, counts: np.ndarray, thresholds: np.ndarray, num_bits: int
) -> np.ndarray:
    """Mean squared error of symmetric quantization (zero point 0, levels ``-qmax..qmax``) per threshold.

    ``centers``/``counts`` describe the histogram of ``|x|``; every value is taken at its bin center.
    """
    qmax = (1 << (num_bits - 1)) - 1
    scale = (thresholds / qmax)[:, None]
    deq = np.minimum(np.round(centers[None, :] / scale), qmax) * scale
    return ((centers[None, :] - deq) ** 2 @ counts) / counts.sum()


def asymmetric_mse(
    centers: np.ndarray, counts: np.ndarray, los: np.ndarray, his: np.ndarray, num_bits: int
) -> np.ndarray:
    """Mean squared error of asymmetric (unsigned, with zero point) quantization per window ``[lo, hi]``.

    Models onnxruntime's convention: the quantized range is widened to include 0 and the zero point
    is rounded to an integer. ``centers``/``counts`` describe the histogram of ``x``.
    """
    qmax = (1 << num_bits) - 1
    rmin, rmax = np.minimum(los, 0.0), np.maximum(his, 0.0)
    scale = ((rmax - rmin) / qmax)[:, None]
    zp = np.clip(np.round(-rmin[:, None] / scale), 0, qmax)
    q = np.clip(np.round(centers[None, :] / scale) + zp, 0, qmax)
    deq = (q - zp) * scale
    return ((centers[None, :] - deq) ** 2 @ counts) / counts.sum()


class MseCalibrator(HistogramCalibrator):
    """Range minimising the quantization MSE over the streamed histogram (values at bin centers).

    Candidates shrink the observed range by fractions ``f`` evenly spaced in ``[min_fraction, 1]``:

    * symmetric: ``[-f * m, f * m]`` with ``m = max|x|`` (histogram of ``|x|``, ``2**(bits-1) - 1``
      positive levels);
    * asymmetric: the window shrinks towards the point of ``[min, max]`` nearest 0 (0 for a
      mixed-sign tensor, ``min`` for a positive one, ``max`` for a negative one), quantized with
      ``2**bits`` levels and a zero point.

    Options: ``num_candidates`` (256), ``min_fraction`` (0.01), ``num_bins`` (2048).
    """

    OPTIONS = {**HistogramCalibrator.OPTIONS, "num_candidates": 256, "min_fraction": 0.01}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["num_candidates"] < 2:
            raise self._option_error("num_candidates", "an integer >= 2")
        if not 0.0 < self.options["min_fraction"] <= 1.0:
            raise self._option_error("min_fraction", "a number in (0, 1]")

    def fractions(self) -> np.ndarray:
        """The candidate shrink fractions, ascending."""
        return np.linspace(self.options["min_fraction"], 1.0, self.options["num_candidates"])

    def _range(self, name: str) -> TensorRange:
        _, vmin, vmax = self.collector.stats(name)
        counts, edges = self.collector.histogram(name)
        centers = (edges[:-1] + edges[1:]) / 2
        weights = counts.astype(np.float64)
        f = self.fractions()
        if self.symmetric:
            amax = max(-vmin, vmax)
            errors = symmetric_mse(centers, weights, f * amax, self.num_bits)
            best = int(np.argmin(errors))
            t = float(f[best] * amax)
            return TensorRange(-t, t, {"mse": float(errors[best]), "fraction": float(f[best])})
        anchor = min(max(0.0, vmin), vmax)
        los, his = anchor + f * (vmin - anchor), anchor + f * (vmax - anchor)
        errors = asymmetric_mse(centers, weights, los, his, self.num_bits)
        best = int(np.argmin(errors))
        meta = {"mse": float(errors[best]), "fraction": float(f[best])}
        return TensorRange(float(los[best]), float(his[best]), meta)
