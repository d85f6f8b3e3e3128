"""How quantized weights are rounded onto their integer grid: the registered weight rounding methods.

``nearest`` rounds each weight on its own (what ``insert_qdq`` and onnxruntime do). ``gptq`` rounds a
Conv's weights one input column at a time and spreads each column's rounding error over the columns not yet
rounded, weighted by the inverse of the layer's input Gram matrix on the calibration images, so that the
layer's output (not its weights) stays close to fp32's (Frantar et al., "OPTQ: Accurate Quantization for
Generative Pre-trained Transformers", ICLR 2023; layer-wise, on fp32 inputs). The grid is unchanged: the
bounds, scale and zero point are those ``insert_qdq`` derives from the original weight and the spec's weight
range rule (or a calibrator's weight range); only which integer each weight gets differs. The result is
carried as ``QuantSpec.weight_values``, float weights that quantize to exactly the chosen integers, so bias
correction, the proxy and the saved graph all see it with no other change.

Conv layers of any group count (depthwise included) with 2-D kernels are rounded; other weighted nodes
(ConvTranspose, Gemm, MatMul, a weight shared by two nodes) keep nearest rounding and are listed as skipped.
The report gives, per layer, the output error of both roundings on the calibration images
(``sum((W - Q) H (W - Q)^T)`` with H the input Gram matrix, relative to fp32's output energy).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

from qtool.calibrate import probe_outputs
from qtool.errors import CalibrationError
from qtool.graph._index import GraphIndex, node_attr
from qtool.graph.insert_qdq import weight_grid
from qtool.graph.policy import QuantSpec
from qtool.graph.probe import add_outputs, probe_session
from qtool.registry import Registry

log = logging.getLogger(__name__)

#: (model, spec, ranges, calibration batches, threads) -> (spec with weight_values, report)
Rounding = Callable[..., tuple[QuantSpec, dict[str, Any]]]
ROUNDINGS: Registry[Rounding] = Registry("weight rounding")

DAMP = 0.01  # share of the mean Gram diagonal added to it (OPTQ's dampening; keeps the inverse stable)
CHUNK = 4  # images whose patches are formed at once (bounds the im2col memory)


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """A quantized 2-D Conv whose weight can be rounded by its inputs: names and geometry."""

    node: str
    input: str
    weight: str
    group: int
    kernel: tuple[int, int]
    pads: tuple[int, int, int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]


def conv_layers(model: onnx.ModelProto, spec: QuantSpec) -> tuple[list[ConvLayer], dict[str, str]]:
    """The quantized Convs :func:`gptq` can round (graph order), and ``{weight: why not}`` for the other weights."""
    idx = GraphIndex(model)
    layers: list[ConvLayer] = []
    skipped: dict[str, str] = {}
    for node in model.graph.node:
        qn = spec.nodes.get(node.name)
        if qn is None or qn.weight is None:
            continue
        w = node.input[qn.weight]
        if w not in spec.weights:
            continue
        dims = list(idx.initializers[w].dims)
        why = (f"{node.op_type} (only Conv is rounded)" if node.op_type != "Conv"
               else "a weight shared by several nodes" if len(idx.consumers[w]) != 1
               else f"{len(dims) - 2}-D kernel" if len(dims) != 4
               else f"auto_pad {node_attr(node, 'auto_pad', b'').decode()}"
               if node_attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID") else None)
        if why is not None:
            skipped[w] = why
            continue
        layers.append(ConvLayer(node.name, node.input[0], w, int(node_attr(node, "group", 1)), (dims[2], dims[3]),
                                tuple(node_attr(node, "pads", [0, 0, 0, 0])),
                                tuple(node_attr(node, "strides", [1, 1])),
                                tuple(node_attr(node, "dilations", [1, 1]))))
    return layers, skipped


def patches(x: np.ndarray, layer: ConvLayer) -> np.ndarray:
    """The Conv's input patches: (positions, groups, channels per group x kernel), in the weight's column order."""
    n, c = x.shape[:2]
    (kh, kw), (t, left, b, r), (sh, sw), (dh, dw) = layer.kernel, layer.pads, layer.strides, layer.dilations
    x = np.pad(x, ((0, 0), (0, 0), (t, b), (left, r)))
    win = sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    ho, wo = win.shape[2:4]
    g = layer.group
    return win.reshape(n, g, c // g, ho, wo, kh, kw).transpose(0, 3, 4, 1, 2, 5, 6).reshape(n * ho * wo, g, -1)


def gram(p: np.ndarray) -> np.ndarray:
    """Sum over positions of each group's patch outer products: (groups, columns, columns), float64."""
    p = np.ascontiguousarray(p.transpose(1, 0, 2))  # (groups, positions, columns)
    return np.matmul(p.transpose(0, 2, 1), p).astype(np.float64)


