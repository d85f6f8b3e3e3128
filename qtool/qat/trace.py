"""torch.fx tracing of a KD model's parts, graph clean-up, and the ONNX view of each fx node.

Each part (``teacher``, ``student``, ``head``) is traced on its own, so the model's own
``training_loss`` keeps working once the parts are replaced by their fake-quantized GraphModules.
Every fx node gets the two keys the spec map matches on: the ONNX-style scope chain (what the
legacy TorchScript exporter puts in node names: ``/student/body/blocks.1/blocks.1.0/conv_dw/Conv``)
and the ONNX op kinds it can lower to.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import fx, nn

from qtool.errors import QtoolError

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


class QatError(QtoolError):
    """QAT cannot be set up or run: an untraceable part, an unsupported layer, bad QAT inputs."""


class SpecMapError(QatError):
    """A quantization-spec entry has no place in the fx graph; the message names the ONNX node or tensor."""


class PartTracer(fx.Tracer):
    """Leaves are torch.nn's own layers and every conv/linear subclass (their weights get fake-quant).

    Other modules (timm's BatchNormAct2d, blocks, feature extractors) are traced through, so their
    BatchNorm becomes an ``F.batch_norm`` node that :mod:`qtool.qat.fold` folds, and their additions
    and activations become nodes of their own, as in the exported ONNX graph.
    """

    def __init__(self) -> None:
        autowrap: tuple = ()
        try:  # timm's helpers that branch on shapes (same-padding) stay single call nodes
            from timm.models._features_fx import get_notrace_functions

            autowrap = tuple(get_notrace_functions())
        except ImportError:  # pragma: no cover - timm is a dependency
            pass
        super().__init__(autowrap_functions=autowrap)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Leaf: a conv/linear (any subclass) or a module defined in torch.nn, containers excepted."""
        if isinstance(m, _CONTAINERS):
            return False
        if isinstance(m, _WEIGHTED):
            return True
        return type(m).__module__.startswith("torch.nn")


def trace_part(module: nn.Module, name: str) -> fx.GraphModule:
    """Trace a copy of ``module`` (a part of a KD model, in eval mode) into a cleaned GraphModule.

    Simple attributes of the part (``channels``, ``reductions`` ...) are copied onto the GraphModule
    so code that reads them keeps working.

    Raises:
        QatError: the part cannot be symbolically traced (data-dependent control flow).
    """
    module = copy.deepcopy(module).eval()
    try:
        graph = PartTracer().trace(module)
    except Exception as e:
        raise QatError(f"part {name!r} ({type(module).__name__}) cannot be traced by torch.fx: "
                       f"{str(e).splitlines()[0]}") from e
    gm = fx.GraphModule(module, graph, class_name=f"Qat{type(module).__name__}")
    for key, value in vars(module).items():
        if not key.startswith("_") and key != "training" and isinstance(value, (int, float, str, list, tuple)):
            setattr(gm, key, value)
    clean_graph(gm)
    return gm


def clean_graph(gm: fx.GraphModule) -> None:
    """Drop shape assertions and identity modules (they are absent from the ONNX graph too)."""
    g = gm.graph
    for node in list(g.nodes):
        if node.op == "call_function" and node.target in (torch._assert, getattr(torch, "_assert_async", None)):
            g.erase_node(node)
        elif node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Identity:
            node.replace_all_uses_with(node.args[0])
            g.erase_node(node)
    g.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()


def unqualified(qualified: str) -> str:
    """The exporter's scope atom of a module: its name from the last non-numeric atom on.

    ``student.body.blocks.1.0`` -> ``blocks.1.0`` (mirrors torch.onnx's ``_unqualified_variable_name``).
    """
    atoms = qualified.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return qualified


def scope_chain(node: fx.Node, part: str) -> tuple[str, ...]:
    """ONNX-style scope chain of an fx node of part ``part``: the atoms of the modules on its call stack."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    paths = [p[0] if isinstance(p, tuple) else str(p) for p in stack]
    return (unqualified(part), *(unqualified(f"{part}.{p}") for p in paths if p))


def onnx_chain(node_name: str) -> tuple[str, ...]:
    """Scope chain of an ONNX node name: ``/student/body/conv_stem/Conv`` -> ``(student, body, conv_stem)``."""
    parts = node_name.split("/")
    return tuple(p for p in parts[1:-1] if p)


_MODULE_KINDS: list[tuple[type, frozenset[str]]] = [
    (nn.modules.conv._ConvTransposeNd, frozenset({"ConvTranspose"})),
    (nn.modules.conv._ConvNd, frozenset({"Conv"})),
    (nn.Linear, frozenset({"Gemm", "MatMul"})),
    (nn.ReLU, frozenset({"Relu"})),
    (nn.ReLU6, frozenset({"Clip"})),
    (nn.Hardtanh, frozenset({"Clip"})),
    (nn.Sigmoid, frozenset({"Sigmoid"})),
    (nn.Tanh, frozenset({"Tanh"})),
    (nn.modules.pooling._MaxPoolNd, frozenset({"MaxPool"})),
    (nn.modules.pooling._AvgPoolNd, frozenset({"AveragePool"})),
    (nn.AdaptiveAvgPool2d, frozenset({"GlobalAveragePool", "AveragePool"})),
    (nn.Upsample, frozenset({"Resize"})),
    (nn.Flatten, frozenset({"Flatten", "Reshape"})),
    (nn.modules.batchnorm._BatchNorm, frozenset({"BatchNormalization"})),
]
_FUNCTION_KINDS: dict[object, frozenset[str]] = {
    operator.add: frozenset({"Add"}), operator.iadd: frozenset({"Add"}), torch.add: frozenset({"Add"}),
    operator.mul: frozenset({"Mul"}), operator.imul: frozenset({"Mul"}), torch.mul: frozenset({"Mul"}),
    torch.cat: frozenset({"Concat"}), torch.concat: frozenset({"Concat"}),
    torch.relu: frozenset({"Relu"}), F.relu: frozenset({"Relu"}),
    F.relu6: frozenset({"Clip"}), F.hardtanh: frozenset({"Clip"}), torch.clamp: frozenset({"Clip"}),
    torch.clip: frozenset({"Clip"}),
    torch.sigmoid: frozenset({"Sigmoid"}), F.sigmoid: frozenset({"Sigmoid"}),
    F.max_pool2d: frozenset({"MaxPool"}), F.avg_pool2d: frozenset({"AveragePool"}),
    F.adaptive_avg_pool2d: frozenset({"GlobalAveragePool", "AveragePool"}),
    F.interpolate: frozenset({"Resize"}), F.pad: frozenset({"Pad"}),
    torch.flatten: frozenset({"Flatten", "Reshape"}), torch.reshape: frozenset({"Reshape"}),
    torch.matmul: frozenset({"MatMul"}), operator.matmul: frozenset({"MatMul"}),
    F.linear: frozenset({"Gemm", "MatMul"}), F.conv2d: frozenset({"Conv"}),
    torch.stack: frozenset({"Concat"}), F.batch_norm: frozenset({"BatchNormalization"}),
}
_METHOD_KINDS: dict[str, frozenset[str]] = {
    "add": frozenset({"Add"}), "add_": frozenset({"Add"}), "mul": frozenset({"Mul"}), "mul_": frozenset({"Mul"}),
    "relu": frozenset({"Relu"}), "relu_": frozenset({"Relu"}), "clamp": frozenset({"Clip"}),
    "clip": frozenset({"Clip"}), "sigmoid": frozenset({"Sigmoid"}), "flatten": frozenset({"Flatten", "Reshape"}),
    "view": frozenset({"Reshape"}), "reshape": frozenset({"Reshape"}), "permute": frozenset({"Transpose"}),
    "transpose": frozenset({"Transpose"}), "squeeze": frozenset({"Squeeze"}), "unsqueeze": frozenset({"Unsqueeze"}),
    "matmul": frozenset({"MatMul"}),
}


def onnx_kinds(node: fx.Node, gm: fx.GraphModule) -> frozenset[str]:
    """ONNX op types ``node`` exports to (empty when unknown: it never matches a quantized node)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        for cls, kinds in _MODULE_KINDS:
            if isinstance(mod, cls):
                return kinds
        return frozenset()
    if node.op == "call_function":
        return _FUNCTION_KINDS.get(node.target, frozenset())
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target, frozenset())
    return frozenset()


def input_nodes(node: fx.Node) -> list[fx.Node]:
    """The fx nodes among ``node``'s arguments (nested lists included), in order."""
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    return out


def is_weighted(module: nn.Module) -> bool:
    """True for the layers whose weight is fake-quantized per channel (conv, transposed conv, linear)."""
    return isinstance(module, _WEIGHTED)


def weight_axis(module: nn.Module) -> int:
    """Output-channel axis of a torch weight: 1 for transposed convs, else 0 (same as ONNX's layout)."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def call_sites(gm: fx.GraphModule) -> Iterable[fx.Node]:
    """The computing nodes of a graph (no placeholders, attributes or outputs)."""
    return (n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method"))
