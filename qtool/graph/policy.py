"""Quantization policy: which tensors of a graph get Q/DQ, with which params, and why.

From an ONNX graph, a PtqConfig and a target profile, build the QuantSpec: Q/DQ'd tensors with their
params, and why every node is quantized or kept float.

Placement follows onnxruntime's QDQ conventions (onnxruntime/quantization/registry.py QDQRegistry) so
that ORT's optimizer fuses DQ -> Conv -> Q into QLinearConv, DQ -> Add -> Q into QLinearAdd, etc.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

import numpy as np
import onnx

from qtool.errors import GraphError
from qtool.graph._index import GraphIndex, node_attr, require_node_names
from qtool.graph.profiles import QuantParams, TargetProfile, get_profile
from qtool.recipe import PtqConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpRule:
    """How one op type is quantized.

    Attributes:
        inputs: activation input slots that read a dequantized tensor (None: every float input).
        weight: slot of a constant weight quantized offline per channel.
        bias: slot of a bias quantized to int32 (when the profile asks for it).
        output: "own" calibrated range, "input" (shares input 0's params: ORT's QDQ propagation
            through MaxPool/Resize/Reshape/...), or "none".
        follows: quantized only when input 0 is already quantized (pass-through ops and activations).
        takes_output_range: input 0 takes this node's output range (ORT's adjust_tensor_ranges for
            Relu/Clip, so the Conv before it saturates exactly like the activation).
    """

    inputs: tuple[int, ...] | None = (0,)
    weight: int | None = None
    bias: int | None = None
    output: Literal["own", "input", "none"] = "own"
    follows: bool = False
    takes_output_range: bool = False


_WEIGHTED = OpRule(weight=1, bias=2)
_PASS = OpRule(output="input", follows=True)
_ACT = OpRule(follows=True, takes_output_range=True)
_EVERY_INPUT = OpRule(inputs=None)

OP_RULES: dict[str, OpRule] = {
    "Conv": _WEIGHTED,
    "ConvTranspose": _WEIGHTED,
    "Gemm": _WEIGHTED,
    "MatMul": OpRule(inputs=(0, 1), weight=1),  # B is a weight when constant, else an activation
    "Add": _EVERY_INPUT,
    "Mul": _EVERY_INPUT,
    "Concat": _EVERY_INPUT,
    "GlobalAveragePool": OpRule(),
    "Sigmoid": OpRule(),
    "Relu": _ACT,
    "Clip": _ACT,
    "MaxPool": _PASS,
    "AveragePool": _PASS,
    "Resize": _PASS,
    "Reshape": _PASS,
    "Transpose": _PASS,
    "Flatten": _PASS,
    "Squeeze": _PASS,
    "Unsqueeze": _PASS,
    "Pad": _PASS,  # constant zero padding (tf "same" convs); zero is exact in every profile
}
# ops that never carry float activations worth a warning when left float
SILENT_OPS = frozenset({"Constant", "Shape", "Size", "Identity", "Cast", "ConstantOfShape", "Range", "Dropout"})


def weight_axis(node: onnx.NodeProto, rank: int) -> int:
    """Output-channel axis of a weight: Conv 0, ConvTranspose 1, Gemm 0 if transB else 1, MatMul last."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if node_attr(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return rank - 1
    return 0


@dataclass
class ActivationSpec:
    """One activation tensor to quantize.

    Its params, the tensor whose calibrated range sets them, and whether it is a constant (an
    initializer, quantized offline from its own values).
    """

    params: QuantParams
    range_of: str
    constant: bool = False


@dataclass(frozen=True)
class BiasSpec:
    """An int32 bias: its initializer, and the activation and weight whose scales multiply into its scale."""

    tensor: str
    input: str
    weight: str


@dataclass(frozen=True)
class QuantizedNode:
    """A node that runs on dequantized inputs: its activation slots, weight slot and bias slot."""

    name: str
    op_type: str
    inputs: tuple[int, ...]
    weight: int | None
    bias: int | None


@dataclass(frozen=True)
class NodeDecision:
    """Why a node is quantized or kept float."""

    node: str
    op_type: str
    part: str | None
    quantized: bool
    reason: str


