"""How a weight's float range is chosen before it is quantized: the registered weight range rules.

A rule maps a weight array and its :class:`~qtool.graph.profiles.QuantParams` to its bounds, one pair
per channel (per-channel params) or one pair (per-tensor). ``minmax`` keeps every value representable
(onnxruntime's ``quantize_static``: the rule that makes 8-bit models agree with it to the last bit);
``mse`` clips each channel at the fraction of its min/max that minimises the squared rounding plus
clipping error of that channel, which matters below 8 bits where a few large weights would otherwise
spend most of the 15 or 63 levels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qtool.graph.profiles import QuantParams, scale_zero_point
from qtool.registry import Registry

#: (weight array, params) -> (lo, hi): arrays of one value per channel, or 0-d for per-tensor params.
WeightRangeRule = Callable[[np.ndarray, QuantParams], tuple[np.ndarray, np.ndarray]]
WEIGHT_RANGES: Registry[WeightRangeRule] = Registry("weight range rule")

#: Clip fractions the ``mse`` rule tries, widest first (ties keep the wider range: 1.0 is min/max).
MSE_FRACTIONS = np.round(np.linspace(1.0, 0.2, 81), 4)


def channel_rows(data: np.ndarray, axis: int | None) -> np.ndarray:
    """``data`` as one row per channel (``axis``), or a single row when ``axis`` is None."""
    data = np.asarray(data, dtype=np.float32)
    if axis is None:
        return data.reshape(1, -1)
    return np.moveaxis(data, axis, 0).reshape(data.shape[axis], -1)


def _shaped(lo: np.ndarray, hi: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    return (lo[0], hi[0]) if axis is None else (lo, hi)


@WEIGHT_RANGES.register("minmax")
def minmax_range(data: np.ndarray, params: QuantParams) -> tuple[np.ndarray, np.ndarray]:
    """Each channel's min and max: nothing is clipped."""
    rows = channel_rows(data, params.axis)
    if rows.shape[1] == 0:
        zero = np.zeros(rows.shape[0], np.float32)
        return _shaped(zero, zero, params.axis)
    return _shaped(rows.min(axis=1), rows.max(axis=1), params.axis)


@WEIGHT_RANGES.register("mse")
def mse_range(data: np.ndarray, params: QuantParams) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, min/max scaled by the fraction in :data:`MSE_FRACTIONS` with the least squared error.

    The error is that of quantize-dequantize with the params' own integer range, symmetry and zero
    point, so what is minimised is what the graph will compute. Deterministic; ties keep the wider range.
    """
    rows = channel_rows(data, params.axis).astype(np.float64)
    if rows.shape[1] == 0:
        return minmax_range(data, params)
    lo, hi = rows.min(axis=1), rows.max(axis=1)
    flat = params.with_axis(None)
    best_err = np.full(rows.shape[0], np.inf)
    best = np.ones(rows.shape[0])
    for frac in MSE_FRACTIONS:
        scale, zp = scale_zero_point(lo * frac, hi * frac, flat)
        s = scale.astype(np.float64)[:, None]
        z = zp.astype(np.float64)[:, None]
        q = np.clip(np.round(rows / s) + z, params.qmin, params.qmax)
        err = ((q - z) * s - rows) ** 2
        err = err.sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, frac, best)
    return _shaped((lo * best).astype(np.float32), (hi * best).astype(np.float32), params.axis)


def weight_bounds(rule: str, data: np.ndarray, params: QuantParams) -> tuple[np.ndarray, np.ndarray]:
    """The bounds of ``data`` under the registered ``rule`` (a RegistryError names the known rules)."""
    return WEIGHT_RANGES.get(rule)(data, params)


def clip_fractions(lo: np.ndarray, hi: np.ndarray, data: np.ndarray, params: QuantParams) -> np.ndarray:
    """Per channel, the span of ``[lo, hi]`` over the span of the channel's min/max (1 where that is empty).

    QAT keeps each weight's fraction fixed while the weights train, so a clipped rule (``mse``) stays
    the same fraction of the moving min/max instead of being searched again at every step.
    """
    mlo, mhi = minmax_range(data, params)
    span = np.atleast_1d(mhi).astype(np.float64) - np.atleast_1d(mlo).astype(np.float64)
    given = np.atleast_1d(hi).astype(np.float64) - np.atleast_1d(lo).astype(np.float64)
    return np.where(span > 0, given / np.where(span > 0, span, 1.0), 1.0)
