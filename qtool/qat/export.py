"""Lower a QAT model to the same QDQ ONNX as PTQ: trained weights into the float graph, then insert_qdq.

The float graph is the one the spec was built from (``qtool.export`` + ``prepare``), so the QDQ
structure is PTQ's node for node by construction. The trained (BatchNorm-folded) weights and biases
overwrite their initializers, the learned activation ranges go to ``insert_qdq`` as calibrated
ranges (it recomputes the same scale and zero point), and learned weight scales, when LSQ is on,
replace the min/max ones (int32 biases are requantized with them).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from qtool.graph.insert_qdq import insert_qdq_report
from qtool.graph.profiles import quantize_array
from qtool.qat.insert import QatModel
from qtool.qat.trace import QatError

log = logging.getLogger(__name__)
_INT32 = np.iinfo(np.int32)


def trained_float_graph(qm: QatModel, float_model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``float_model`` with the trained parts' weights and biases written into their initializers.

    Raises:
        QatError: an initializer shared by several nodes would get two different values.
    """
    m = onnx.ModelProto()
    m.CopyFrom(float_model)
    values = qm.trained_initializers()
    readers: dict[str, int] = {}
    for node in m.graph.node:
        for name in set(node.input):
            readers[name] = readers.get(name, 0) + 1
    for init in m.graph.initializer:
        if init.name not in values:
            continue
        new = values[init.name]
        old = numpy_helper.to_array(init)
        if new.shape != old.shape:
            raise QatError(f"trained value of initializer {init.name!r} has shape {new.shape}, graph has {old.shape}")
        if readers.get(init.name, 0) > 1 and not np.array_equal(new, old):
            raise QatError(f"initializer {init.name!r} is shared by {readers[init.name]} nodes; cannot write its "
                           f"trained value for one of them")
        init.CopyFrom(numpy_helper.from_array(new.astype(old.dtype), init.name))
    return m


def _const(m: onnx.ModelProto, name: str) -> onnx.TensorProto:
    for t in m.graph.initializer:
        if t.name == name:
            return t
    raise QatError(f"initializer {name!r} not found in the QDQ graph")


def _learned_weight_scales(qm: QatModel, qdq: onnx.ModelProto, report: dict[str, Any],
                           floats: dict[str, np.ndarray]) -> int:
    """Replace min/max weight scales by the learned ones (and requantize int32 biases); return how many."""
    producer = {o: n for n in qdq.graph.node for o in n.output}
    nodes = {n.name: n for n in qdq.graph.node}
    done = 0
    for w, wq in qm.weights.items():
        site = qm.smap.weights[w]
        if not wq.learnable or site.part in qm.frozen_parts:
            continue
        node = nodes[site.node]
        dq = producer[node.input[1]]
        latent = qm.latent_weight(w).detach().numpy().astype(np.float32)
        latent = latent.T if site.transpose else latent
        scale = wq.get_scale().detach().numpy().astype(np.float32)
        zp = wq.zero_point.numpy().astype(wq.params.np_type)
        params = wq.params  # its axis is the ONNX one
        if wq.axis is None:
            scale, zp = scale.reshape(()), zp.reshape(())
        q = quantize_array(latent, scale, zp, params)
        for name, value in zip(dq.input, (q, scale, zp)):
            _const(qdq, name).CopyFrom(numpy_helper.from_array(value, name))
        report["weights"][w].update(scale_min=float(scale.min()), scale_max=float(scale.max()), learned=True)
        if len(node.input) > 2 and node.input[2] in producer and producer[node.input[2]].op_type == "DequantizeLinear":
            _requantize_bias(qdq, producer, node, scale, floats[site.bias])
        done += 1
    return done


def _requantize_bias(qdq: onnx.ModelProto, producer: dict[str, onnx.NodeProto], node: onnx.NodeProto,
                     w_scale: np.ndarray, bias: np.ndarray) -> None:
    """int32 bias with scale input_scale * learned weight scale (as insert_qdq does with min/max scales)."""
    bias_dq = producer[node.input[2]]
    in_dq = producer[node.input[0]]
    in_scale = numpy_helper.to_array(_const(qdq, in_dq.input[1])).astype(np.float32)
    s_old = numpy_helper.to_array(_const(qdq, bias_dq.input[1]))
    bias = bias.astype(np.float64)
    scale = (in_scale * w_scale).astype(np.float32)
    q = np.round(bias / scale.astype(np.float64))
    if np.any(q > _INT32.max) or np.any(q < _INT32.min):
        log.warning("bias of %s saturates int32 with the learned weight scales", node.name)
    q = np.clip(q, _INT32.min, _INT32.max).astype(np.int32)
    _const(qdq, bias_dq.input[0]).CopyFrom(numpy_helper.from_array(q, bias_dq.input[0]))
    _const(qdq, bias_dq.input[1]).CopyFrom(numpy_helper.from_array(scale.reshape(s_old.shape), bias_dq.input[1]))


def export_qdq(qm: QatModel, float_model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The QDQ ONNX of a QAT model.

    Args:
        qm: the (trained) QAT model.
        float_model: the prepared float graph ``qm.spec`` was built from.

    Returns:
        (QDQ model, insert_qdq's report plus ``learned_weight_scales``).

    Raises:
        QatError: trained values that do not fit the graph. GraphError: from insert_qdq.
    """
    graph = trained_float_graph(qm, float_model)
    qdq, report = insert_qdq_report(graph, qm.spec, qm.ranges())
    floats = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    report["learned_weight_scales"] = _learned_weight_scales(qm, qdq, report, floats)
    return qdq, report
