"""Lower a QuantSpec plus calibrated ranges to QuantizeLinear/DequantizeLinear nodes in ONNX.

Weights are quantized offline (int8 initializer + DequantizeLinear, per channel); each activation gets
one Q -> DQ pair read by its quantized consumers; Conv/Gemm biases become int32 with scale
input_scale * weight_scale, as onnxruntime's quantize_static does, so ORT fuses QLinearConv.
Names follow onnxruntime's (``T_QuantizeLinear``, ``T_scale``, ``W_quantized`` ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qtool.errors import GraphError
from qtool.graph._index import GraphIndex, NameScope, remove_unused_initializers, topo_sort
from qtool.graph.policy import ActivationSpec, QuantSpec
from qtool.graph.profiles import QuantParams, quantize_array, scale_zero_point
from qtool.graph.weight_ranges import weight_bounds

_INT32 = np.iinfo(np.int32)


def insert_qdq(model: onnx.ModelProto, spec: QuantSpec, ranges: Mapping[str, Any]) -> onnx.ModelProto:
    """Return a QDQ copy of ``model``; see :func:`insert_qdq_report` (this drops the report)."""
    return insert_qdq_report(model, spec, ranges)[0]


def bounds_of(r: Any) -> tuple[Any, Any]:
    """(lo, hi) of a range object (``.lo``/``.hi``: TensorRange, WeightRange) or of a pair."""
    if hasattr(r, "lo") and hasattr(r, "hi"):
        return r.lo, r.hi
    lo, hi = r
    return lo, hi


def _bounds(r: Any) -> tuple[float, float]:
    lo, hi = bounds_of(r)
    return float(lo), float(hi)


def _range(t: str, a: ActivationSpec, idx: GraphIndex, ranges: Mapping[str, Any]) -> tuple[float, float]:
    src = a.range_of
    if src in idx.initializers:
        data = numpy_helper.to_array(idx.initializers[src])
        return (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if src not in ranges:
        needed = f" (needed to quantize {t!r})" if src != t else ""
        raise GraphError(f"no calibration range for tensor {src!r}{needed}")
    lo, hi = _bounds(ranges[src])
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise GraphError(f"calibration range of tensor {src!r} is [{lo}, {hi}]; need finite lo <= hi")
    return lo, hi


def weight_grid(w: str, p: QuantParams, data: np.ndarray, rule: str,
                ranges: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of weight ``w`` (values ``data``) before any int32-bias adjustment."""
    return scale_zero_point(*_weight_range(w, p, data, rule, ranges), p)


