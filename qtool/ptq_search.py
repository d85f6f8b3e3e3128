"""The search stages of ``qtool ptq``: search set, a calibrator's ``refine``, mixed precision; then the proxy.

They run only when asked for: by a calibrator that ``needs_graph``, by ``ptq.mixed_precision``, or
by ``ptq.search.proxy``. The driver never branches on a calibrator's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import onnx

from calibrators import Calibrator, TensorRange
from qtool.bias_correction import BiasCorrector
from qtool.data import ImageTransform, Splits
from qtool.graph import QuantSpec, build_spec, layer_groups, node_tensors
from qtool.mixed_precision import choose_precision
from qtool.proxy import separation_drop
from qtool.recipe import PtqConfig
from qtool.search import Harness, SearchSet, build_check_set, build_search_set

Progress = Callable[[int], None] | None
Stage = Callable[[str], AbstractContextManager]


def search_set_for(calibrator: Calibrator, cfg: PtqConfig, splits: Splits, transform: ImageTransform
                   ) -> SearchSet | None:
    """The search set when a stage needs one, else None.

    Needed by a graph-searching calibrator, mixed precision, the proxy and calibration draws.
    """
    if calibrator.needs_graph or cfg.mixed_precision is not None or cfg.search.proxy or cfg.calib_data.draws > 1:
        return build_search_set(splits, transform, cfg.search)
    return None


def check_set_for(calibrator: Calibrator, cfg: PtqConfig, splits: Splits, transform: ImageTransform
                  ) -> SearchSet | None:
    """The check set (``ptq.search.check_normals`` > 0) when the calibrator searches on the graph, else None."""
    if calibrator.needs_graph and cfg.search.check_normals > 0:
        return build_check_set(splits, transform, cfg.search)
    return None


def search_batches_for(search: SearchSet | None, calibrator: Calibrator, batch_size: int
                       ) -> Iterator[np.ndarray] | None:
    """The search images a calibrator that is judged on them also observes (after the calibration set), else None.

    :func:`qtool.calibrate.calibrate` observes them after every calibration batch, announced by the
    calibrator's ``begin_search_images``.
    """
    if search is None or not calibrator.needs_graph:
        return None
    return search.batches(batch_size)


def run_search_stages(calibrator: Calibrator, ranges: dict[str, TensorRange], prepared: onnx.ModelProto,
                      spec: QuantSpec, search: SearchSet, cfg: PtqConfig, threads: int, stage: Stage,
                      progress: Progress = None, corrector: BiasCorrector | None = None,
                      check: SearchSet | None = None
                      ) -> tuple[dict[str, TensorRange], QuantSpec, dict[str, Any], Harness]:
    """Refine the ranges (if the calibrator searches) and choose precisions (if asked).

    Args:
        stage: the pipeline's timer (``stage(name)`` times a block).
        progress: called with 1 per search step (tensor searched, layer scanned).
        corrector: when the pipeline corrects biases, its corrector (:class:`qtool.bias_correction.BiasCorrector`):
            a search calibrator may then judge candidates with corrected biases (``SearchContext.correct``), and
            mixed precision judges its choice corrected (the correction is kept; more layers go float if needed).
        check: the check set (:func:`check_set_for`), handed to the calibrator as ``SearchContext.check``.

    Returns:
        (ranges, spec, report entries: ``search_set``, ``layers``, and ``search`` (the calibrator's
        summary) and ``mixed_precision`` when present, the harness that :func:`proxy_entry` measures
        the final graph with once the pipeline has built it).
    """
    with stage("search_set"):
        harness = Harness(prepared, spec, search, threads, corrector, check)
    full_spec = spec
    if calibrator.needs_graph:
        with stage("search"):
            ranges = calibrator.refine(ranges, harness.context(progress))
    # a searching calibrator's histograms include the search images, so its candidates cover the anomalies
    extra: dict[str, Any] = {"search_set": {**search.description, "streamed_to_calibrator": calibrator.needs_graph}}
    if check is not None:
        extra["check_set"] = check.description
    if calibrator.search_summary is not None:
        extra["search"] = calibrator.search_summary
    sensitivity: dict[str, dict[str, float]] = {}
    fallback: list[str] = []
    if cfg.mixed_precision is not None:
        with stage("mixed_precision"):
            correct = None if corrector is None else (lambda sub: corrector.biases(sub, ranges))
            # emulated widths have no integer kernels: their fallbacks are timed on the 8-bit graph instead
            stand_in = (build_spec(prepared, cfg.model_copy(update={"activation_bits": 8, "weight_bits": 8}),
                                   spec.profile) if spec.emulated else None)
            mp = choose_precision(harness, ranges, cfg.mixed_precision, cfg.search, progress,
                                  cfg.mixed_precision_criterion, correct, stand_in, cfg.mixed_precision_rank)
        spec, fallback, sensitivity = mp.spec, mp.fallback, mp.sensitivity
        extra["mixed_precision"] = mp.report
    extra["layers"] = layer_table(prepared, full_spec, ranges, sensitivity, fallback)
    return ranges, spec, extra, harness


def proxy_entry(harness: Harness, qdq: onnx.ModelProto) -> dict[str, Any]:
    """The report's ``proxy``: the search set's separation under fp32 and under the final Q/DQ graph, and the drop."""
    quantized = harness.proxy(harness.run(qdq))
    return {"fp32": harness.reference_separation, "quantized": quantized,
            "drop": separation_drop(harness.reference_separation, quantized)}


def layer_table(model: onnx.ModelProto, spec: QuantSpec, ranges: dict[str, TensorRange],
                sensitivity: dict[str, dict[str, float]], fallback: list[str]) -> list[dict[str, Any]]:
    """Per layer: nodes, precision kept, sensitivity (if scanned), each tensor's chosen and candidate ranges.

    Each layer's weights too: the calibrator's choice where it made one, else the spec's weight range rule.
    """
    needs = node_tensors(model, spec)
    kept = "fp16" if spec.profile.fp16_fallback else "fp32"
    inputs = {n.name: n.input for n in model.graph.node}
    rows = []
    for layer, nodes in layer_groups(model, spec).items():
        tensors = dict.fromkeys(t for n in nodes for t in needs[n])
        weights = [inputs[n][spec.nodes[n].weight] for n in nodes if spec.nodes[n].weight is not None]
        rows.append({
            "layer": layer, "nodes": nodes,
            "precision": kept if layer in fallback else f"w{spec.weight_bits}a{spec.activation_bits}",
            "sensitivity": sensitivity.get(layer),
            "tensors": {t: ranges[t].to_dict() for t in tensors},
            "weights": {w: ranges[w].to_dict() if w in ranges else {"rule": spec.weight_range} for w in weights},
        })
    return rows
