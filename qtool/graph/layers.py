"""Layers of a quantization spec, and sub-specs that quantize only some nodes (mixed precision, searches).

A layer is a quantized node that computes (Conv, Gemm, Add, Concat...) together with the activation
and pass-through nodes (Relu, Clip, MaxPool, Resize...) that are quantized only because they follow
it; a layer stays float as a whole. A sub-spec keeps the Q/DQ its nodes need and nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import onnx

from qtool.graph._index import GraphIndex
from qtool.graph.policy import OP_RULES, ActivationSpec, QuantSpec


def layer_groups(model: onnx.ModelProto, spec: QuantSpec) -> dict[str, list[str]]:
    """Group the quantized nodes of ``spec`` into layers, in graph order.

    Returns:
        ``{layer name (its first node): [node names]}``; a follower joins the layer of the node
        producing its input 0, else starts its own.
    """
    idx = GraphIndex(model)
    owner: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.name not in spec.nodes:
            continue
        rule = OP_RULES.get(node.op_type)
        prod = idx.producer.get(node.input[0]) if node.input else None
        if rule is not None and rule.follows and prod is not None and prod.name in owner:
            layer = owner[prod.name]
        else:
            layer = node.name
            groups[layer] = []
        owner[node.name] = layer
        groups[layer].append(node.name)
    return groups


def node_tensors(model: onnx.ModelProto, spec: QuantSpec) -> dict[str, list[str]]:
    """Per quantized node, the calibrated tensors (range owners) whose ranges its Q/DQ use, in order."""
    acts = spec.activations
    out: dict[str, list[str]] = {}
    for node in model.graph.node:
        qn = spec.nodes.get(node.name)
        if qn is None:
            continue
        names = [node.input[s] for s in qn.inputs]
        if node.output and node.output[0] in acts:
            names.append(node.output[0])
        need: dict[str, None] = {}
        for t in names:
            a = acts.get(t)
            src = acts.get(a.range_of) if a is not None else None
            if a is not None and not a.constant and not (src is not None and src.constant):
                need[a.range_of] = None
        out[node.name] = list(need)
    return out


def subset(model: onnx.ModelProto, spec: QuantSpec, keep: Collection[str], reason: str) -> QuantSpec:
    """A copy of ``spec`` that quantizes only the nodes in ``keep``; the others stay float.

    Kept: those nodes, the activations they read or produce (with their original range owners, so
    the full spec's ranges still apply), their weights (with any rounded values) and int32 biases, and the
    weight range rule.
    Dropped nodes' decisions become float with ``reason``.
    """
    keep = set(keep)
    nodes = {n: q for n, q in spec.nodes.items() if n in keep}
    used: set[str] = set()
    weights: set[str] = set()
    for node in model.graph.node:
        qn = nodes.get(node.name)
        if qn is None:
            continue
        used.update(node.input[s] for s in qn.inputs)
        if node.output and node.output[0] in spec.activations:
            used.add(node.output[0])
        if qn.weight is not None:
            weights.add(node.input[qn.weight])
    out = QuantSpec(spec.profile, spec.activation_bits, spec.weight_bits, weight_range=spec.weight_range)
    out.activations = {t: ActivationSpec(a.params, a.range_of, a.constant)
                       for t, a in spec.activations.items() if t in used}
    out.weights = {w: p for w, p in spec.weights.items() if w in weights}
    out.weight_values = {w: v for w, v in spec.weight_values.items() if w in weights}
    out.biases = {n: b for n, b in spec.biases.items() if n in nodes}
    out.float_readers = spec.float_readers
    out.nodes = nodes
    out.decisions = [d if not d.quantized or d.node in nodes else dataclasses.replace(d, quantized=False, reason=reason)
                     for d in spec.decisions]
    return out
