"""Percentile calibrator: clip the range at a percentile of the streamed histogram."""

from __future__ import annotations

from typing import Any

import numpy as np

from calibrators.base import TensorRange
from calibrators.histogram import HistogramCalibrator


def histogram_quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Value below which a fraction ``q`` (in [0, 1]) of the histogram mass lies.

    Linear interpolation inside the bin that crosses ``q``; the error against the exact quantile
    of the data is at most one bin width.
    """
    cum = np.cumsum(counts, dtype=np.float64)
    target = q * cum[-1]
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, len(counts) - 1)
    # skip empty bins so the value lands inside the bin that holds the quantile
    while counts[i] == 0 and i < len(counts) - 1:
        i += 1
    before = cum[i - 1] if i > 0 else 0.0
    frac = (target - before) / counts[i] if counts[i] else 1.0
    frac = min(max(frac, 0.0), 1.0)
    return float(edges[i] + frac * (edges[i + 1] - edges[i]))


class PercentileCalibrator(HistogramCalibrator):
    """Range from histogram percentiles.

    Symmetric targets: ``t`` = the ``percentile``-th percentile of ``|x|``; range ``[-t, t]``.
    Asymmetric targets: ``[P(100 - percentile), P(percentile)]`` of ``x`` itself, i.e. each tail
    loses ``100 - percentile`` percent (not half of it). Results are clamped to the exact observed
    ``[min, max]``; they match ``np.percentile`` of all the data within one bin width.

    Options: ``percentile`` (99.99, in [50, 100]), ``num_bins`` (2048).
    """

    OPTIONS = {**HistogramCalibrator.OPTIONS, "percentile": 99.99}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if not 50.0 <= self.options["percentile"] <= 100.0:
            raise self._option_error("percentile", "a number in [50, 100]")

    def _range(self, name: str) -> TensorRange:
        p = self.options["percentile"]
        _, vmin, vmax = self.collector.stats(name)
        counts, edges = self.collector.histogram(name)
        meta = {"percentile": p}
        hi = min(
            histogram_quantile(counts, edges, p / 100.0), vmax if not self.symmetric else max(-vmin, vmax)
        )
        if self.symmetric:
            return TensorRange(-hi, hi, meta)
        lo = max(histogram_quantile(counts, edges, 1.0 - p / 100.0), vmin)
        return TensorRange(min(lo, hi), hi, meta)
