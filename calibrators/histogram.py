"""Streaming per-tensor histograms with a fixed number of bins, shared by the histogram calibrators.

When a batch falls outside the current range, the range grows by an integer factor ``k`` of the bin
width, aligned on the old bin edges, so every ``k`` old bins merge exactly into one new bin.
"""

from __future__ import annotations

import abc
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibrators.base import Calibrator, TensorRange, finite_values
from qtool.errors import CalibrationError

log = logging.getLogger(__name__)

#: Relative margin kept between the data extremes and the histogram edges.
_EDGE_MARGIN = 2.0**-26


@dataclass
class _TensorHistogram:
    """State of one tensor: exact count/min/max plus a histogram over ``[lo, hi]`` (or a pending value)."""

    count: int
    min: float
    max: float
    lo: float = 0.0
    hi: float = 0.0
    counts: np.ndarray | None = None  # None while every value seen so far is the same (degenerate)


class HistogramCollector:
    """Bounded-memory streaming histograms, one per tensor name.

    Args:
        num_bins: bins per tensor; the memory per tensor is ``num_bins`` int64 counts.
        absolute: histogram ``|x|`` over ``[0, max|x|]`` (TensorRT, symmetric targets) instead of
            ``x`` over ``[min, max]`` (asymmetric targets).

    The collected range covers the data with a relative margin of 2**-26 and may be up to about
    twice as wide after growth; :meth:`histogram` trims the empty bins at the ends (exact min/max
    are tracked apart). Counts are exact integers equal to ``np.histogram`` of all the data over
    the final edges (only a value within float rounding of an interior edge could move one bin).
    """

    def __init__(self, num_bins: int = 2048, absolute: bool = False) -> None:
        if num_bins < 2:
            raise CalibrationError(f"num_bins={num_bins} too small; expected >= 2")
        self.num_bins = num_bins
        self.absolute = absolute
        self._tensors: dict[str, _TensorHistogram] = {}

    def add(
        self, name: str, values: np.ndarray, vmin: float | None = None, vmax: float | None = None
    ) -> None:
        """Add finite 1-D ``values`` of tensor ``name`` (``vmin``/``vmax``: their min/max, if known)."""
        if values.size == 0:
            return
        vmin = float(values.min()) if vmin is None else vmin
        vmax = float(values.max()) if vmax is None else vmax
        st = self._tensors.get(name)
        if st is None:
            st = self._tensors[name] = _TensorHistogram(count=0, min=vmin, max=vmax)
        earlier, previous = st.count, st.min  # previous: the single value while degenerate
        st.count += values.size
        st.min, st.max = min(st.min, vmin), max(st.max, vmax)
        if self.absolute:
            values = np.abs(values)
            dmin, dmax, previous = 0.0, max(-vmin, vmax), 0.0
        else:
            dmin, dmax = vmin, vmax
        if st.counts is None:
            lo, hi = (0.0, max(-st.min, st.max)) if self.absolute else (st.min, st.max)
            if lo == hi:  # every value so far is the same: nothing to bin yet
                return
            # Keep the data a hair inside the range: its extremes then never sit on an edge that a
            # later re-binning turns interior, where edge rounding could move them to the next bin.
            pad = (hi - lo) * _EDGE_MARGIN
            lo, hi = (lo if self.absolute else lo - pad), hi + pad
            st.lo, st.hi = lo, hi
            st.counts = self._bin(values, lo, hi)
            if earlier:  # the earlier values all equal ``previous``, which lies in [lo, hi]
                st.counts += earlier * self._bin(np.array([previous]), lo, hi)
            return
        if dmin < st.lo or dmax >= st.hi:
            self._grow(st, dmin, dmax)
        st.counts += self._bin(values, st.lo, st.hi)

    def _bin(self, values: np.ndarray, lo: float, hi: float) -> np.ndarray:
        # float64 range bounds make numpy bin float32 data in float64 (a Python float would not).
        counts, _ = np.histogram(values, bins=self.num_bins, range=(np.float64(lo), np.float64(hi)))
        return counts.astype(np.int64, copy=False)

    def _grow(self, st: _TensorHistogram, dmin: float, dmax: float) -> None:
        """Widen ``[st.lo, st.hi]`` to cover ``[dmin, dmax]`` by merging every ``k`` old bins into one."""
        b = self.num_bins
        w = (st.hi - st.lo) / b
        pad = (max(dmax, st.hi) - min(dmin, st.lo)) * _EDGE_MARGIN
        if dmin < st.lo:
            dmin -= pad
        if dmax >= st.hi:
            dmax += pad
        below = max(1, math.ceil((st.lo - dmin) / w)) if dmin < st.lo else 0
        above = max(b + 1, math.floor((dmax - st.lo) / w) + 1) if dmax >= st.hi else b
        k = -(-(below + above) // b)
        slack = k * b - below - above
        if below == 0:
            m = 0  # only the top grew: keep the old lower edge
        elif above == b:
            m = below + slack  # only the bottom grew: keep the old upper edge
        else:
            m = below + slack // 2
        new_lo = min(st.lo - m * w, dmin)
        new_hi = st.lo + (k * b - m) * w
        if new_hi <= dmax:  # rounding: keep the top edge strictly above the data
            new_hi = float(np.nextafter(dmax, np.inf))
        idx = np.fromiter(((i + m) // k for i in range(b)), dtype=np.int64, count=b)
        merged = np.zeros(b, dtype=np.int64)
        np.add.at(merged, idx, st.counts)
        log.debug("histogram range [%g, %g] -> [%g, %g] (k=%d)", st.lo, st.hi, new_lo, new_hi, k)
        st.lo, st.hi, st.counts = new_lo, new_hi, merged

    # ---- read access -------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Names of the observed tensors, in first-seen order."""
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def _get(self, name: str) -> _TensorHistogram:
        try:
            return self._tensors[name]
        except KeyError:
            raise CalibrationError(f"tensor {name!r} was never observed") from None

    def stats(self, name: str) -> tuple[int, float, float]:
        """Return ``(count, min, max)`` of the raw values of ``name`` (exact, not from the histogram)."""
        st = self._get(name)
        return st.count, st.min, st.max

    def is_degenerate(self, name: str) -> bool:
        """True while no histogram exists: all values equal (absolute mode: all zero)."""
        return self._get(name).counts is None

    def state_arrays(self, name: str) -> list[np.ndarray]:
        """The arrays held for ``name`` (their total size is the memory per tensor)."""
        counts = self._get(name).counts
        return [] if counts is None else [counts]

    def histogram(self, name: str, trim: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(counts, edges)`` of ``name``: int64 counts and ``len(counts) + 1`` float64 edges.

        With ``trim`` the empty bins past the data are dropped (absolute mode keeps the edge at 0).

        Raises:
            CalibrationError: the tensor is degenerate (all values equal) or was never observed.
        """
        st = self._get(name)
        if st.counts is None:
            raise CalibrationError(f"tensor {name!r} has a single value {st.min}: no histogram")
        edges = np.linspace(st.lo, st.hi, self.num_bins + 1)
        counts = st.counts.copy()
        if trim:
            nz = np.flatnonzero(counts)
            first = 0 if self.absolute else int(nz[0])
            last = int(nz[-1]) + 1
            counts, edges = counts[first:last], edges[first : last + 1]
        return counts, edges


class HistogramCalibrator(Calibrator):
    """Base of the calibrators that pick a range from a :class:`HistogramCollector`.

    Subclasses implement :meth:`_range` for one non-degenerate tensor and may override
    :meth:`_absolute` (which histogram they need). Option ``num_bins`` (2048).
    """

    OPTIONS: dict[str, Any] = {"num_bins": 2048}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["num_bins"] < 8:
            raise self._option_error("num_bins", "an integer >= 8")
        self.collector = HistogramCollector(self.options["num_bins"], absolute=self._absolute())

    def _absolute(self) -> bool:
        """Whether to histogram ``|x|`` (default: for symmetric targets)."""
        return self.symmetric

    def share_collector(self, collector: HistogramCollector) -> None:
        """Read ranges from ``collector``, filled by the caller, instead of an own one (one histogram, many rules).

        Raises:
            CalibrationError: ``collector`` histograms the other quantity (``x`` vs ``|x|``) or has other bins.
        """
        if collector.absolute != self._absolute() or collector.num_bins != self.collector.num_bins:
            raise CalibrationError(
                f"{type(self).__name__} needs a collector with absolute={self._absolute()} and "
                f"num_bins={self.collector.num_bins}; got absolute={collector.absolute}, num_bins={collector.num_bins}"
            )
        self.collector = collector

    def observe(self, name: str, array: np.ndarray) -> None:
        """Add one batch of ``name`` to its histogram (see :meth:`Calibrator.observe`)."""
        checked = finite_values(name, array)
        if checked is not None:
            self.collector.add(name, *checked)

    def compute(self) -> dict[str, TensorRange]:
        """Return a range per observed tensor (see :meth:`Calibrator.compute`)."""
        names = self.collector.names()
        if not names:
            raise CalibrationError("no calibration data observed")
        out: dict[str, TensorRange] = {}
        for name in names:
            _, vmin, vmax = self.collector.stats(name)
            if self.collector.is_degenerate(name):
                out[name] = self._exact(vmin, vmax)
            else:
                out[name] = self._range(name)
            log.debug("%s: %s [%g, %g]", type(self).__name__, name, out[name].lo, out[name].hi)
        return out

    def _exact(self, vmin: float, vmax: float, **meta: Any) -> TensorRange:
        """The full observed range, made symmetric when the target is."""
        if self.symmetric:
            m = max(-vmin, vmax)
            return TensorRange(-m, m, meta)
        return TensorRange(vmin, vmax, meta)

    @abc.abstractmethod
    def _range(self, name: str) -> TensorRange:
        """Pick the range of one tensor whose histogram exists."""
