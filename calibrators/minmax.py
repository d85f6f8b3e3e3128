"""Min/max calibrator: the exact observed range, optionally a moving average over batches (as ORT's)."""

from __future__ import annotations

from typing import Any

import numpy as np

from calibrators.base import Calibrator, TensorRange, finite_values
from qtool.errors import CalibrationError


class MinMaxCalibrator(Calibrator):
    """Range = running ``[min, max]``; symmetric targets get ``[-m, m]`` with ``m = max(|min|, |max|)``.

    Options:
        moving_average (False): instead of the global extremes, keep an exponential moving average
            of each batch's min and max (symmetric: of each batch's ``max|x|``), as onnxruntime's
            ``MinMaxCalibrater``: ``r <- r + averaging_constant * (batch - r)``, first batch as is.
        averaging_constant (0.01): the averaging weight, in ``(0, 1]``.

    Memory: two floats per tensor.
    """

    OPTIONS = {"moving_average": False, "averaging_constant": 0.01}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if not 0.0 < self.options["averaging_constant"] <= 1.0:
            raise self._option_error("averaging_constant", "a number in (0, 1]")
        self._ranges: dict[str, list[float]] = {}

    def observe(self, name: str, array: np.ndarray) -> None:
        """Update the running range of ``name`` with one batch (see :meth:`Calibrator.observe`)."""
        checked = finite_values(name, array)
        if checked is None:
            return
        _, lo, hi = checked
        if self.symmetric:
            hi = max(-lo, hi)
            lo = -hi
        current = self._ranges.get(name)
        if current is None:
            self._ranges[name] = [lo, hi]
        elif self.options["moving_average"]:
            c = self.options["averaging_constant"]
            current[0] += c * (lo - current[0])
            current[1] += c * (hi - current[1])
        else:
            current[0], current[1] = min(current[0], lo), max(current[1], hi)

    def compute(self) -> dict[str, TensorRange]:
        """Return the range of every observed tensor (see :meth:`Calibrator.compute`)."""
        if not self._ranges:
            raise CalibrationError("no calibration data observed")
        return {name: TensorRange(lo, hi) for name, (lo, hi) in self._ranges.items()}
