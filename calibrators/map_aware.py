"""Map-aware calibrator: per tensor, the histogram candidate range that best preserves the anomaly map.

Candidates come from the standard rules over one shared histogram (min/max, KL, MSE, percentiles);
``refine`` picks among them greedily in graph order by running the quantized graph on normal
calibration images and synthetic anomalies, judged by :class:`qtool.proxy.MapDistortion`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from calibrators.base import Calibrator, TensorRange, finite_values
from calibrators.context import SearchContext
from calibrators.entropy import EntropyCalibrator
from calibrators.histogram import HistogramCalibrator, HistogramCollector
from calibrators.mse import MseCalibrator
from calibrators.percentile import PercentileCalibrator
from qtool.errors import CalibrationError
from qtool.proxy import MapDistortion

log = logging.getLogger(__name__)



class MapAwareCalibrator(Calibrator):
    """Choose each tensor's clipping range by what it does to the final anomaly map and image scores.

    ``compute`` returns the ``initial`` rule's ranges (TensorRT-style entropy by default) and keeps
    every rule's candidate per tensor (rules whose bounds agree within half a quantization step are one
    candidate). ``refine`` then walks the tensors in graph order; for each it
    builds the QDQ graph that quantizes the nodes touching the tensors decided so far plus this one
    (earlier choices kept, later tensors still float where no decided tensor needs them), runs it on
    the search set and keeps the candidate of lowest map distortion (fp32 map error over the upper
    tail and the synthetic defect regions, plus flipped normal/anomaly score pairs). Ties keep the
    earlier candidate, ``initial`` first, so the search is deterministic. When ``time_budget_s`` runs
    out, the current tensor keeps its best candidate so far and the rest keep ``initial``.

    Options: ``num_bins`` (2048), ``percentiles`` ([99.9, 99.99, 99.999]), ``initial`` ("entropy";
    or "minmax", "mse", "percentile-P"), ``time_budget_s`` (300), ``tail_quantile`` (0.99: fp32 map
    values above this quantile on normals count as tail), ``rank_weight`` (1.0: weight of flipped pairs).
    """

    OPTIONS = {"num_bins": 2048, "percentiles": [99.9, 99.99, 99.999], "initial": "entropy",
               "time_budget_s": 300.0, "tail_quantile": 0.99, "rank_weight": 1.0}
    needs_graph = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        ps = o["percentiles"]
        if not isinstance(ps, (list, tuple)) or not all(
                isinstance(p, (int, float)) and not isinstance(p, bool) and 50.0 <= p <= 100.0 for p in ps):
            raise self._option_error("percentiles", "a list of numbers in [50, 100]")
        if o["num_bins"] < 8:
            raise self._option_error("num_bins", "an integer >= 8")
        if o["time_budget_s"] < 0:
            raise self._option_error("time_budget_s", "a number of seconds >= 0")
        if not 0.0 < o["tail_quantile"] < 1.0:
            raise self._option_error("tail_quantile", "a number in (0, 1)")
        if o["rank_weight"] < 0:
            raise self._option_error("rank_weight", "a number >= 0")
        common = {"symmetric": self.symmetric, "num_bits": self.num_bits, "num_bins": o["num_bins"]}
        rules: dict[str, HistogramCalibrator] = {"entropy": EntropyCalibrator(**common), "mse": MseCalibrator(**common)}
        rules.update({f"percentile-{float(p):g}": PercentileCalibrator(percentile=float(p), **common) for p in ps})
        self.collectors = {True: HistogramCollector(o["num_bins"], absolute=True)}
        if not self.symmetric:
            self.collectors[False] = HistogramCollector(o["num_bins"], absolute=False)
        for rule in rules.values():
            rule.share_collector(self.collectors[rule.collector.absolute])
        self.rules = rules
        labels = ["minmax", *rules]
        if o["initial"] not in labels:
            raise self._option_error("initial", "one of " + ", ".join(labels))
        self.candidates: dict[str, list[tuple[list[str], TensorRange]]] = {}

    def observe(self, name: str, array: np.ndarray) -> None:
        """Add one batch of ``name`` to the shared histograms (see :meth:`Calibrator.observe`)."""
        checked = finite_values(name, array)
        if checked is not None:
            for collector in self.collectors.values():
                collector.add(name, *checked)

    def _minmax(self, name: str) -> TensorRange:
        _, lo, hi = self.collectors[True].stats(name)
        if self.symmetric:
            m = max(-lo, hi)
            return TensorRange(-m, m)
        return TensorRange(lo, hi)

    def compute(self) -> dict[str, TensorRange]:
        """Every rule's range per tensor as candidates; returns the ``initial`` rule's (see :meth:`refine`)."""
        names = self.collectors[True].names()
        if not names:
            raise CalibrationError("no calibration data observed")
        by_rule = {"minmax": {n: self._minmax(n) for n in names}, **{k: r.compute() for k, r in self.rules.items()}}
        initial = self.options["initial"]
        order = [initial, *(k for k in by_rule if k != initial)]
        out: dict[str, TensorRange] = {}
        for name in names:
            cands: list[tuple[list[str], TensorRange]] = []
            for label in order:
                r = by_rule[label][name]
                same = next((c for c in cands if self._same(c[1], r)), None)
                if same is None:
                    cands.append(([label], TensorRange(r.lo, r.hi)))
                else:
                    same[0].append(label)
            self.candidates[name] = cands
            out[name] = self._with_meta(name, 0, [], "not searched")
        return out

    def _same(self, a: TensorRange, b: TensorRange) -> bool:
        """Both bounds within half a quantization step: the two ranges quantize (nearly) alike; one candidate."""
        half_step = 0.5 * (max(a.hi, b.hi) - min(a.lo, b.lo)) / ((1 << self.num_bits) - 1)
        return abs(a.lo - b.lo) <= half_step and abs(a.hi - b.hi) <= half_step

    def _with_meta(self, name: str, chosen: int, losses: list[dict[str, float]], status: str) -> TensorRange:
        cands = self.candidates[name]
        listed = [{"rules": labels, "lo": r.lo, "hi": r.hi, **(losses[i] if i < len(losses) else {})}
                  for i, (labels, r) in enumerate(cands)]
        meta = {"chosen": cands[chosen][0], "initial": self.options["initial"], "search": status, "candidates": listed}
        return TensorRange(cands[chosen][1].lo, cands[chosen][1].hi, meta)

    def refine(self, ranges: dict[str, TensorRange], context: SearchContext) -> dict[str, TensorRange]:
        """Greedy search in graph order for the candidate range that best preserves the map (see the class)."""
        loss = MapDistortion(*context.reference, context.masks, context.labels,
                             self.options["tail_quantile"], self.options["rank_weight"])
        t0 = time.monotonic()
        deadline = t0 + self.options["time_budget_s"]
        current = dict(ranges)
        out = dict(ranges)
        decided: list[str] = []
        evaluations = changed = 0
        for name in [t for t in context.tensors if t in self.candidates]:
            decided.append(name)
            cands = self.candidates[name]
            if len(cands) < 2 or time.monotonic() > deadline:
                status = "single candidate" if len(cands) < 2 else "time budget spent: initial kept"
                out[name] = self._with_meta(name, 0, [], status)
                current[name] = out[name]
            else:
                losses: list[dict[str, float]] = []
                for _, r in cands:
                    if losses and time.monotonic() > deadline:
                        break
                    maps, scores = context.run(context.build({**current, name: r}, decided))
                    losses.append(loss(maps, scores))
                evaluations += len(losses)
                best = min(range(len(losses)), key=lambda i: losses[i]["loss"])
                status = "searched" if len(losses) == len(cands) else "time budget spent: best so far"
                out[name] = current[name] = self._with_meta(name, best, losses, status)
                changed += best != 0
            if context.progress:
                context.progress(1)
        log.info("map-aware search: %d tensors, %d candidate graphs run, %d ranges changed from %s, %.1f s",
                 len(decided), evaluations, changed, self.options["initial"], time.monotonic() - t0)
        return out
