"""Entropy calibrator: the KL-divergence threshold search of TensorRT's IInt8EntropyCalibrator2.

Follows ``_compute_amax_entropy`` of NVIDIA's pytorch-quantization, vectorised over all candidate
thresholds with prefix sums (about 10 ms per tensor at 2048 bins).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from calibrators.base import TensorRange
from calibrators.histogram import HistogramCalibrator


def kl_divergences(hist: np.ndarray, num_levels: int, candidates: np.ndarray) -> np.ndarray:
    """KL(P || Q) for each candidate bin count ``i`` of TensorRT's entropy calibration.

    For candidate ``i``: ``P`` is ``hist[:i]`` with the mass of ``hist[i:]`` folded into its last
    bin; ``Q`` merges ``hist[:i]`` into ``num_levels`` groups (bin ``j`` goes to group
    ``j * num_levels // i``) and spreads each group's mass evenly over its non-empty bins (empty
    bins stay empty). As in pytorch-quantization, ``hist[0]`` is first replaced by ``hist[1]``
    (the spike at 0 of post-ReLU tensors would otherwise dominate). A ``P > 0`` where ``Q == 0``
    gives ``inf``, as ``scipy.stats.entropy`` does.

    Args:
        hist: histogram of ``|x|`` (or of a non-negative ``x``) starting at 0, length >= 2.
        num_levels: number of quantization levels over ``[0, threshold]``.
        candidates: int array of bin counts ``i`` (1 <= i <= len(hist)).

    Returns:
        float64 array of divergences, one per candidate.
    """
    b = hist.astype(np.float64)
    b[0] = b[1]
    total = b.sum()
    zero = np.zeros(1)
    csum = np.concatenate([zero, np.cumsum(b)])  # csum[j] = sum(b[:j])
    cnz = np.concatenate([zero, np.cumsum(b > 0)])  # non-empty bins before j
    with np.errstate(divide="ignore"):
        blogb = np.where(b > 0, b * np.log(np.where(b > 0, b, 1.0)), 0.0)
    cblogb = np.concatenate([zero, np.cumsum(blogb)])

    i = candidates.astype(np.int64)
    k = np.arange(num_levels + 1, dtype=np.int64)
    starts = -((-k[None, :] * i[:, None]) // num_levels)  # first bin of each group: ceil(k*i/q)
    sums = csum[starts[:, 1:]] - csum[starts[:, :-1]]
    nnz = cnz[starts[:, 1:]] - cnz[starts[:, :-1]]
    filled = nnz > 0
    log_avg = np.zeros_like(sums)
    np.log(sums / np.where(filled, nnz, 1.0), out=log_avg, where=filled & (sums > 0))

    q_total = csum[i]  # sum of the unnormalised Q
    last = i - 1
    b_last = b[last]
    g_last = (last * num_levels) // i  # group of the last bin
    log_avg_last = log_avg[np.arange(len(i)), g_last]
    # sum over bins j < i - 1 with b_j > 0 of b_j * log(Pj / Qj), times total, by groups
    weighted = (log_avg * sums).sum(axis=1) - log_avg_last * b_last
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = math.log(total) - np.log(q_total)
        body = cblogb[last] - csum[last] * log_ratio - weighted
        p_last = b_last + (total - q_total)  # outliers folded into the last bin
        last_term = np.where(
            p_last > 0,
            p_last
            * (np.log(np.where(p_last > 0, p_last, 1.0)) - log_avg_last + np.log(q_total) - math.log(total)),
            0.0,
        )
        kl = (body + last_term) / total
    kl = np.where((p_last > 0) & (b_last == 0), np.inf, kl)  # P > 0 where Q == 0
    return np.where(q_total > 0, kl, np.inf)


class EntropyCalibrator(HistogramCalibrator):
    """Threshold minimising KL(P || Q) between the histogram and its quantized version (TensorRT).

    Always collects the histogram of ``|x|`` (plus the exact min/max), then searches thresholds
    ``t`` = histogram edge ``i`` for ``i`` in ``start_bin, start_bin + stride, ..., num_bins``;
    ties go to the largest ``t`` (pytorch-quantization's ``last_argmin``).

    Levels and range per target:

    * symmetric: ``2**(num_bits - 1)`` levels (128 at 8 bits, the magnitude of int8),
      range ``[-t, t]``;
    * asymmetric, non-negative tensor (``min >= 0``, e.g. after ReLU): ``2**num_bits`` levels
      (256 at 8 bits, pytorch-quantization's ``unsigned``), range ``[min, t]``; likewise mirrored
      for a non-positive tensor: ``[-t, max]``;
    * asymmetric, mixed signs: the symmetric search on ``|x|`` (``2**(num_bits - 1)`` levels), then
      the range ``[max(min, -t), min(max, t)]``. A true two-sided search over windows ``[lo, hi]``
      would be quadratic in the bins; this keeps the calibration one-dimensional.

    ``t`` never exceeds the observed ``max|x|``.

    Options: ``num_bins`` (2048), ``start_bin`` (0 = the number of levels), ``stride`` (1).
    """

    OPTIONS = {**HistogramCalibrator.OPTIONS, "start_bin": 0, "stride": 1}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["start_bin"] < 0:
            raise self._option_error("start_bin", "an integer >= 1, or 0 for the number of levels")
        if self.options["stride"] < 1:
            raise self._option_error("stride", "an integer >= 1")

    def _absolute(self) -> bool:
        return True

    def num_levels(self, one_sided: bool) -> int:
        """Quantization levels over ``[0, t]``: ``2**bits`` for one-sided asymmetric, else ``2**(bits-1)``."""
        return 1 << (self.num_bits if one_sided else self.num_bits - 1)

    def search(self, hist: np.ndarray, num_levels: int) -> tuple[int, float]:
        """Return ``(i, kl)``: the chosen bin count (threshold = edge ``i``) and its divergence."""
        nbins = len(hist)
        start = self.options["start_bin"] or num_levels
        candidates = np.arange(min(start, nbins), nbins + 1, self.options["stride"])
        chunk = max(1, (1 << 20) // (num_levels + 1))  # bounds the (candidates x levels) work arrays
        kl = np.concatenate(
            [
                kl_divergences(hist, num_levels, candidates[s : s + chunk])
                for s in range(0, len(candidates), chunk)
            ]
        )
        best = len(kl) - 1 - int(np.argmin(kl[::-1]))
        return int(candidates[best]), float(kl[best])

    def _range(self, name: str) -> TensorRange:
        _, vmin, vmax = self.collector.stats(name)
        one_sided = not self.symmetric and (vmin >= 0.0 or vmax <= 0.0)
        levels = self.num_levels(one_sided)
        counts, edges = self.collector.histogram(name)
        amax = max(-vmin, vmax)
        if len(counts) < 2:  # all mass in one bin: nothing to search
            i, kl = len(counts), 0.0
        else:
            i, kl = self.search(counts, levels)
        t = min(float(edges[i]), amax)
        meta = {"threshold": t, "kl": kl, "bin": i, "num_bins": len(counts), "num_levels": levels}
        if self.symmetric:
            return TensorRange(-t, t, meta)
        if one_sided:
            return TensorRange(min(vmin, t), t, meta) if vmin >= 0.0 else TensorRange(-t, max(vmax, -t), meta)
        return TensorRange(max(vmin, -t), min(vmax, t), meta)
