"""What the calibration driver hands a search calibrator's ``refine``: graph, candidate builder, search set.

The calibrator never edits graphs or picks a runtime: ``build`` lowers ranges to a QDQ model (the
driver's insert_qdq on its spec) and ``run`` executes one on the search images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibrators.base import TensorRange

#: (ranges, tensors or None[, biases]) -> QDQ ModelProto; see :attr:`SearchContext.build`.
BuildFn = Callable[..., Any]
#: ranges -> corrected biases (opaque to the calibrator, handed back to ``build``); see :attr:`SearchContext.correct`.
CorrectFn = Callable[[Mapping[str, TensorRange]], Any]
#: QDQ or float ModelProto -> (anomaly maps (N, H, W), image scores (N,)) on the search images.
RunFn = Callable[[Any], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class SearchContext:
    """The search set and the means to try ranges on the real graph.

    Attributes:
        tensors: the tensors whose ranges the search may choose, in graph (topological) order: those
            calibrated at the activation width (a tensor quantized at another width keeps its range).
        build: ``build(ranges, tensors)`` -> a QDQ model quantizing only the nodes whose Q/DQ read
            or write at least one of ``tensors`` (every quantized node when ``tensors`` is None),
            taking each needed tensor's range from ``ranges``; a search quantizes progressively.
            ``build(ranges, tensors, biases)`` uses biases that ``correct`` returned on the nodes it quantizes.
        run: executes a model on :attr:`images`.
        images: (N, 3, S, S) normal calibration images, then synthetic anomalies made from them.
        masks: (N, S, S) synthetic defect masks (all zero for the normals).
        labels: (N,) 0 normal, 1 synthetic anomaly.
        reference: fp32 ``(maps, scores)`` on :attr:`images`, computed once.
        model: the prepared fp32 graph; spec: its QuantSpec (for calibrators that need more).
        progress: called with 1 per finished search step (a tensor), or None.
        correct: ``correct(ranges)`` -> the biases that make the fully quantized graph with ``ranges`` keep
            fp32's per-channel means on the calibration images (``qtool.bias_correction``, as the pipeline
            corrects the graph it saves), for ``build``; None when the pipeline does not correct biases.
        check: the same means on a check set disjoint from the search images (further normal calibration
            images and synthetic anomalies made from them, ``ptq.search.check_normals``), to judge a search's
            result on images it was not chosen on; None when none is configured.
    """

    tensors: list[str]
    build: BuildFn
    run: RunFn
    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    reference: tuple[np.ndarray, np.ndarray]
    model: Any = None
    spec: Any = None
    progress: Callable[[int], None] | None = None
    correct: CorrectFn | None = None
    check: SearchContext | None = None
