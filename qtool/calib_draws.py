"""Calibration-draw selection: calibrate on several windows of the normal pool, keep the one the anomaly map likes.

At 4 bits which normal images calibrate a model moves its test AUROC by more than the choice between good
calibrators does (bench/results/calibration_draw_spread_4bit.md). With ``ptq.calib_data.draws = K`` the pipeline
calibrates on K disjoint windows of the normal pool (:func:`qtool.calib_data.calibration_draws`; draw 0 is the
usual set), builds each draw's quantized graph (bias-corrected on that draw's own images when bias correction is
on) and keeps the draw whose graph distorts the anomaly map least on the search set (synthetic anomalies made from
normal pool images, never the test split; :class:`qtool.proxy.MapDistortion`, the map-aware objective). Ties keep
the earlier draw. The search stages (a calibrator's refine, mixed precision) then start from the chosen draw.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx

from calibrators import Calibrator
from qtool.bias_correction import BiasCorrector
from qtool.calib_data import CalibrationSet
from qtool.graph import QuantSpec
from qtool.search import Harness, SearchSet

log = logging.getLogger(__name__)


@dataclass
class Draw:
    """One calibration: its images, its calibrator, the ranges it gave, and the bias corrector reading the images."""

    calib: CalibrationSet
    calibrator: Calibrator
    ranges: dict[str, Any]
    corrector: BiasCorrector | None  # None when bias correction is off


def choose_draw(sets: list[CalibrationSet], calibrate: Callable[[CalibrationSet], Draw], model: onnx.ModelProto,
                spec: QuantSpec, search: SearchSet, threads: int) -> tuple[Draw, dict[str, Any]]:
    """Calibrate on each of ``sets`` and return the draw with the least map distortion, and the report entry.

    ``calibrate(set)`` runs a fresh calibrator on one set (and makes its corrector). The report gives each draw's
    distortion (``loss``, ``map_rel_rms``, ``order_flips``), first file and image count, and the chosen index.
    """
    harness = Harness(model, spec, search, threads)
    draws, rows = [], []
    for i, calib in enumerate(sets):
        draw = calibrate(calib)
        biases = draw.corrector(draw.ranges) if draw.corrector is not None else None
        score = harness.distortion(*harness.run(harness.build(draw.ranges, biases=biases)))
        draws.append(draw)
        rows.append({"draw": i, "images": calib.count, "first_file": (calib.description.get("files") or [None])[0],
                     **score})
        log.info("calibration draw %d of %d: map distortion %.4f", i + 1, len(sets), score["loss"])
    chosen = min(range(len(rows)), key=lambda i: (rows[i]["loss"], i))
    return draws[chosen], {"draws": rows, "chosen": chosen, "bias_corrected": draws[chosen].corrector is not None,
                           "criterion": "map distortion on the search set (MapDistortion loss; lower is better)"}
