"""The calibrator protocol: stream activations in with ``observe``, get per-tensor ranges from ``compute``.

A search calibrator (``needs_graph``) may then ``refine`` them by running candidate quantized graphs
that the driver builds. Calibrators never edit graphs; the policy decides what is quantized.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from qtool.errors import CalibrationError

if TYPE_CHECKING:
    from calibrators.context import SearchContext

#: Bit widths a calibrator accepts; the recipe narrows this to 4, 6 and 8.
MIN_BITS, MAX_BITS = 2, 16


@dataclass(frozen=True)
class TensorRange:
    """A float range to quantize one tensor into; ``lo <= 0 <= hi`` is not required.

    ``meta`` carries calibrator details for the report (threshold, percentile, KL value...);
    it takes no part in equality.
    """

    lo: float
    hi: float
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        lo, hi = float(self.lo), float(self.hi)
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise CalibrationError(f"invalid range [{lo}, {hi}]: bounds must be finite with lo <= hi")
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)

    def to_dict(self) -> dict[str, Any]:
        """Return ``{"lo", "hi", **meta}`` for JSON reports."""
        return {"lo": self.lo, "hi": self.hi, **self.meta}


@dataclass(frozen=True, eq=False)
class WeightRange:
    """Float bounds of one weight, one pair per channel (0-d arrays for a per-tensor weight).

    A calibrator may return one under a weight initializer's name: ``insert_qdq`` then quantizes that
    weight with these bounds instead of the spec's weight range rule (``qtool.graph.weight_ranges``).
    ``meta`` as in :class:`TensorRange`.
    """

    lo: np.ndarray
    hi: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A summary for JSON reports: channels and the widest bounds (not every channel's), plus ``meta``."""
        return {"channels": int(np.size(self.hi)), "lo_min": float(np.min(self.lo)), "hi_max": float(np.max(self.hi)),
                **self.meta}


def _coerce(cls_name: str, key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of the option's default (bool, int, float); return it."""
    bad = CalibrationError(
        f"option {key}={value!r} of calibrator {cls_name}: expected {type(default).__name__}"
    )
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise bad
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    return value


class Calibrator(abc.ABC):
    """Base of every calibrator: option checking plus the ``observe``/``compute`` protocol.

    A plugin declares its options and their defaults in ``OPTIONS`` and implements ``observe``
    and ``compute``; it reads its option values from ``self.options``. A plugin that searches by
    running the quantized graph also sets ``needs_graph`` and implements :meth:`refine`.

    Args:
        symmetric: produce ranges with ``lo == -hi`` (TensorRT: zero point 0, ``|x| <= t``).
        num_bits: bit width of the target integer type (8; 6 and 4 supported); searches use it.
        **options: the calibrator's own options (recipe ``ptq.calib_options``).

    Raises:
        CalibrationError: an unknown option (the message lists the allowed ones) or a bad value.
    """

    OPTIONS: ClassVar[Mapping[str, Any]] = {}
    #: True for a calibrator that searches by running candidate quantized graphs: the driver then
    #: also streams the search images through ``observe`` (after :meth:`begin_search_images`) and calls
    #: :meth:`refine` after ``compute``.
    needs_graph: ClassVar[bool] = False
    #: What the last :meth:`refine` did, for the run report (``search`` in ``report.json``); None if nothing.
    search_summary: dict[str, Any] | None = None

    def __init__(self, *, symmetric: bool = False, num_bits: int = 8, **options: Any) -> None:
        name = type(self).__name__
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            allowed = ", ".join(["symmetric", "num_bits", *sorted(self.OPTIONS)])
            raise CalibrationError(f"unknown option {unknown[0]!r} for calibrator {name}; allowed: {allowed}")
        self.symmetric: bool = _coerce(name, "symmetric", symmetric, False)
        self.num_bits: int = _coerce(name, "num_bits", num_bits, 8)
        if not MIN_BITS <= self.num_bits <= MAX_BITS:
            raise CalibrationError(
                f"option num_bits={num_bits!r} of calibrator {name}: expected {MIN_BITS}..{MAX_BITS}"
            )
        self.options: dict[str, Any] = {
            key: _coerce(name, key, options.get(key, default), default)
            for key, default in self.OPTIONS.items()
        }

    @abc.abstractmethod
    def observe(self, name: str, array: np.ndarray) -> None:
        """Add one batch of values of tensor ``name``; called any number of times, bounded memory.

        Raises:
            CalibrationError: the array holds NaN or Inf (the message names the tensor).
        """

    @abc.abstractmethod
    def compute(self) -> dict[str, TensorRange]:
        """Return the range of every observed tensor; called once after the last ``observe``.

        Raises:
            CalibrationError: nothing was observed.
        """

    def begin_search_images(self) -> None:
        """Called once when ``needs_graph``, before the driver streams the search images through ``observe``.

        The batches before were the calibration source; those after are the search set's normals and
        synthetic anomalies. The default does nothing (every batch is alike to it).
        """
        return None

    def refine(self, ranges: dict[str, TensorRange], context: SearchContext) -> dict[str, TensorRange]:
        """Improve ``compute``'s ranges by running quantized graphs; called only when ``needs_graph``.

        Args:
            ranges: what :meth:`compute` returned.
            context: the graph, a builder and runner of candidate QDQ models, the search images with
                their synthetic anomalies and masks, fp32 reference outputs, a progress callback.

        Returns:
            A range for every tensor of ``ranges`` (the default returns ``ranges`` unchanged).
        """
        return ranges

    def _option_error(self, key: str, expected: str) -> CalibrationError:
        """Return the error for an option whose value is outside its allowed set."""
        return CalibrationError(
            f"option {key}={self.options[key]!r} of calibrator {type(self).__name__}: expected {expected}"
        )


def finite_values(name: str, array: Any) -> tuple[np.ndarray, float, float] | None:
    """Flatten one observed batch and check it.

    Args:
        name: tensor name, used in error messages.
        array: any array-like of real numbers.

    Returns:
        ``(values, min, max)`` with ``values`` a 1-D float32/float64 array (no copy when possible),
        or ``None`` for an empty array (nothing to observe).

    Raises:
        CalibrationError: non-numeric data, or NaN/Inf values (naming the tensor).
    """
    try:
        a = np.asarray(array)
        if a.dtype.kind not in "fiub":
            raise TypeError(f"dtype {a.dtype}")
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float32 if a.dtype == np.float16 else np.float64)
    except (TypeError, ValueError) as e:
        raise CalibrationError(f"tensor {name!r}: cannot read calibration values ({e})") from e
    a = a.reshape(-1)
    if a.size == 0:
        return None
    # min/max propagate NaN and expose +-Inf, so they check finiteness without a mask array.
    lo, hi = float(a.min()), float(a.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise CalibrationError(f"tensor {name!r} contains {bad} NaN/Inf value(s)")
    return a, lo, hi
