"""Check a QDQ graph against a target profile.

Every Q/DQ's dtype, zero point, granularity, bias type,
dangling Qs and (where the profile wants it) Q/DQ pairs that disagree. Each issue names its node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from qtool.graph._index import GraphIndex
from qtool.graph.policy import OP_RULES, weight_axis
from qtool.graph.profiles import DTYPES, QuantParams, TargetProfile, get_profile

_DTYPE_NAME = {v[0]: k for k, v in DTYPES.items()} | {TensorProto.INT32: "int32"}
_WEIGHT_OPS = {op for op, r in OP_RULES.items() if r.weight is not None}
_BIAS_OPS = {op for op, r in OP_RULES.items() if r.bias is not None}


@dataclass(frozen=True)
class LintIssue:
    """One violation: the node and what is wrong with it."""

    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: {self.message}"


class _Linter:
    def __init__(self, model: onnx.ModelProto, prof: TargetProfile) -> None:
        self.idx = GraphIndex(model)
        self.prof = prof
        self.act = prof.activation()
        self.issues: list[LintIssue] = []

    def issue(self, node: onnx.NodeProto, message: str) -> None:
        self.issues.append(LintIssue(node.name or f"<{node.op_type} -> {node.output[0]}>", message))

    def const(self, name: str) -> np.ndarray | None:
        if name in self.idx.initializers:
            return numpy_helper.to_array(self.idx.initializers[name])
        prod = self.idx.producer.get(name)
        if prod is not None and prod.op_type == "Constant":
            for a in prod.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def zp(self, node: onnx.NodeProto) -> tuple[int | None, np.ndarray | None]:
        """Element type and values of a Q/DQ zero point (absent: uint8 0, the ONNX default)."""
        if len(node.input) > 2 and node.input[2]:
            name = node.input[2]
            elem = self.idx.elem_type.get(name)
            if name in self.idx.initializers:
                elem = self.idx.initializers[name].data_type
            value = self.const(name)
            if elem is None and value is not None:
                elem = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
            return elem, value
        return TensorProto.UINT8, np.zeros((), np.uint8)

    def check_params(self, node: onnx.NodeProto, role: str, want: QuantParams) -> None:
        elem, zp = self.zp(node)
        if elem is not None and elem != want.onnx_type:
            got = _DTYPE_NAME.get(elem, TensorProto.DataType.Name(elem).lower())
            self.issue(node, f"{role} is {got}; profile {self.prof.name!r} wants {want.dtype}")
        if want.symmetric and zp is not None and np.any(zp.astype(np.int64) != want.symmetric_zero_point):
            self.issue(
                node,
                f"{role} zero point {zp.ravel()[:4].tolist()} is not {want.symmetric_zero_point} "
                f"(profile {self.prof.name!r} is symmetric)",
            )
        scale = self.const(node.input[1])
        if scale is not None and not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            self.issue(node, f"{role} scale is not finite and positive")

    def activation(self, node: onnx.NodeProto) -> None:
        self.check_params(node, "activation", self.act)
        scale = self.const(node.input[1])
        if scale is not None and scale.size != 1:
            self.issue(node, f"activation scale has {scale.size} values; activations must be per-tensor")

    def weight(self, node: onnx.NodeProto, consumer: onnx.NodeProto) -> None:
        w = self.const(node.input[0])
        self.check_params(node, "weight", self.prof.weight())
        scale = self.const(node.input[1])
        if w is None or scale is None:
            return
        want_axis = weight_axis(consumer, w.ndim)
        if not self.prof.per_channel_weights:
            if scale.size != 1:
                self.issue(node, f"weight has {scale.size} scales; profile {self.prof.name!r} wants per-tensor")
            return
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        axis = axis + w.ndim if axis < 0 else axis
        channels = w.shape[want_axis] if w.ndim else 1
        if scale.size != channels or (scale.size > 1 and axis != want_axis):
            self.issue(
                node,
                f"weight for {consumer.op_type} must be per-channel along axis {want_axis} "
                f"({channels} scales); got {scale.size} scale(s), axis {axis}",
            )

    def bias(self, node: onnx.NodeProto) -> None:
        if not self.prof.quantize_bias:
            self.issue(node, f"bias is quantized; profile {self.prof.name!r} keeps bias float")
            return
        elem, zp = self.zp(node)
        if elem != TensorProto.INT32:
            self.issue(node, "bias must be int32 (scale = input scale * weight scale)")
        if zp is not None and np.any(zp != 0):
            self.issue(node, "int32 bias zero point must be 0")

    def pair(self, dq: onnx.NodeProto) -> None:
        q = self.idx.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            self.issue(dq, "activation DequantizeLinear is not fed by a QuantizeLinear")
            return
        for k, what in ((1, "scale"), (2, "zero point")):
            a = self.const(q.input[k]) if len(q.input) > k and q.input[k] else None
            b = self.const(dq.input[k]) if len(dq.input) > k and dq.input[k] else None
            if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b)):
                self.issue(dq, f"{what} differs from its QuantizeLinear {q.name!r}")

    def run(self, model: onnx.ModelProto) -> list[LintIssue]:
        for node in model.graph.node:
            if node.op_type == "QuantizeLinear":
                self.activation(node)
                users = self.idx.consumers.get(node.output[0], [])
                if not users or any(u.op_type != "DequantizeLinear" for u, _ in users):
                    self.issue(node, f"QuantizeLinear output {node.output[0]!r} is not read only by DequantizeLinear")
            elif node.op_type == "DequantizeLinear":
                self.dequantize(node)
        return self.issues

    def dequantize(self, node: onnx.NodeProto) -> None:
        if node.input[0] not in self.idx.initializers:
            self.activation(node)
            if self.prof.strict_qdq_pairs:
                self.pair(node)
            return
        users = self.idx.consumers.get(node.output[0], [])
        for user, slot in users:
            if user.op_type in _WEIGHT_OPS and slot == OP_RULES[user.op_type].weight:
                return self.weight(node, user)
            if user.op_type in _BIAS_OPS and slot == OP_RULES[user.op_type].bias:
                return self.bias(node)
        self.activation(node)  # a constant quantized like an activation (Add/Mul/Concat operand)


def lint(model: onnx.ModelProto, profile: str | TargetProfile) -> list[LintIssue]:
    """Check every QuantizeLinear/DequantizeLinear of ``model`` against ``profile``.

    Returns:
        The issues found (empty when the graph is legal for the profile).

    Raises:
        RegistryError: unknown profile name.
    """
    prof = get_profile(profile)
    return _Linter(model, prof).run(model)
