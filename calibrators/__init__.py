"""Calibrator plugins: streamed activations -> per-tensor ranges (entry-point group ``qtool.calibrators``).

A third-party calibrator is a :class:`Calibrator` subclass plus an entry point in that group; one
that searches on the quantized graph sets ``needs_graph`` and implements ``refine(ranges, context)``.
"""

from __future__ import annotations

from typing import Any

from calibrators.base import Calibrator, TensorRange, WeightRange
from calibrators.context import SearchContext
from calibrators.entropy import EntropyCalibrator
from calibrators.histogram import HistogramCalibrator, HistogramCollector
from calibrators.map_aware import MapAwareCalibrator
from calibrators.minmax import MinMaxCalibrator
from calibrators.mse import MseCalibrator
from calibrators.percentile import PercentileCalibrator
from qtool.registry import Registry

__all__ = [
    "CALIBRATORS",
    "Calibrator",
    "EntropyCalibrator",
    "HistogramCalibrator",
    "HistogramCollector",
    "MapAwareCalibrator",
    "MinMaxCalibrator",
    "MseCalibrator",
    "PercentileCalibrator",
    "SearchContext",
    "TensorRange",
    "WeightRange",
    "get_calibrator",
]

CALIBRATORS: Registry[type[Calibrator]] = Registry("calibrator", entry_point_group="qtool.calibrators")
# Registered here too so the built-ins work without installed package metadata.
CALIBRATORS.add("minmax", MinMaxCalibrator)
CALIBRATORS.add("percentile", PercentileCalibrator)
CALIBRATORS.add("entropy", EntropyCalibrator)
CALIBRATORS.add("mse", MseCalibrator)
CALIBRATORS.add("map-aware", MapAwareCalibrator)


def get_calibrator(name: str, **options: Any) -> Calibrator:
    """Build the calibrator registered as ``name`` with ``options`` (recipe ``ptq.calib_options``).

    Raises:
        RegistryError: unknown name (the message lists the available ones).
        CalibrationError: unknown or invalid option.
    """
    return CALIBRATORS.get(name)(**options)