@dataclass
class QuantSpec:
    """The quantization spec of one graph for one target profile (what insert_qdq and QAT lower)."""

    profile: TargetProfile
    activation_bits: int
    weight_bits: int
    activations: dict[str, ActivationSpec] = field(default_factory=dict)
    weights: dict[str, QuantParams] = field(default_factory=dict)
    biases: dict[str, BiasSpec] = field(default_factory=dict)
    nodes: dict[str, QuantizedNode] = field(default_factory=dict)
    decisions: list[NodeDecision] = field(default_factory=list)
    weight_range: str = "minmax"  # the weight range rule (qtool.graph.weight_ranges) for weights not given a range
    # float values quantized in place of a weight's initializer (its grid still comes from the initializer):
    # how qtool.weight_rounding hands a rounding other than nearest to insert_qdq
    weight_values: dict[str, np.ndarray] = field(default_factory=dict)
    # float nodes that read a quantized node's output before its Q/DQ (ptq.head_inputs=float: the head's);
    # a tensor only such nodes read gets no Q/DQ (build_spec leaves it out of ``activations``)
    float_readers: frozenset[str] = frozenset()

    def reads_dequantized(self, node: str, producer_quantized: bool) -> bool:
        """Whether float node ``node`` reads a tensor's dequantized value (the quantized producer's Q/DQ)."""
        return producer_quantized and node not in self.float_readers

    @property
    def emulated(self) -> bool:
        """True when a width below 8 bits is simulated (no integer kernels exist for it)."""
        return self.activation_bits < 8 or self.weight_bits < 8

    def tensors_to_calibrate(self) -> list[str]:
        """Activation tensors whose calibrated ranges insert_qdq needs, in graph order."""
        out: dict[str, None] = {}
        for a in self.activations.values():
            src = self.activations.get(a.range_of)  # absent in a sub-spec (qtool.graph.layers.subset)
            if not a.constant and not (src is not None and src.constant):
                out[a.range_of] = None
        return list(out)

    def tensors_at_activation_width(self) -> list[str]:
        """:meth:`tensors_to_calibrate` less those quantized at another width than the activations.

        Those (the graph input under ``ptq.input_bits``) get their ranges from a calibrator at their own width
        (:func:`qtool.calibrate.input_ranges`), so a search among activation-width candidates leaves them alone.
        """
        return [t for t in self.tensors_to_calibrate()
                if t not in self.activations or self.activations[t].params.bits == self.activation_bits]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view for the run report."""
        return {
            "profile": self.profile.name,
            "activation_bits": self.activation_bits,
            "weight_bits": self.weight_bits,
            "weight_range": self.weight_range,
            "rounded_weights": sorted(self.weight_values),
            "float_readers": sorted(self.float_readers),
            "emulated": self.emulated,
            "activations": {
                k: {**a.params.to_dict(), "range_of": a.range_of, "constant": a.constant}
                for k, a in self.activations.items()
            },
            "weights": {k: p.to_dict() for k, p in self.weights.items()},
            "biases": {k: vars(b) for k, b in self.biases.items()},
            "decisions": [vars(d) for d in self.decisions],
        }


def _part_of(name: str, part_globs: dict[str, list[str]]) -> str | None:
    for part, globs in part_globs.items():
        if any(fnmatchcase(name, g) for g in globs):
            return part
    return None


def _float_reason(node: onnx.NodeProto, cfg: PtqConfig, part: str | None, selected: set[str],
                  profile: TargetProfile) -> str | None:
    for g in cfg.exclude_nodes:
        if fnmatchcase(node.name, g):
            return f"excluded by ptq.exclude_nodes glob {g!r}"
    if node.op_type in cfg.exclude_op_types:
        return "op type in ptq.exclude_op_types"
    if part is None:
        return "in no part of ptq.part_globs"
    if part not in selected:
        if part == "head":
            return "head kept float (ptq.quantize_head is false)"
        return f"part {part!r} not selected (ptq.quantize={cfg.quantize})"
    if node.op_type in profile.float_ops:
        return f"{profile.float_ops_reason} (profile {profile.name!r})"
    return None


def build_spec(model: onnx.ModelProto, cfg: PtqConfig, profile: str | TargetProfile | None = None) -> QuantSpec:
    """Decide what to quantize in ``model`` (a prepared graph with unique node names).

    Args:
        model: the float graph (run ``prepare`` first).
        cfg: the recipe's ptq section: parts, exclusions, bit widths, strictness.
        profile: a TargetProfile or its name; default ``cfg.target``.

    Returns:
        The QuantSpec, with one decision per node.

    Raises:
        GraphError: unnamed nodes, an already quantized graph, or with ``cfg.strict`` a node in a
            quantized part whose op has no rule.
        RegistryError: unknown profile name.
    """
    prof = get_profile(profile if profile is not None else cfg.target)
    require_node_names(model)
    done = next((n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")), None)
    if done is not None:
        raise GraphError(f"graph is already quantized (node {done.name!r} is {done.op_type}); give the float model")
    try:
        typed = onnx.shape_inference.infer_shapes(model)
    except Exception:  # element types are a nicety here; prepare() already ran the strict inference
        typed = model
    idx = GraphIndex(typed)
    selected = {"student", "teacher"} if cfg.quantize == "both" else {cfg.quantize}
    if cfg.quantize_head:
        selected.add("head")
    act = prof.activation(cfg.activation_bits)
    spec = QuantSpec(prof, cfg.activation_bits, cfg.weight_bits, weight_range=cfg.weight_range)
    unsupported: list[onnx.NodeProto] = []

    def decide(node: onnx.NodeProto, part: str | None, reason: str | None) -> None:
        spec.decisions.append(NodeDecision(node.name, node.op_type, part, reason is None, reason or "quantized"))

    for node in typed.graph.node:
        part = _part_of(node.name, cfg.part_globs)
        reason = _float_reason(node, cfg, part, selected, prof)
        rule = OP_RULES.get(node.op_type)
        if reason is None and rule is None:
            if node.op_type not in SILENT_OPS and any(idx.is_float(o) for o in node.output if o):
                unsupported.append(node)
            reason = "unsupported op"
        elif reason is None and rule.follows and node.input[0] not in spec.activations:
            reason = "input not quantized"
        w_slot = None
        if reason is None and rule.weight is not None and len(node.input) > rule.weight:
            w = node.input[rule.weight]
            if w in idx.initializers and idx.is_float(w):
                w_slot = rule.weight
            elif node.op_type != "MatMul":
                reason = f"weight {w!r} is not a constant initializer"
        if reason is not None:
            decide(node, part, reason)
            continue
        _quantize_node(node, rule, w_slot, idx, spec, act, cfg)
        decide(node, part, None)

    for a in spec.activations.values():  # resolve shared ranges to the tensor that owns one
        seen = set()
        while spec.activations[a.range_of].range_of != a.range_of and a.range_of not in seen:
            seen.add(a.range_of)
            a.range_of = spec.activations[a.range_of].range_of
    _report_unsupported(unsupported, cfg.strict)
    if cfg.input_bits is not None and cfg.input_bits != cfg.activation_bits:
        wide = prof.activation(cfg.input_bits)
        for a in spec.activations.values():
            if a.range_of in idx.graph_inputs:
                a.params = wide
    if cfg.head_inputs == "float":
        _head_reads_float(spec, idx)
    return spec


def _head_reads_float(spec: QuantSpec, idx: GraphIndex) -> None:
    """ptq.head_inputs=float: the float head reads its features before their Q/DQ.

    A tensor whose every reader is such a node loses its Q/DQ (no quantized reader is left); its range
    may still set another tensor's (``range_of``), so it stays calibrated.
    """
    head = {d.node for d in spec.decisions if d.part == "head" and not d.quantized}
    spec.float_readers = frozenset(head)
    position = {d.node: i for i, d in enumerate(spec.decisions)}
    for t in [t for t, a in spec.activations.items() if not a.constant]:
        readers = idx.consumers.get(t, [])
        if readers and all(n.name in head for n, _ in readers) and t not in idx.graph_outputs:
            del spec.activations[t]
            i = position[idx.producer[t].name]
            spec.decisions[i] = dataclasses.replace(
                spec.decisions[i], reason="quantized; output read only by the float head, kept float "
                                          "(ptq.head_inputs=float)")


def _quantize_node(
    node: onnx.NodeProto,
    rule: OpRule,
    w_slot: int | None,
    idx: GraphIndex,
    spec: QuantSpec,
    act: QuantParams,
    cfg: PtqConfig,
) -> None:
    slots = range(len(node.input)) if rule.inputs is None else rule.inputs
    b_slot = rule.bias if rule.bias is not None and w_slot is not None else None
    act_slots = tuple(
        s
        for s in slots
        if s < len(node.input) and node.input[s] and s not in (w_slot, b_slot) and idx.is_float(node.input[s])
    )
    for s in act_slots:
        name = node.input[s]
        if name not in spec.activations:
            spec.activations[name] = ActivationSpec(act, name, constant=name in idx.initializers)
    if w_slot is not None:
        w = node.input[w_slot]
        rank = len(idx.initializers[w].dims)
        spec.weights.setdefault(w, spec.profile.weight(cfg.weight_bits, weight_axis(node, rank)))
    quant_bias = (
        b_slot is not None
        and spec.profile.quantize_bias
        and 0 in act_slots
        and len(node.input) > b_slot
        and node.input[b_slot] in idx.initializers
        and node_attr(node, "alpha", 1.0) == 1.0
        and node_attr(node, "beta", 1.0) == 1.0
    )
    if quant_bias:
        spec.biases[node.name] = BiasSpec(node.input[b_slot], node.input[0], node.input[w_slot])
    out = node.output[0] if node.output else ""
    if rule.output != "none" and out and out not in idx.graph_outputs and idx.is_float(out):
        spec.activations[out] = ActivationSpec(act, node.input[0] if rule.output == "input" else out)
        x = node.input[0]
        if (
            rule.takes_output_range
            and len(idx.consumers[x]) == 1
            and x not in idx.graph_outputs
            and spec.activations[x].range_of == x
            and not spec.activations[x].constant
        ):
            spec.activations[x].range_of = out
    spec.nodes[node.name] = QuantizedNode(node.name, node.op_type, act_slots, w_slot, b_slot if quant_bias else None)


def _report_unsupported(nodes: list[onnx.NodeProto], strict: bool) -> None:
    if not nodes:
        return
    first = nodes[0]
    if strict:
        raise GraphError(
            f"node {first.name!r} ({first.op_type}) in a quantized part has no quantization rule "
            f"(supported: {', '.join(sorted(OP_RULES))}); exclude it with ptq.exclude_nodes or "
            f"ptq.exclude_op_types, or set ptq.strict=false"
        )
    shown = ", ".join(f"{n.name} ({n.op_type})" for n in nodes[:5])
    more = f" and {len(nodes) - 5} more" if len(nodes) > 5 else ""
    log.warning(
        "%d node(s) in quantized parts have no quantization rule and stay float: %s%s",
        len(nodes),
        shown,
        more,
    )