def _weight_range(w: str, p: QuantParams, data: np.ndarray, rule: str,
                  ranges: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A weight's bounds: given in ``ranges`` (one pair per channel), else the spec's weight range rule's."""
    if w not in ranges:
        return weight_bounds(rule, data, p)
    lo, hi = (np.asarray(b, dtype=np.float32) for b in bounds_of(ranges[w]))
    channels = data.shape[p.axis] if p.axis is not None else 1
    if lo.size != channels or hi.size != channels or not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise GraphError(f"range given for weight {w!r} must be {channels} finite (lo, hi) pairs")
    return (lo, hi) if p.axis is not None else (lo.reshape(()), hi.reshape(()))


def grow_for_int32_bias(w_scale: np.ndarray, in_scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Grow weight scales whose bias scale (input_scale * weight_scale) would overflow int32.

    Same rule as onnxruntime's ``_adjust_weight_scale_for_int32_bias``.
    """
    qrange = float(_INT32.max) - float(_INT32.min + 1)
    ws = np.array(w_scale, dtype=np.float32, copy=True)
    b = bias.astype(np.float64)
    if ws.ndim == 0:
        absmax = max(abs(min(b.min(), 0.0)), abs(max(b.max(), 0.0)))
        need = np.asarray(1.0001 * 2.0 * absmax / qrange)
    else:
        need = 1.0001 * 2.0 * np.abs(b.reshape(-1)) / qrange
    cand = float(in_scale) * ws.astype(np.float64)
    grow = (cand < need) & (cand > 0.0)
    return np.where(grow, (ws.astype(np.float64) * need / np.where(grow, cand, 1.0)), ws).astype(np.float32)


def insert_qdq_report(
    model: onnx.ModelProto, spec: QuantSpec, ranges: Mapping[str, Any]
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Insert Q/DQ into a copy of ``model`` as ``spec`` says.

    Args:
        model: the graph ``spec`` was built from.
        spec: what to quantize (``qtool.graph.policy.build_spec``).
        ranges: ``{tensor: range}`` for every name in ``spec.tensors_to_calibrate()``; a range is any
            object with ``.lo``/``.hi`` (calibrators' TensorRange) or a ``(lo, hi)`` pair.

    Returns:
        (QDQ model, report): the report has per activation lo, hi, scale, zero_point, dtype, bits;
        per weight dtype, bits, axis and scale extremes; Q/DQ counts per op type; ``emulated``.

    Raises:
        GraphError: a missing or non-finite range (naming the tensor), or an opset below 13.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    idx = GraphIndex(m)
    if idx.opset() < 13:
        raise GraphError(f"opset {idx.opset()} is too old for per-channel QDQ; need >= 13")
    scope = NameScope(m)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    report: dict[str, Any] = {
        "profile": spec.profile.name,
        "activation_bits": spec.activation_bits,
        "weight_bits": spec.weight_bits,
        "emulated": spec.emulated,
        "tensors": {},
        "weights": {},
        "biases": {},
    }

    def const(name: str, value: np.ndarray) -> str:
        n = scope.new(name)
        inits.append(numpy_helper.from_array(np.asarray(value), n))
        return n

    def dequant(x: str, s: str, z: str, base: str, axis: int | None) -> str:
        out = scope.new(f"{base}_DequantizeLinear_Output")
        kw = {"axis": axis} if axis is not None else {}
        nodes.append(
            helper.make_node("DequantizeLinear", [x, s, z], [out], scope.new(f"{base}_DequantizeLinear"), **kw)
        )
        return out

    # activations: one Q -> DQ pair per tensor (constants are quantized offline)
    dq_of: dict[str, str] = {}
    act_scale: dict[str, np.ndarray] = {}
    for t, a in spec.activations.items():
        lo, hi = _range(t, a, idx, ranges)
        p = a.params
        scale, zp = scale_zero_point(lo, hi, p)
        s, z = const(f"{t}_scale", scale), const(f"{t}_zero_point", zp)
        if a.constant:
            q_in = const(f"{t}_quantized", quantize_array(numpy_helper.to_array(idx.initializers[t]), scale, zp, p))
        else:
            src = t
            if p.emulated:  # saturate at the narrow range: QuantizeLinear would only clip at the storage range
                cmin = np.float32(scale * (p.qmin - float(zp)))
                cmax = np.float32(scale * (p.qmax - float(zp)))
                src = scope.new(f"{t}_QRangeClip_Output")
                nodes.append(
                    helper.make_node(
                        "Clip",
                        [t, const(f"{t}_qrange_min", cmin), const(f"{t}_qrange_max", cmax)],
                        [src],
                        scope.new(f"{t}_QRangeClip"),
                    )
                )
            q_in = scope.new(f"{t}_QuantizeLinear_Output")
            nodes.append(helper.make_node("QuantizeLinear", [src, s, z], [q_in], scope.new(f"{t}_QuantizeLinear")))
        dq_of[t] = dequant(q_in, s, z, t, None)
        act_scale[t] = scale
        report["tensors"][t] = {
            "lo": lo,
            "hi": hi,
            "scale": float(scale),
            "zero_point": int(zp),
            "dtype": p.dtype,
            "bits": p.bits,
            "range_of": a.range_of,
            "constant": a.constant,
        }

    # weights: scales first, grown where an int32 bias would overflow, then quantized offline
    w_params: dict[str, tuple[QuantParams, np.ndarray, np.ndarray]] = {}
    for w, p in spec.weights.items():
        w_params[w] = (p, *weight_grid(w, p, numpy_helper.to_array(idx.initializers[w]), spec.weight_range, ranges))
    for b in spec.biases.values():
        p, ws, wz = w_params[b.weight]
        if p.dtype == "int8" and not np.any(wz):
            bias = numpy_helper.to_array(idx.initializers[b.tensor])
            w_params[b.weight] = (p, grow_for_int32_bias(ws, act_scale[b.input], bias), wz)
    w_dq: dict[str, str] = {}
    for w, (p, ws, wz) in w_params.items():
        values = spec.weight_values.get(w)  # a rounding other than nearest (qtool.weight_rounding), on the same grid
        q = quantize_array(numpy_helper.to_array(idx.initializers[w]) if values is None else values, ws, wz, p)
        w_dq[w] = dequant(const(f"{w}_quantized", q), const(f"{w}_scale", ws), const(f"{w}_zero_point", wz), w, p.axis)
        report["weights"][w] = {
            "dtype": p.dtype,
            "bits": p.bits,
            "axis": p.axis,
            "channels": int(ws.size),
            "range": "given" if w in ranges else spec.weight_range,
            "rounding": "given" if values is not None else "nearest",
            "scale_min": float(ws.min()),
            "scale_max": float(ws.max()),
        }

    # biases: int32, scale = input_scale * weight_scale, zero point 0
    b_dq: dict[str, str] = {}
    for node_name, b in spec.biases.items():
        _, ws, _ = w_params[b.weight]
        bscale = (act_scale[b.input] * ws).astype(np.float32)
        data = numpy_helper.to_array(idx.initializers[b.tensor]).astype(np.float64)
        q = np.clip(np.round(data / bscale.astype(np.float64)), _INT32.min, _INT32.max).astype(np.int32)
        axis = 0 if bscale.ndim == 1 else None
        base = f"{b.tensor}_quantized"
        b_dq[node_name] = dequant(
            const(base, q),
            const(f"{base}_scale", bscale),
            const(f"{base}_zero_point", np.zeros(bscale.shape, np.int32)),
            b.tensor,
            axis,
        )
        report["biases"][b.tensor] = {
            "node": node_name,
            "scale_min": float(bscale.min()),
            "scale_max": float(bscale.max()),
        }

    # rewire: quantized nodes read DQ outputs; float nodes too when the producer is quantized (its
    # output must feed only its Q for ORT to fuse it) unless the spec names them float readers (the head
    # with ptq.head_inputs=float), else float nodes keep the original tensor
    def producer_quantized(t: str) -> bool:
        prod = idx.producer.get(t)
        return prod is not None and prod.name in spec.nodes

    for node in m.graph.node:
        qn = spec.nodes.get(node.name)
        for i, name in enumerate(node.input):
            if qn is not None and i == qn.weight:
                node.input[i] = w_dq[name]
            elif qn is not None and i == qn.bias:
                node.input[i] = b_dq[node.name]
            elif name in dq_of and ((qn is not None and i in qn.inputs)
                                    or spec.reads_dequantized(node.name, producer_quantized(name))):
                node.input[i] = dq_of[name]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(inits)
    remove_unused_initializers(m)
    topo_sort(m)
    report.update(_counts(spec, nodes))
    return m, report


def _counts(spec: QuantSpec, nodes: list[onnx.NodeProto]) -> dict[str, Any]:
    per_op: dict[str, dict[str, int]] = {}
    for qn in spec.nodes.values():
        c = per_op.setdefault(qn.op_type, {"nodes": 0, "dq_inputs": 0, "weights": 0, "int32_biases": 0})
        c["nodes"] += 1
        c["dq_inputs"] += len(qn.inputs)
        c["weights"] += qn.weight is not None
        c["int32_biases"] += qn.bias is not None
    return {
        "q_nodes": sum(n.op_type == "QuantizeLinear" for n in nodes),
        "dq_nodes": sum(n.op_type == "DequantizeLinear" for n in nodes),
        "clip_nodes": sum(n.op_type == "Clip" for n in nodes),
        "qdq_per_op_type": per_op,
        "float_nodes": sum(not d.quantized for d in spec.decisions),
    }
