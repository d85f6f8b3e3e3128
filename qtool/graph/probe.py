"""Expose intermediate tensors as graph outputs so an ONNX Runtime session can return them (calibration).

Also the session that runs such probes (no graph optimisations) and the image chunks a fixed-batch model takes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper

from qtool.errors import GraphError
from qtool.graph._index import GraphIndex


def add_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """Return a copy of ``model`` whose graph also outputs each tensor in ``names``.

    Tensors that are already outputs are left as they are; graph inputs may be listed too.
    Element types come from the graph's shape information (shape inference runs when a requested
    tensor has none); shapes are left open.

    Raises:
        GraphError: a name is not a tensor of the graph (the message names it).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = list(names)
    idx = GraphIndex(out)
    if any(n not in idx.elem_type for n in names):
        try:
            typed = onnx.shape_inference.infer_shapes(out)
            idx.elem_type.update(GraphIndex(typed).elem_type)
        except Exception:  # types stay unknown (float32 assumed) when inference cannot run
            pass
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


def needed_nodes(model: onnx.ModelProto, idx: GraphIndex, names: Iterable[str],
                 stop: Collection[str] = ()) -> list[onnx.NodeProto]:
    """The nodes of ``model`` (indexed by ``idx``) that computing ``names`` runs, in graph order.

    The walk upstream ends at graph inputs, initializers and the tensors in ``stop`` (values already known).
    """
    needed: set[int] = set()
    stack = list(names)
    while stack:
        t = stack.pop()
        node = idx.producer.get(t)
        if t not in stop and node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(x for x in node.input if x)
    return [n for n in model.graph.node if id(n) in needed]


def upstream_of(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that computes only ``names``: its outputs, and the nodes they depend on.

    ONNX Runtime runs every node of a graph whatever outputs are fetched; a probe that needs early
    tensors only runs this cut instead (same nodes, same values). Unused initializers are dropped;
    the graph inputs stay.

    Raises:
        GraphError: a name is not a tensor of the graph.
    """
    names = list(names)
    keep = needed_nodes(model, GraphIndex(model), names)
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    used = {t for n in keep for t in n.input} | set(names)
    del cut.graph.node[:], cut.graph.output[:], cut.graph.initializer[:]
    cut.graph.node.extend(keep)
    cut.graph.initializer.extend(t for t in model.graph.initializer if t.name in used)
    return add_outputs(cut, names)


def probe_session(model: onnx.ModelProto, threads: int):
    """An ONNX Runtime CPU session without graph optimisations, so every named tensor of ``model`` exists."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def chunks(batches: Iterable[np.ndarray], step: int | None) -> Iterator[tuple[int, np.ndarray]]:
    """(real images, chunk) of ``step`` images each (None: each batch whole); the last is padded with its last image.

    A model with a fixed batch dimension takes exactly ``step`` images; the padding rows follow the real ones.
    """
    for batch in batches:
        size = step or len(batch)
        for i in range(0, len(batch), size):
            chunk = np.ascontiguousarray(batch[i : i + size], dtype=np.float32)
            real = len(chunk)
            if real != size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - real, axis=0)])
            yield real, chunk
