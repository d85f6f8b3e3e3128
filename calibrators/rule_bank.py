"""The standard clipping rules (min/max, entropy, MSE, percentiles) computed over one shared set of histograms.

Map-aware calibration keeps every rule's range per tensor as a candidate; one bank per data source.
"""

from __future__ import annotations

from calibrators.base import TensorRange
from calibrators.entropy import EntropyCalibrator
from calibrators.histogram import HistogramCalibrator, HistogramCollector
from calibrators.mse import MseCalibrator
from calibrators.percentile import PercentileCalibrator

#: Suffix of the rules computed on the calibration source plus the search images (``mse+search``).
SEARCH_SUFFIX = "+search"


class RuleBank:
    """The standard rules (min/max, entropy, MSE, percentiles) over one shared set of histograms."""

    def __init__(self, symmetric: bool, num_bits: int, num_bins: int, percentiles: list[float]) -> None:
        common = {"symmetric": symmetric, "num_bits": num_bits, "num_bins": num_bins}
        self.symmetric = symmetric
        self.rules: dict[str, HistogramCalibrator] = {"entropy": EntropyCalibrator(**common),
                                                      "mse": MseCalibrator(**common)}
        self.rules.update({f"percentile-{float(p):g}": PercentileCalibrator(percentile=float(p), **common)
                           for p in percentiles})
        self.collectors = {True: HistogramCollector(num_bins, absolute=True)}
        if not symmetric:
            self.collectors[False] = HistogramCollector(num_bins, absolute=False)
        for rule in self.rules.values():
            rule.share_collector(self.collectors[rule.collector.absolute])

    @property
    def labels(self) -> list[str]:
        """The rule names, min/max first."""
        return ["minmax", *self.rules]

    def add(self, name: str, values: tuple) -> None:
        """Add checked values (see :func:`calibrators.base.finite_values`) of ``name`` to every histogram."""
        for collector in self.collectors.values():
            collector.add(name, *values)

    def names(self) -> list[str]:
        """The tensors observed."""
        return self.collectors[True].names()

    def ranges(self) -> dict[str, dict[str, TensorRange]]:
        """Per rule label, every observed tensor's range."""
        def minmax(name: str) -> TensorRange:
            _, lo, hi = self.collectors[True].stats(name)
            m = max(-lo, hi)
            return TensorRange(-m, m) if self.symmetric else TensorRange(lo, hi)

        return {"minmax": {n: minmax(n) for n in self.names()}, **{k: r.compute() for k, r in self.rules.items()}}
