"""Empirical bias correction: each quantized layer's output keeps fp32's per-channel mean on the calibration images.

Quantization error is not zero-mean. Rounding per-channel weights (a depthwise filter has only nine taps) and
clipping activations shift the mean of each output channel, and the shifts add up layer after layer (Nagel et
al., "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV 2019: empirical bias
correction). For a knowledge-distillation detector such a shift is a spurious teacher-student difference
everywhere in the anomaly map.

The pass measures, for every quantized Conv, ConvTranspose and Gemm that has a bias initializer, the mean of
each output channel over the calibration images in the fp32 graph and in the Q/DQ graph (Q/DQ simulated in
float, as calibration runs it), and adds fp32's mean minus the quantized mean to the layer's float bias (which
``insert_qdq`` then quantizes to int32 as before). A correction upstream moves the inputs downstream, so
layers are corrected level by level in graph order (:func:`levels`), each measured with everything upstream
already corrected. Ranges, weights and the spec are unchanged; only bias values move.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from qtool.errors import CalibrationError
from qtool.graph._index import GraphIndex, node_attr
from qtool.graph.frontier import FrontierRunner
from qtool.graph.insert_qdq import insert_qdq
from qtool.graph.policy import OP_RULES, QuantSpec

log = logging.getLogger(__name__)

def targets(model: onnx.ModelProto, spec: QuantSpec) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """The layers bias correction can move: ``{node: (output tensor, bias initializer)}``, and the skipped ones.

    A quantized node qualifies when its op has a bias slot (:data:`qtool.graph.policy.OP_RULES`: Conv,
    ConvTranspose, Gemm, whose outputs hold their channels on axis 1), that slot holds a 1-D initializer read
    by this node alone, and the bias is added as it is (a Gemm's ``beta`` is 1). Other weighted nodes are
    listed as skipped.
    """
    idx = GraphIndex(model)
    moved: dict[str, tuple[str, str]] = {}
    skipped: list[str] = []
    for node in model.graph.node:
        qn = spec.nodes.get(node.name)
        rule = OP_RULES.get(node.op_type)
        if qn is None or qn.weight is None or rule is None or rule.bias is None:
            continue
        slot = rule.bias
        bias = node.input[slot] if len(node.input) > slot else ""
        if (bias in idx.initializers and len(idx.consumers[bias]) == 1 and len(idx.initializers[bias].dims) == 1
                and node_attr(node, "beta", 1.0) == 1.0):
            moved[node.name] = (node.output[0], bias)
        else:
            skipped.append(node.name)
    return moved, skipped


class ChannelMoments:
    """Running per-channel (axis 1) mean and standard deviation of named tensors."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.squares: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def add(self, names: list[str], arrays: list[np.ndarray]) -> None:
        """Add one chunk's values of each tensor.

        Raises:
            CalibrationError: a non-finite activation (naming the tensor).
        """
        for name, arr in zip(names, arrays):
            a = arr.astype(np.float64)
            if not np.isfinite(a).all():
                raise CalibrationError(f"bias correction: tensor {name!r} holds NaN or Inf")
            axes = tuple(i for i in range(a.ndim) if i != 1)
            self.sums[name] = self.sums.get(name, 0.0) + a.sum(axis=axes)
            self.squares[name] = self.squares.get(name, 0.0) + (a * a).sum(axis=axes)
            self.counts[name] = self.counts.get(name, 0) + a.size // a.shape[1]

    def result(self, names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(mean, std) per tensor. Raises CalibrationError when nothing was added."""
        if not self.counts:
            raise CalibrationError("bias correction: empty calibration set")
        mean = {n: self.sums[n] / self.counts[n] for n in names}
        std = {n: np.sqrt(np.maximum(self.squares[n] / self.counts[n] - mean[n] ** 2, 0.0)) for n in names}
        return mean, std


def bias_in_use(idx: GraphIndex, output: str) -> np.ndarray:
    """The bias that the node producing ``output`` adds in a Q/DQ graph (indexed by ``idx``).

    Its float initializer, or the value of the int32 DequantizeLinear that feeds it.
    """
    node = idx.producer[output]
    name = node.input[OP_RULES[node.op_type].bias]
    if name in idx.initializers:
        return numpy_helper.to_array(idx.initializers[name]).astype(np.float64)
    dq = idx.producer[name]
    q, scale, zero = (numpy_helper.to_array(idx.initializers[t]).astype(np.float64) for t in dq.input[:3])
    return (q - zero) * scale


def levels(model: onnx.ModelProto, moved: Mapping[str, Any]) -> list[list[str]]:
    """The ``moved`` nodes grouped by how many moved nodes lie upstream of them (on the longest path).

    A node's output mean depends on every bias upstream of it, so a level is measured only after the levels
    before it are corrected; nodes of one level do not feed each other and share a graph run. ``model``'s
    nodes must be in topological order (as ONNX requires).
    """
    depth: dict[str, int] = {}
    grouped: dict[int, list[str]] = {}
    for node in model.graph.node:
        d = max((depth.get(t, 0) for t in node.input if t), default=0)
        if node.name in moved:
            grouped.setdefault(d, []).append(node.name)
            d += 1
        for t in node.output:
            depth[t] = d
    return [grouped[d] for d in sorted(grouped)]


def _relative_shift(shift: np.ndarray, std: np.ndarray) -> float:
    """Mean over channels of |shift| in units of the fp32 channel's standard deviation (floored for dead channels)."""
    return float(np.mean(np.abs(shift) / np.maximum(std, 1e-6 + 1e-3 * float(std.max(initial=0.0)))))


def correct_biases(model: onnx.ModelProto, spec: QuantSpec, ranges: Mapping[str, Any],
                   batches: Callable[[], Iterable[np.ndarray]],
                   threads: int = 2, max_frontier_mb: float | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A copy of the prepared ``model`` whose biases make the Q/DQ graph of ``spec`` and ``ranges`` keep fp32's means.

    Layers are corrected level by level (:func:`levels`): each level's output means are measured in the Q/DQ
    graph with everything upstream already corrected, so each correction is exact on the calibration images;
    then every layer is measured once more. A :class:`qtool.graph.frontier.FrontierRunner` holds the
    calibration images and the activations upstream of the next level, so each level runs only the nodes
    between them and its outputs (a few graph runs in all, not one per level; the activations kept cost
    memory: ``frontier_mb``). With ``max_frontier_mb``, a level that leaves more activations than that held drops
    them, and the next level runs from the images (``frontier_drops``: same result, more node runs).

    Args:
        model: the prepared fp32 graph ``spec`` was built from (one image input).
        spec, ranges: what ``insert_qdq`` will quantize, and how.
        batches: returns an iterable of calibration batches (called once).

    Returns:
        (corrected model, report): per layer its bias change and relative shift (|fp32 mean - quantized
        mean| / fp32 std, averaged over channels) before (as measured at its level) and after (the last
        run); ``relative_shift``: the mean over layers, before and after; ``levels``; ``node_runs`` (nodes
        executed per image chunk, fp32 reference and final check included) against ``graph_nodes`` (the Q/DQ
        graph's); ``frontier_mb``; the ``skipped`` layers (no bias) and the seconds.
    Raises:
        CalibrationError: no images, or a non-finite activation (naming the tensor).
    """
    t0 = time.perf_counter()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    moved, skipped = targets(out, spec)
    report: dict[str, Any] = {"layers": {}, "skipped": skipped}
    if not moved:
        report.update(levels=0, node_runs=0, seconds=round(time.perf_counter() - t0, 3))
        return out, report
    graph_input = out.graph.input[0]  # prepared graphs have one image input (``qtool.graph.prepare``)
    dim = graph_input.type.tensor_type.shape.dim
    runner = FrontierRunner(batches(), graph_input.name, dim[0].dim_value if dim and dim[0].dim_value else None,
                            threads, None if max_frontier_mb is None else int(max_frontier_mb * 2**20))
    if not runner.inputs:
        raise CalibrationError("bias correction: empty calibration set")

    def moments(graph: onnx.ModelProto, nodes: list[str], hold: bool = True
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per-channel mean and std of the nodes' outputs in ``graph``, run from the runner's frontier."""
        tensors = [moved[n][0] for n in nodes]
        acc = ChannelMoments()
        for outs in runner.run(graph, tensors, moving=set(nodes), hold=hold):
            acc.add(tensors, outs)
        return acc.result(tensors)

    ref_mean, ref_std = moments(out, list(moved), hold=False)  # fp32, every layer at once
    runner.restart()
    inits = {t.name: t for t in out.graph.initializer}
    original = {b: numpy_helper.to_array(inits[b]).copy() for _, b in moved.values()}

    graph_nodes = 0

    def shifts(nodes: list[str], hold: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per node: fp32 mean minus the Q/DQ graph's mean, and the bias that graph used (int32-rounded)."""
        nonlocal graph_nodes
        qdq = insert_qdq(out, spec, ranges)
        graph_nodes = len(qdq.graph.node)
        q_mean, _ = moments(qdq, nodes, hold)
        idx = GraphIndex(qdq)
        return {n: (ref_mean[moved[n][0]] - q_mean[moved[n][0]], bias_in_use(idx, moved[n][0])) for n in nodes}

    def relative(n: str, shift: np.ndarray) -> float:
        return round(_relative_shift(shift, ref_std[moved[n][0]]), 6)

    grouped = levels(out, moved)
    before: dict[str, float] = {}
    for level in grouped:
        for node, (shift, used) in shifts(level).items():
            before[node] = relative(node, shift)
            b = moved[node][1]  # from the bias the graph used, so its old rounding is not carried into the new
            inits[b].CopyFrom(numpy_helper.from_array((used + shift).astype(original[b].dtype), b))
    runner.restart()  # every layer at once, from the input images
    after = {node: relative(node, shift) for node, (shift, _) in shifts(list(moved), hold=False).items()}
    for node, (_, b) in moved.items():
        change = numpy_helper.to_array(inits[b]).astype(np.float64) - original[b]
        report["layers"][node] = {"bias": b, "channels": int(change.size),
                                  "max_abs_change": float(np.abs(change).max()),
                                  "relative_shift_before": before[node], "relative_shift_after": after[node]}
    report.update(relative_shift={"before": round(float(np.mean(list(before.values()))), 6),
                                  "after": round(float(np.mean(list(after.values()))), 6)},
                  levels=len(grouped), node_runs=runner.node_runs, graph_nodes=graph_nodes,
                  frontier_mb=round(runner.peak_bytes / 2**20, 1), frontier_drops=runner.drops,
                  seconds=round(time.perf_counter() - t0, 3))
    log.info("bias correction: %d layers in %d levels, mean relative shift %.4f -> %.4f", len(moved),
             len(grouped), report["relative_shift"]["before"], report["relative_shift"]["after"])
    return out, report


Biases = dict[str, tuple[str, np.ndarray]]
"""``{node: (bias initializer, value)}``: corrected float biases, by the node that adds each."""


def corrected_biases(model: onnx.ModelProto, report: Mapping[str, Any]) -> Biases:
    """The biases of each layer a :func:`correct_biases` ``report`` lists, from its corrected ``model``."""
    inits = {t.name: t for t in model.graph.initializer}
    return {node: (layer["bias"], numpy_helper.to_array(inits[layer["bias"]]).copy())
            for node, layer in report["layers"].items()}


def with_biases(model: onnx.ModelProto, biases: Biases, nodes: Collection[str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with ``biases`` in place (only those of ``nodes`` when given); ``model`` itself if none."""
    swap = {b: v for n, (b, v) in biases.items() if nodes is None or n in nodes}
    if not swap:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in swap:
            init.CopyFrom(numpy_helper.from_array(swap[init.name], init.name))
    return out


class BiasCorrector:
    """Bias correction of one prepared graph for any spec and ranges, remembering its recent corrections.

    A search that judges candidates as the pipeline will save them (``SearchContext.correct``) calls it with its
    candidate ranges (``corrector(ranges)`` -> the corrected biases); the pipeline then calls :meth:`correct` for
    the ranges it saves, which are often ones the search has just corrected (map-aware's final check). Each
    correction is remembered under the SHA-256 of the Q/DQ graph it corrects (``insert_qdq`` of the prepared
    graph, spec and ranges: the whole input of :func:`correct_biases` besides the images), so a repeat is a
    lookup and is reported as ``reused``. The calibration images are read once, on the first correction.
    """

    def __init__(self, model: onnx.ModelProto, spec: QuantSpec, batches: Callable[[], Iterable[np.ndarray]],
                 threads: int = 2, max_frontier_mb: float | None = None, remember: int = 8) -> None:
        self.model, self.spec, self.batches = model, spec, batches
        self.threads, self.max_frontier_mb, self.remember = threads, max_frontier_mb, remember
        self.held: list[np.ndarray] = []
        self.memo: OrderedDict[str, tuple[Biases, dict[str, Any]]] = OrderedDict()
        self.computed = 0

    def _biases(self, spec: QuantSpec, ranges: Mapping[str, Any]) -> tuple[Biases, dict[str, Any]]:
        """The corrected biases and report for ``spec`` and ``ranges`` (remembered, least recent dropped)."""
        key = hashlib.sha256(insert_qdq(self.model, spec, ranges).SerializeToString()).hexdigest()
        if key in self.memo:
            self.memo.move_to_end(key)
            biases, report = self.memo[key]
            return biases, {**report, "reused": True}
        if not self.held:
            self.held.extend(self.batches())
        corrected, report = correct_biases(self.model, spec, ranges, lambda: iter(self.held), self.threads,
                                           self.max_frontier_mb)
        self.computed += 1
        self.memo[key] = (corrected_biases(corrected, report), report)
        while len(self.memo) > self.remember:
            self.memo.popitem(last=False)
        return self.memo[key][0], {**report, "reused": False}

    def __call__(self, ranges: Mapping[str, Any]) -> Biases:
        """The biases :func:`correct_biases` gives the graph quantized per the corrector's spec and ``ranges``."""
        return self.biases(self.spec, ranges)

    def biases(self, spec: QuantSpec, ranges: Mapping[str, Any]) -> Biases:
        """The corrected biases of the graph quantized per ``spec`` (any sub-spec) and ``ranges``."""
        return dict(self._biases(spec, ranges)[0])

    def correct(self, spec: QuantSpec, ranges: Mapping[str, Any]) -> tuple[onnx.ModelProto, dict[str, Any]]:
        """What :func:`correct_biases` returns for ``spec`` and ``ranges`` (the report says if it was ``reused``)."""
        biases, report = self._biases(spec, ranges)
        corrected = with_biases(self.model, biases)
        if corrected is self.model:  # nothing to correct: still a copy, as correct_biases returns
            corrected = onnx.ModelProto()
            corrected.CopyFrom(self.model)
        return corrected, report
