"""Compute cost of a graph's nodes: multiply-accumulates (MACs) per node, from inferred shapes.

A hardware-independent cost: the share of MACs a mixed-precision model keeps in float holds on any
runtime, where a latency holds only for the runtime that measured it. Counted: Conv (and ConvTranspose),
Gemm and MatMul, the ops that quantization speeds up; every other op counts 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from qtool.graph.prepare import infer_shapes


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Static dims of every typed tensor (None for a symbolic dim), after shape inference."""
    g = infer_shapes(model).graph
    out: dict[str, list[int | None]] = {}
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    for t in g.initializer:
        out[t.name] = list(t.dims)
    return out


def _product(dims: Sequence[int | None]) -> int | None:
    return None if any(d is None for d in dims) else int(np.prod(dims, dtype=np.int64))


def node_macs(model: onnx.ModelProto) -> dict[str, int]:
    """MACs of one forward pass per Conv, ConvTranspose, Gemm and MatMul node (by node name).

    Conv: output elements x input channels per group x kernel elements; ConvTranspose: input elements
    x output channels per group x kernel elements; Gemm / MatMul: output elements x the reduced dim.
    A node whose shapes are not static is left out.

    Raises:
        GraphError: shape inference fails.
    """
    shapes = _shapes(model)
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        x, w, y = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
        if x is None or w is None or y is None:
            continue
        if node.op_type == "Conv":  # W: (M, C/group, k...)
            macs = _product([*y, *w[1:]])
        elif node.op_type == "ConvTranspose":  # W: (C, M/group, k...)
            macs = _product([*x, *w[1:]])
        elif node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            macs = _product([*y, x[0] if trans_a else x[-1]])
        else:
            macs = _product([*y, x[-1]])
        if macs is not None:
            out[node.name] = macs
    return out
