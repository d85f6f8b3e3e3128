"""Multiply-accumulates per node (qtool.graph.node_macs), against counts worked out by hand."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtool.errors import GraphError
from qtool.graph import node_macs


def _model(nodes, inits, out_shape) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "cost", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(np.ones(s, np.float32), n) for n, s in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_grouped_conv_gemm_and_matmul_count_output_elements_times_reduced_elements():
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], "conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], "depthwise", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1], group=6),
        helper.make_node("MatMul", ["c2", "m"], ["mm"], "matmul"),
        helper.make_node("Relu", ["mm"], ["r"], "relu"),
        helper.make_node("Flatten", ["r"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "g"], ["y"], "gemm", transB=0),
    ]
    model = _model(nodes, [("w1", (6, 4, 3, 3)), ("w2", (6, 1, 3, 3)), ("m", (4, 5)), ("g", (6 * 4 * 5, 3))], [2, 3])
    assert node_macs(model) == {
        "conv": 2 * 6 * 8 * 8 * 4 * 3 * 3,  # output elements x input channels x kernel
        "depthwise": 2 * 6 * 4 * 4 * 1 * 3 * 3,  # one input channel per group, stride 2 halves each side
        "matmul": 2 * 6 * 4 * 5 * 4,  # (2, 6, 4, 4) x (4, 5): output elements x the reduced dim 4
        "gemm": 2 * 3 * 120,
    }


def test_a_graph_whose_shapes_cannot_be_inferred_is_a_one_line_graph_error():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], "conv", kernel_shape=[3, 3])]
    model = _model(nodes, [("w", (6, 4, 3, 3))], [2, 6, 5, 5])  # a 3x3 kernel without padding gives 6x6
    with pytest.raises(GraphError, match="shape inference failed"):
        node_macs(model)
