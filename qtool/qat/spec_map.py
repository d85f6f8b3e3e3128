"""Map an ONNX QuantSpec back onto the fx graphs of a KD model's parts.

ONNX nodes are matched to fx nodes by the module path in their name (the exporter's scope chain,
``/student/body/blocks.1/blocks.1.0/conv_dw/Conv`` <-> ``student.body.blocks.1.0.conv_dw``) and by op
type; nodes of one scope are told apart by which already-matched tensors they read (graph position),
then by program order. An ONNX node inside a leaf module call (the Pad of timm's Conv2dSame) is
"internal" to that leaf. Each spec activation then gets its fake-quant uses with the same semantics as
``insert_qdq``: after a quantized producer every reader but the spec's float readers (the head, with
``ptq.head_inputs=float``) sees the fake-quantized tensor; otherwise only the quantized consumers do. A
fake-quant that would sit inside a leaf, after an exactly commuting op (zero Pad, MaxPool, reshapes),
moves in front of it, which gives the same numbers. Anything that cannot be placed raises
:class:`SpecMapError` naming the ONNX node or tensor.
"""

from __future__ import annotations

import logging
import operator
from collections import defaultdict
from typing import Any

import onnx
from torch import fx, nn

from qtool.graph.policy import QuantSpec
from qtool.qat.fold import fold_batchnorm
from qtool.qat.sites import ActivationSite, FqUse, FxSite, SpecMap, WeightSite
from qtool.qat.trace import (
    QatError,
    SpecMapError,
    call_sites,
    input_nodes,
    is_weighted,
    onnx_chain,
    onnx_kinds,
    scope_chain,
    trace_part,
    weight_axis,
)

log = logging.getLogger(__name__)

