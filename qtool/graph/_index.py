"""Read-only index of an ONNX graph (producers, consumers, initializers, types) and small edit helpers.

Internal to ``qtool.graph``: the passes share it instead of each re-walking the graph.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from typing import Any

import onnx
from onnx import TensorProto

from qtool.errors import GraphError

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})


class GraphIndex:
    """Maps of one graph, built once; rebuild it after editing the graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.model = model
        self.initializers = {t.name: t for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in g.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for i, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, i))
        self.graph_inputs = [i.name for i in g.input if i.name not in self.initializers]
        self.graph_outputs = {o.name for o in g.output}
        self.elem_type: dict[str, int] = {}
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self.elem_type[vi.name] = vi.type.tensor_type.elem_type
        for t in g.initializer:
            self.elem_type[t.name] = t.data_type

    def is_float(self, name: str) -> bool:
        """True if ``name`` is a floating-point tensor (unknown types count as float)."""
        return self.elem_type.get(name, TensorProto.FLOAT) in FLOAT_TYPES

    def opset(self, domain: str = "") -> int:
        """The model's opset for ``domain`` ("" and "ai.onnx" are the default domain), 0 if absent."""
        for op in self.model.opset_import:
            if op.domain in (domain, "ai.onnx" if domain == "" else domain):
                return op.version
        return 0


def node_attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of ``node``'s attribute ``name``, or ``default`` when it has none."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def require_node_names(model: onnx.ModelProto) -> None:
    """Raise GraphError unless every node has a unique, non-empty name (part globs match names)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name:
            raise GraphError(f"node #{i} ({node.op_type}) has no name; run qtool.graph.prepare first")
        if node.name in seen:
            raise GraphError(f"node name {node.name!r} is used twice; run qtool.graph.prepare first")
        seen.add(node.name)


def name_nodes(model: onnx.ModelProto) -> int:
    """Give unnamed or duplicate-named nodes a unique name in place; return how many were renamed."""
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(model.graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or f"{node.op_type}_{i}"
        name, k = base, 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        seen.add(name)
        renamed += 1
    return renamed


class NameScope:
    """Hands out tensor/node names that do not clash with the graph's existing ones."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.taken = {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
        for node in g.node:
            self.taken.add(node.name)
            self.taken.update(node.input)
            self.taken.update(node.output)

    def new(self, base: str) -> str:
        """Return ``base`` or ``base_1``, ``base_2`` ... whichever is free, and reserve it."""
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name


def topo_sort(model: onnx.ModelProto) -> None:
    """Reorder ``model.graph.node`` topologically in place, keeping the original order where possible.

    Raises:
        GraphError: if the graph has a cycle or reads a tensor nobody produces.
    """
    g = model.graph
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    nodes = list(g.node)
    producer = {out: k for k, n in enumerate(nodes) for out in n.output if out}
    deps: list[set[int]] = []
    users: dict[int, list[int]] = defaultdict(list)
    for k, node in enumerate(nodes):
        d = set()
        for name in node.input:
            if name in available:
                continue
            if name not in producer:
                raise GraphError(f"node {node.name!r} reads tensor {name!r} that no node produces")
            d.add(producer[name])
        deps.append(d)
        for p in d:
            users[p].append(k)
    missing = [len(d) for d in deps]
    ready = [k for k in range(len(nodes)) if missing[k] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users[k]:
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise GraphError("graph has a cycle; cannot order its nodes")
    del g.node[:]
    g.node.extend(nodes[k] for k in order)


def remove_unused_initializers(model: onnx.ModelProto) -> None:
    """Drop initializers (and their graph-input entries) that no node or graph output reads."""
    g = model.graph
    used = {name for node in g.node for name in node.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    dropped = {t.name for t in g.initializer} - {t.name for t in keep}
    if not dropped:
        return
    del g.initializer[:]
    g.initializer.extend(keep)
    inputs = [i for i in g.input if i.name not in dropped]
    del g.input[:]
    g.input.extend(inputs)
