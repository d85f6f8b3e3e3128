"""ONNX graph passes of qtool.

Load/save, prepare (shapes, BN fold, simplify), quantization policy and spec, QDQ insertion,
target-profile lint, float16 conversion, output probes for calibration, layer sub-specs and compute cost (MACs).
"""

from qtool.graph.cost import node_macs
from qtool.graph.fp16 import to_fp16
from qtool.graph.insert_qdq import insert_qdq, insert_qdq_report
from qtool.graph.io import load_model, save_model
from qtool.graph.layers import layer_groups, node_tensors, subset
from qtool.graph.lint import LintIssue, lint
from qtool.graph.policy import (
    OP_RULES,
    ActivationSpec,
    BiasSpec,
    NodeDecision,
    OpRule,
    QuantizedNode,
    QuantSpec,
    build_spec,
)
from qtool.graph.prepare import fix_input_shapes, fold_batchnorm, fuse_pad_into_conv, infer_shapes, prepare
from qtool.graph.probe import add_outputs
from qtool.graph.profiles import (
    PROFILES,
    QuantParams,
    TargetProfile,
    get_profile,
    quantize_array,
    scale_zero_point,
)

__all__ = [
    "OP_RULES",
    "PROFILES",
    "ActivationSpec",
    "BiasSpec",
    "LintIssue",
    "NodeDecision",
    "OpRule",
    "QuantParams",
    "QuantSpec",
    "QuantizedNode",
    "TargetProfile",
    "add_outputs",
    "build_spec",
    "fix_input_shapes",
    "fold_batchnorm",
    "fuse_pad_into_conv",
    "get_profile",
    "infer_shapes",
    "insert_qdq",
    "insert_qdq_report",
    "layer_groups",
    "lint",
    "load_model",
    "node_macs",
    "node_tensors",
    "prepare",
    "quantize_array",
    "save_model",
    "scale_zero_point",
    "subset",
    "to_fp16",
]
