"""Expose intermediate tensors as graph outputs so an ONNX Runtime session can return them (calibration)."""

from __future__ import annotations

from collections.abc import Iterable

import onnx
from onnx import TensorProto, helper

from qtool.errors import GraphError
from qtool.graph._index import GraphIndex


def add_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """Return a copy of ``model`` whose graph also outputs each tensor in ``names``.

    Tensors that are already outputs are left as they are; graph inputs may be listed too.
    Element types come from shape information when present (run shape inference first for
    non-float tensors), else float32; shapes are left open.

    Raises:
        GraphError: a name is not a tensor of the graph (the message names it).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    idx = GraphIndex(out)
    known = set(idx.producer) | set(idx.graph_inputs) | set(idx.initializers)
    present = set(idx.graph_outputs)
    for name in names:
        if name not in known:
            raise GraphError(f"tensor {name!r} is not in the graph; cannot expose it as an output")
        if name in present:
            continue
        present.add(name)
        elem = idx.elem_type.get(name, TensorProto.FLOAT)
        out.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    return out