# ops a fake-quant commutes with exactly (monotone or data-moving, zero preserved)
EXACT_PASS = frozenset({"Pad", "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
WEIGHT_OPS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2, "MatMul": None}  # op -> bias slot


class _RootLinks(fx.Tracer):
    """Traces the KD model's forward with its parts as leaves, to see what feeds each part."""

    def __init__(self, parts: set[nn.Module]) -> None:
        super().__init__()
        self.parts = parts

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m in self.parts or super().is_leaf_module(m, module_qualified_name)


class _Mapper:
    def __init__(self, model: nn.Module, onnx_model: onnx.ModelProto, spec: QuantSpec) -> None:
        g = onnx_model.graph
        self.model, self.spec = model, spec
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for n in g.node:
            for i, t in enumerate(n.input):
                if t:
                    self.consumers[t].append((n, i))
        inputs = [i.name for i in g.input if i.name not in self.inits]
        if len(inputs) != 1:
            raise SpecMapError(f"QAT needs a graph with one input; got {inputs}")
        self.input_name = inputs[0]
        part_of = {d.node: d.part for d in spec.decisions}
        self.part_nodes: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in g.node:
            if part_of.get(n.name):
                self.part_nodes[part_of[n.name]].append(n)
        self.parts: dict[str, fx.GraphModule] = {}
        self.vm: dict[str, dict[str, fx.Node]] = {}
        self.nodes: dict[str, FxSite] = {}

    # ---- tracing and node matching -------------------------------------------------------------
    def run(self) -> SpecMap:
        quantized_parts = {d.part for d in self.spec.decisions if d.quantized}
        for p in sorted(quantized_parts):
            if not isinstance(getattr(self.model, p, None), nn.Module):
                raise SpecMapError(f"quantized part {p!r} is not a submodule of {type(self.model).__name__}")
        # installed: parts with quantized nodes, and trained parts (their folded weights are exported);
        # the others are traced when possible only to link parts (a decoder reading encoder outputs)
        candidates = [p for p in self.part_nodes if isinstance(getattr(self.model, p, None), nn.Module)]
        needed = [p for p in candidates if p in quantized_parts
                  or any(q.requires_grad for q in getattr(self.model, p).parameters())]
        for p in candidates:
            try:
                self.parts[p] = trace_part(getattr(self.model, p), p)
            except QatError:
                if p in needed:
                    raise
                log.debug("part %s is not traceable; it is only needed for linking", p)
                continue
            fold_batchnorm(self.parts[p])
        self._map_parts(list(self.parts), candidates)
        self._inner_ops()
        acts = {t: self._place(t) for t, a in self.spec.activations.items()}
        weights, extras = self._weights()
        installed = {p: self.parts[p] for p in needed}
        weights = {w: site for w, site in weights.items() if site.part in installed}
        extras = {t: site for t, site in extras.items() if site[0] in installed}
        return SpecMap(self.spec, self.input_name, installed, self.nodes, acts, weights, extras)

    def _inner_ops(self) -> None:
        """ONNX nodes left unmatched whose every reader sits in one fx call are ops inside that call.

        (``torch.stack`` exports as Unsqueeze + Concat, ``F.normalize`` as ReduceL2 + Clip + Expand + Div.)
        """
        for part, nodes in self.part_nodes.items():
            for node in reversed(nodes):
                if node.name in self.nodes:
                    continue
                sites = {self.nodes.get(c.name) for o in node.output if o for c, _ in self.consumers[o]}
                if len(sites) == 1 and (site := sites.pop()) is not None and site.part == part:
                    self.nodes[node.name] = FxSite(site.part, site.node, internal=True)

    def _map_parts(self, names: list[str], leaves: list[str]) -> None:
        """Map the parts in call order, binding their placeholders to the graph input or other parts' outputs."""
        mods = {getattr(self.model, p) for p in leaves}
        try:
            root = _RootLinks(mods).trace(self.model)
        except Exception as e:  # the parts alone still work when each reads the image
            log.info("root forward not traceable (%s); every part reads the graph input", str(e).splitlines()[0])
            root = fx.Graph()
        val: dict[fx.Node, Any] = {}
        for node in root.nodes:
            if node.op == "placeholder":
                val[node] = self.input_name if not val else None
            elif node.op == "call_module" and node.target in names:
                self._map_part(node.target, [fx.node.map_arg(a, lambda n: val.get(n)) for a in node.args])
                val[node] = self._outputs(node.target)
            elif node.op == "call_function" and node.target is operator.getitem:
                src, key = node.args
                try:
                    val[node] = val.get(src)[key]
                except (TypeError, IndexError, KeyError):
                    val[node] = None
        for p in names:
            self._map_part(p, [self.input_name])

    def _outputs(self, part: str) -> Any:
        inv = {v: t for t, v in self.vm[part].items()}
        out = next(n for n in self.parts[part].graph.nodes if n.op == "output")
        return fx.node.map_arg(out.args[0], lambda n: inv.get(n))

    def _map_part(self, part: str, feeds: list[Any]) -> None:
        if part in self.vm:
            return
        gm = self.parts[part]
        vm: dict[str, fx.Node] = {}
        self.vm[part] = vm
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for ph, feed in zip(phs, feeds):
            self._bind(ph, feed, vm)
        by_chain: dict[tuple[str, ...], list[fx.Node]] = defaultdict(list)
        kinds = {}
        for n in call_sites(gm):
            by_chain[scope_chain(n, part)].append(n)
            kinds[n] = onnx_kinds(n, gm)
        taken: set[fx.Node] = set()
        for node in self.part_nodes[part]:
            chain = onnx_chain(node.name)
            known = [vm[t] for t in node.input if t in vm]
            cands = [n for n in by_chain.get(chain, []) if node.op_type in kinds[n] and n not in taken]
            if cands:
                best = _by_inputs(cands, known)
                taken.add(best)
                self.nodes[node.name] = FxSite(part, best.name)
                if node.output and node.output[0]:
                    vm[node.output[0]] = best
                continue
            leaves = [n for n in by_chain.get(chain, []) if n.op == "call_module"]
            if leaves:
                self.nodes[node.name] = FxSite(part, _by_inputs(leaves, known).name, internal=True)

    def _bind(self, node: fx.Node, feed: Any, vm: dict[str, fx.Node]) -> None:
        if isinstance(feed, str):
            vm.setdefault(feed, node)
        elif isinstance(feed, (list, tuple)):
            for user in node.users:
                if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
                    if 0 <= user.args[1] < len(feed):
                        self._bind(user, feed[user.args[1]], vm)

    # ---- activations ---------------------------------------------------------------------------
    def _place(self, t: str) -> ActivationSite:
        a = self.spec.activations[t]
        site = ActivationSite(t, a.range_of, a.params)
        if a.constant:
            reader = self.consumers[t][0][0].name if self.consumers[t] else t
            raise SpecMapError(f"constant activation {t!r} (read by {reader!r}) is not supported by QAT")
        prod = self.producer.get(t)
        if prod is not None and prod.name in self.spec.nodes:
            ps = self.nodes.get(prod.name)
            if ps is None:
                raise SpecMapError(f"quantized node {prod.name!r} ({prod.op_type}) has no counterpart in the fx graph")
            if ps.internal:
                for c, _ in self.consumers[t]:
                    cs = self.nodes.get(c.name)
                    if cs is None or cs.node != ps.node:
                        raise SpecMapError(f"tensor {t!r} leaves the leaf module call of {prod.name!r} and cannot "
                                           f"be fake-quantized there")
                self._relocate(site, prod, ps)
                return site
            if not any(c.name in self.spec.float_readers for c, _ in self.consumers[t]):
                site.uses.append(FqUse(ps.part, self.vm[ps.part][t].name, None))
                site.how = "output"
                return site
            # the head reads it in float (ptq.head_inputs=float): every other reader sees the fake-quant
        qn = self.spec.nodes
        produced_quantized = prod is not None and prod.name in qn
        for c, slot in self.consumers[t]:
            if not ((c.name in qn and slot in qn[c.name].inputs)
                    or self.spec.reads_dequantized(c.name, produced_quantized)):
                continue
            cs = self.nodes.get(c.name)
            if cs is None:
                raise SpecMapError(f"node {c.name!r} ({c.op_type}) reads {t!r} quantized and is not in the fx graph")
            value = self.vm[cs.part].get(t)
            if value is not None:
                site.uses.append(FqUse(cs.part, value.name, (cs.node,)))
                site.how = site.how or "consumers"
            elif prod is not None and self.nodes.get(prod.name) == FxSite(cs.part, cs.node, True):
                self._relocate(site, prod, cs)
            else:
                raise SpecMapError(f"tensor {t!r} read by quantized node {c.name!r} has no counterpart in the fx graph")
        if not site.uses:
            raise SpecMapError(f"activation {t!r} has no quantized reader in the fx graph")
        return site

    def _relocate(self, site: ActivationSite, prod: onnx.NodeProto, leaf: FxSite) -> None:
        """Fake-quantize in front of the leaf call instead, through exactly commuting ops inside it."""
        seen = []
        while True:
            if prod.op_type not in EXACT_PASS:
                raise SpecMapError(f"tensor {site.tensor!r} is made inside the module call of {prod.name!r} by "
                                   f"{prod.op_type}, which a fake-quant does not commute with")
            seen.append(prod.op_type)
            x = prod.input[0]
            value = self.vm[leaf.part].get(x)
            if value is not None:
                site.uses.append(FqUse(leaf.part, value.name, (leaf.node,)))
                site.how = f"before {'/'.join(seen)} inside a call"
                return
            prod = self.producer.get(x)
            if prod is None or self.nodes.get(prod.name) != FxSite(leaf.part, leaf.node, True):
                raise SpecMapError(f"tensor {site.tensor!r}: input {x!r} of the leaf call {leaf.node!r} is not in "
                                   f"the fx graph")

    # ---- weights -------------------------------------------------------------------------------
    def _weights(self) -> tuple[dict[str, WeightSite], dict[str, tuple[str, str]]]:
        out: dict[str, WeightSite] = {}
        extras: dict[str, tuple[str, str]] = {}
        onnx_nodes = {n.name: n for nodes in self.part_nodes.values() for n in nodes}
        for name, fs in self.nodes.items():
            node = onnx_nodes[name]
            if fs.internal or fs.part not in self.parts:
                continue
            gm = self.parts[fs.part]
            fx_node = next(n for n in gm.graph.nodes if n.name == fs.node)
            if node.op_type == "BatchNormalization":
                extras.update(self._norm_params(node, gm, fx_node, fs.part))
                continue
            if node.op_type not in WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in self.inits:
                continue
            target = fx_node.target
            mod = gm.get_submodule(target) if fx_node.op == "call_module" else None
            if mod is None or not is_weighted(mod):
                continue
            w = node.input[1]
            dims = tuple(self.inits[w].dims)
            shape = tuple(mod.weight.shape)
            if dims != shape and not (len(dims) == 2 and dims[::-1] == shape):
                raise SpecMapError(f"weight {w!r} of {name!r} has shape {dims}; module {fs.part}.{target} has {shape}")
            slot = WEIGHT_OPS[node.op_type]
            bias = node.input[slot] if slot is not None and len(node.input) > slot and node.input[slot] else None
            out[w] = WeightSite(w, name, fs.part, target, self.spec.weights.get(w), weight_axis(mod),
                                dims != shape, bias if bias in self.inits else None)
        for w in self.spec.weights:
            if w not in out:
                reader = next((c.name for c, _ in self.consumers[w]), w)
                raise SpecMapError(f"weight {w!r} of quantized node {reader!r} has no torch module in the fx graph")
        return out, extras

    def _norm_params(self, node: onnx.NodeProto, gm: fx.GraphModule, fx_node: fx.Node,
                     part: str) -> dict[str, tuple[str, str]]:
        """ONNX BatchNormalization initializers (scale, B, mean, var) -> torch tensors of a BN kept unfolded."""
        if fx_node.op == "call_module":
            paths = [f"{fx_node.target}.{a}" for a in ("weight", "bias", "running_mean", "running_var")]
        else:  # F.batch_norm(x, running_mean, running_var, weight, bias, ...) on get_attr nodes
            args = list(fx_node.args[1:5])
            args = [args[2], args[3], args[0], args[1]] if len(args) == 4 else []
            paths = [a.target if isinstance(a, fx.Node) and a.op == "get_attr" else None for a in args]
        return {t: (part, p) for t, p in zip(node.input[1:5], paths) if p and t in self.inits}


def _by_inputs(cands: list[fx.Node], known: list[fx.Node]) -> fx.Node:
    """The candidate reading most of the already-matched inputs (first in program order on ties)."""
    if len(cands) == 1 or not known:
        return cands[0]
    return max(cands, key=lambda n: sum(k in input_nodes(n) for k in known))


def build_spec_map(model: nn.Module, onnx_model: onnx.ModelProto, spec: QuantSpec) -> SpecMap:
    """Trace ``model``'s parts (BatchNorm folded) and place ``spec`` on them.

    Args:
        model: the KD model (teacher/student/head submodules) the ONNX graph was exported from.
        onnx_model: the prepared float graph ``spec`` was built from.
        spec: the PTQ policy's QuantSpec.

    Returns:
        The SpecMap (parts are fresh GraphModules; ``model`` itself is not modified).

    Raises:
        SpecMapError: a quantized node, activation or weight with no place in the fx graph (named).
        QatError: a part torch.fx cannot trace.
    """
    m = _Mapper(model, onnx_model, spec)
    smap = m.run()
    for name in spec.nodes:
        if name not in smap.nodes:
            op = next((d.op_type for d in spec.decisions if d.node == name), "?")
            raise SpecMapError(f"quantized node {name!r} ({op}) has no counterpart in the fx graph")
    return smap
