"""Run a graph forward in steps, each on the activations the steps before it left: each node runs about once.

A pass that measures some tensors, edits the graph, then measures tensors further down (bias correction, level
by level) would otherwise run the whole upstream graph again at every step: quadratic in depth. A
:class:`FrontierRunner` keeps, per chunk of input images, the activations that nodes it has not run yet still
read (the frontier), and each :meth:`FrontierRunner.run` executes only the nodes between that frontier and the
tensors asked for, in a cut of the graph given at that step.

The caller promises what "final" means: everything the runner computed upstream of a step's targets stays valid
for later steps, except the outputs of the nodes it names as ``moving`` (their parameters are about to change;
they run again when needed). Tensors computed from initializers alone (a dequantized weight or bias) are never
kept, so a changed initializer always takes effect. Node arithmetic is ONNX Runtime's with graph optimisations
off (:func:`qtool.graph.probe.probe_session`), so a value is the same whichever cut computed it.

Memory: the frontier is bounded by ``max_bytes``; a step that leaves more held drops it all (a restart: the next
step runs from the input images again), so a cap trades node runs for memory and never changes a value.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper

from qtool.graph._index import GraphIndex
from qtool.graph.probe import chunks, needed_nodes, probe_session

Chunk = tuple[int, dict[str, np.ndarray]]  # (real images in it, tensor -> array); padding rows follow the real ones


def varying(model: onnx.ModelProto, idx: GraphIndex) -> set[str]:
    """Tensors of ``model`` (indexed by ``idx``) that depend on a graph input (the rest: initializers alone)."""
    out = set(idx.graph_inputs)
    for node in model.graph.node:
        if any(t in out for t in node.input if t):
            out.update(t for t in node.output if t)
    return out


def _elem_type(idx: GraphIndex, name: str) -> int:
    """Element type of an intermediate tensor: declared, else a QuantizeLinear's zero-point type, else float."""
    if name in idx.elem_type:
        return idx.elem_type[name]
    node = idx.producer.get(name)
    if node is not None and node.op_type == "QuantizeLinear":
        zero = node.input[2] if len(node.input) > 2 else ""
        return idx.elem_type.get(zero, TensorProto.UINT8)
    return TensorProto.FLOAT


class FrontierRunner:
    """Step-wise execution of one graph's successive versions on a fixed set of input images.

    Args:
        batches: the input images (N, C, H, W), read once.
        input_name: the graph input they feed; batch: the model's fixed batch size, or None (dynamic).
        threads: ONNX Runtime intra-op threads.
        max_bytes: the most the frontier may hold past the input images, all chunks together (None: no cap); a
            step that leaves more drops it (:attr:`drops` counts them).
    """

    def __init__(self, batches: Iterable[np.ndarray], input_name: str, batch: int | None, threads: int,
                 max_bytes: int | None = None) -> None:
        self.threads, self.max_bytes = threads, max_bytes
        self.inputs = [(real, input_name, chunk) for real, chunk in chunks(batches, batch)]
        self.node_runs = 0  # nodes executed (per chunk), over every step
        self.peak_bytes = 0  # the largest frontier held, all chunks together, input images included
        self.drops = 0  # frontiers dropped for the cap
        self.restart()

    def restart(self) -> None:
        """Forget the frontier: the next step runs from the input images (every node counts as not final)."""
        self.chunks: list[Chunk] = [(real, {name: chunk}) for real, name, chunk in self.inputs]
        self.done: set[str] = set()  # first outputs of the nodes whose outputs are final

    def run(self, model: onnx.ModelProto, targets: list[str], moving: Collection[str],
            hold: bool = True) -> Iterator[list[np.ndarray]]:
        """Per chunk, the values of ``targets`` in ``model`` (real rows only), computed from the frontier.

        ``moving``: names of nodes whose outputs are not final (they change before the next step); every other
        node this step runs becomes final, and the frontier keeps its outputs that a node not yet final reads.
        ``hold=False``: keep nothing new (a last step, or one before :meth:`restart`; saves the memory).
        The frontier moves as the chunks are read: read them all before the next step.
        """
        idx = GraphIndex(model)
        live = varying(model, idx)
        held = set(self.chunks[0][1]) if self.chunks else set()
        nodes = needed_nodes(model, idx, targets, stop=held)
        if not nodes:  # every target is held already
            for real, cache in self.chunks:
                yield [cache[t][:real] for t in targets]
            return
        final = [n for n in nodes if n.name not in moving]
        self.done.update(n.output[0] for n in final)
        keep = [t for n in final for t in n.output if t in live and not self._spent(t, idx)] if hold else []
        reads = list(dict.fromkeys(t for n in nodes for t in n.input if t in held))
        names = list(dict.fromkeys([*(t for t in targets if t not in held), *keep]))
        sess = probe_session(self._cut(model, idx, nodes, reads, names), self.threads)
        self.node_runs += len(nodes)
        spent = [t for t in held if self._spent(t, idx)]
        last = len(self.chunks) - 1
        for i, (real, cache) in enumerate(self.chunks):
            outs = dict(zip(names, sess.run(names, {t: cache[t] for t in reads})))
            values = [(outs[t] if t in outs else cache[t])[:real] for t in targets]
            cache.update((t, outs[t]) for t in keep)
            for t in spent:
                del cache[t]
            if i == last:  # the step's bookkeeping before the last yield: a caller that stops there leaves no gap
                self._account()
            yield values

    def _account(self) -> None:
        """Record the peak held, and drop the frontier when it holds more than ``max_bytes``."""
        self.peak_bytes = max(self.peak_bytes, sum(a.nbytes for _, cache in self.chunks for a in cache.values()))
        if self.max_bytes is not None and self.activation_bytes() > self.max_bytes:
            self.drops += 1
            self.restart()

    def activation_bytes(self) -> int:
        """What the frontier holds besides the input images (which the runner keeps for every restart anyway)."""
        return sum(a.nbytes for (_, cache), (_, name, _) in zip(self.chunks, self.inputs)
                   for t, a in cache.items() if t != name)

    def _spent(self, name: str, idx: GraphIndex) -> bool:
        """True once every node reading ``name`` is final, or none does (the frontier no longer needs it)."""
        return all(c.output[0] in self.done for c, _ in idx.consumers.get(name, []))

    @staticmethod
    def _cut(model: onnx.ModelProto, idx: GraphIndex, nodes: list[onnx.NodeProto], reads: list[str],
             outputs: list[str]) -> onnx.ModelProto:
        """The sub-graph of ``nodes`` whose inputs are the held tensors ``reads`` and whose outputs are ``outputs``."""
        used = {t for n in nodes for t in n.input}
        graph = helper.make_graph(
            list(nodes), "frontier_cut",
            [helper.make_tensor_value_info(t, _elem_type(idx, t), None) for t in reads],
            [helper.make_tensor_value_info(t, _elem_type(idx, t), None) for t in outputs],
            [t for t in model.graph.initializer if t.name in used])
        cut = helper.make_model(graph, opset_imports=list(model.opset_import))
        cut.ir_version = model.ir_version
        return cut