def output_grid(x: np.ndarray, layer: ConvLayer) -> tuple[int, int]:
    """The Conv's output height and width for input ``x`` (N, C, H, W)."""
    (kh, kw), (t, left, b, r), (sh, sw), (dh, dw) = layer.kernel, layer.pads, layer.strides, layer.dilations
    return ((x.shape[2] + t + b - (kh - 1) * dh - 1) // sh + 1, (x.shape[3] + left + r - (kw - 1) * dw - 1) // sw + 1)


def layer_grams(model: onnx.ModelProto, layers: list[ConvLayer], batches: Iterable[np.ndarray], threads: int,
                masks: Iterable[np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Each layer's input Gram matrix over the calibration images (fp32 inputs), and the number of images.

    ``masks``: one (B, S, S) array per batch; then only the output positions inside them count (each mask taken at
    the layer's output grid, nearest sample), e.g. the defect regions of synthetic anomalies.

    Raises:
        CalibrationError: no images, or a non-finite input of a layer (naming it).
    """
    inputs = list(dict.fromkeys(layer.input for layer in layers))
    sess = probe_session(add_outputs(model, inputs), threads)
    grams: dict[str, np.ndarray] = {}
    seen = 0
    for batch, mask in zip(batches, masks if masks is not None else itertools.repeat(None)):
        start = 0
        for outs in probe_outputs(sess, inputs, batch):
            acts = dict(zip(inputs, outs))
            for name, x in acts.items():
                if not np.isfinite(x).all():
                    raise CalibrationError(f"weight rounding: input {name!r} of a quantized Conv is not finite")
            for layer in layers:
                x = acts[layer.input]
                for i in range(0, len(x), CHUNK):
                    part = x[i : i + CHUNK]
                    p = patches(part, layer)
                    if mask is not None:
                        (ho, wo), size = output_grid(x, layer), mask.shape[-1]
                        m = mask[start + i : start + i + len(part)]
                        p = p[(m[:, np.arange(ho) * size // ho][:, :, np.arange(wo) * size // wo] > 0).reshape(-1)]
                    g = gram(p)
                    grams[layer.weight] = grams[layer.weight] + g if layer.weight in grams else g
            start += len(outs[0])
            seen += len(outs[0])
    if seen == 0:
        raise CalibrationError("weight rounding: empty calibration set")
    return grams, seen


def row_grid(scale: np.ndarray, zp: np.ndarray, rows: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row scale and zero point as (groups, rows per group, 1), float64 (a per-tensor grid is broadcast)."""
    shape = (groups, rows // groups, 1)
    return (np.broadcast_to(np.asarray(scale, np.float64).reshape(-1, 1), (rows, 1)).reshape(shape),
            np.broadcast_to(np.asarray(zp, np.float64).reshape(-1, 1), (rows, 1)).reshape(shape))


def nearest_values(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Each weight rounded to the nearest grid value (clipped), dequantized."""
    return (np.clip(np.round(w / scale) + zp, qmin, qmax) - zp) * scale


def gptq_values(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int,
                damp: float = DAMP) -> np.ndarray:
    """OPTQ rounding of weight rows ``w`` (groups, rows, columns) given each group's Gram ``h``, dequantized.

    Columns are rounded in order; each one's error, divided by the Cholesky factor's diagonal, is subtracted
    from the columns after it along that factor's row (the inverse-Hessian update of OPTQ). Columns whose input
    is always zero keep their nearest rounding and pass no error on. Deterministic.
    """
    w = np.array(w, dtype=np.float64)
    h = np.array(h, dtype=np.float64)
    cols = w.shape[2]
    diag = np.einsum("gii->gi", h)  # a view: writing it writes h's diagonal
    dead = diag <= 0
    diag[dead] = 1.0
    diag += damp * diag.mean(axis=1, keepdims=True)
    # inv(h) = upper^T upper; a dead column's row and column of h are zero off the diagonal, so are upper's
    upper = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)
    out = np.empty_like(w)
    for i in range(cols):
        col = w[:, :, i]
        out[:, :, i] = nearest_values(col, scale[:, :, 0], zp[:, :, 0], qmin, qmax)
        err = (col - out[:, :, i]) / upper[:, None, i, i]
        w[:, :, i + 1 :] -= err[:, :, None] * upper[:, None, i, i + 1 :]
    return out


def output_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """``sum over groups of trace((w - q) h (w - q)^T)``: the squared output error on the Gram's images."""
    e = w - q
    return float(np.einsum("gri,gij,grj->", e, h, e))


def relative_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """:func:`output_error` relative to fp32's output energy ``sum trace(w h w^T)`` on the same images."""
    return output_error(w, q, h) / max(float(np.einsum("gri,gij,grj->", w, h, w)), 1e-30)


def round_conv(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int
               ) -> tuple[np.ndarray, dict[str, float]]:
    """The OPTQ-rounded weight (as float32 in ``w``'s shape) and both roundings' relative output errors."""
    rows, groups = w.shape[0], h.shape[0]
    s, z = row_grid(scale, zp, rows, groups)
    wg = w.reshape(groups, rows // groups, -1).astype(np.float64)
    near = nearest_values(wg, s, z, qmin, qmax)
    rounded = gptq_values(wg, h, s, z, qmin, qmax)
    errors = {"nearest": relative_error(wg, near, h), "gptq": relative_error(wg, rounded, h)}
    return rounded.reshape(w.shape).astype(np.float32), errors


@ROUNDINGS.register("nearest")
def nearest(model: onnx.ModelProto, spec: QuantSpec, ranges: Mapping[str, Any], batches: Callable[[], Iterable],
            threads: int = 2) -> tuple[QuantSpec, dict[str, Any]]:
    """Round each weight to its nearest grid value (``insert_qdq``'s own rounding): the spec as it is."""
    return spec, {"method": "nearest"}


@ROUNDINGS.register("gptq")
def gptq(model: onnx.ModelProto, spec: QuantSpec, ranges: Mapping[str, Any], batches: Callable[[], Iterable],
         threads: int = 2) -> tuple[QuantSpec, dict[str, Any]]:
    """OPTQ rounding of every quantized Conv's weight on the calibration images ``batches()``.

    Returns:
        (a copy of ``spec`` with ``weight_values`` for the rounded weights, report: per layer the relative
        output error of nearest and gptq rounding, the skipped weights with why, images, seconds).
    """
    t0 = time.perf_counter()
    layers, skipped = conv_layers(model, spec)
    idx = GraphIndex(model)
    grams, images = layer_grams(model, layers, batches(), threads) if layers else ({}, 0)
    values: dict[str, np.ndarray] = {}
    per_layer: dict[str, dict[str, float]] = {}
    for layer in layers:
        p = spec.weights[layer.weight]
        w = numpy_helper.to_array(idx.initializers[layer.weight])
        scale, zp = weight_grid(layer.weight, p, w, spec.weight_range, ranges)
        values[layer.weight], per_layer[layer.weight] = round_conv(w, grams[layer.weight], scale, zp, p.qmin, p.qmax)
    total = {k: float(np.mean([e[k] for e in per_layer.values()])) if per_layer else 0.0 for k in ("nearest", "gptq")}
    log.info("gptq rounded %d weights on %d images: mean relative output error %.4g -> %.4g", len(values), images,
             total["nearest"], total["gptq"])
    report = {"method": "gptq", "damp": DAMP, "images": images, "layers": per_layer, "skipped": skipped,
              "mean_relative_error": total, "seconds": round(time.perf_counter() - t0, 3)}
    return dataclasses.replace(spec, weight_values={**spec.weight_values, **values}), report


def round_weights(method: str, model: onnx.ModelProto, spec: QuantSpec, ranges: Mapping[str, Any],
                  batches: Callable[[], Iterable[np.ndarray]], threads: int = 2) -> tuple[QuantSpec, dict[str, Any]]:
    """Apply the registered rounding ``method`` (a RegistryError names the known ones)."""
    return ROUNDINGS.get(method)(model, spec, ranges, batches, threads)
