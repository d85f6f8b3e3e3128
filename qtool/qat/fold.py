"""Fold inference-mode BatchNorm into the preceding convolution of an fx graph.

Two patterns are folded: a conv module (Conv or ConvTranspose) followed by a BatchNorm module, and
a conv module followed by ``F.batch_norm`` on attribute tensors (what tracing through timm's
``BatchNormAct2d`` gives). The arithmetic is :func:`qtool.graph.prepare.folded_conv_bn`, the ONNX
fold's (in float64, stored as float32): ``W' = W * g / sqrt(v + eps)``,
``b' = (b - m) * g / sqrt(v + eps) + beta``, so the weights QAT fake-quantizes are the ones the ONNX
graph (and PTQ) quantizes.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import fx, nn

from qtool.graph.prepare import folded_conv_bn

log = logging.getLogger(__name__)


def _attr(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return gm.get_parameter(node.target) if _is_param(gm, node.target) else gm.get_buffer(node.target)
    return None


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _bn_stats(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, ...] | None:
    """(mean, var, weight|None, bias|None, eps) of an inference BatchNorm node, or None if not foldable."""
    if node.op == "call_module":
        bn = gm.get_submodule(node.target)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
            return None
        return bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
    if node.op == "call_function" and node.target is F.batch_norm:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        args = dict(zip(names, node.args))
        args.update(node.kwargs)
        if args.get("training", False):
            return None
        mean, var = _attr(gm, args.get("running_mean")), _attr(gm, args.get("running_var"))
        weight, bias = _attr(gm, args.get("weight")), _attr(gm, args.get("bias"))
        if mean is None or var is None or (args.get("weight") is not None and weight is None) or (
            args.get("bias") is not None and bias is None
        ):
            return None
        return mean, var, weight, bias, float(args.get("eps", 1e-5))
    return None


def fold_conv_bn(conv: nn.Module, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, eps: float) -> None:
    """Fold BatchNorm statistics into ``conv`` (a Conv or a transposed conv) in place.

    The weight is scaled per output channel (:func:`qtool.graph.prepare.folded_conv_bn`, the ONNX
    fold's arithmetic); the bias is created or updated.
    """
    def arr(t: torch.Tensor | None) -> np.ndarray | None:
        return None if t is None else t.detach().double().cpu().numpy()

    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    w_new, b_new = folded_conv_bn(arr(conv.weight), arr(conv.bias), arr(weight), arr(bias), arr(mean), arr(var),
                                  eps, transposed, conv.groups)
    grad, dtype = conv.weight.requires_grad, conv.weight.dtype
    conv.weight = nn.Parameter(torch.from_numpy(w_new).to(dtype), requires_grad=grad)
    conv.bias = nn.Parameter(torch.from_numpy(b_new).to(dtype), requires_grad=grad)


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold every conv -> BatchNorm pair of ``gm`` in place; return how many were folded.

    A pair is folded when the conv is a module, its output feeds only the BatchNorm, and the
    BatchNorm is in inference form (running statistics, ``training=False`` as traced in eval mode).
    """
    folded = 0
    for node in list(gm.graph.nodes):
        stats = _bn_stats(gm, node)
        if stats is None:
            continue
        src = node.args[0] if node.args else node.kwargs.get("input")
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv = gm.get_submodule(src.target)
        if not isinstance(conv, nn.modules.conv._ConvNd):  # Conv or ConvTranspose, as qtool.graph.prepare
            continue
        fold_conv_bn(conv, *stats)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.eliminate_dead_code()
    _drop_unused_attrs(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()
    if folded:
        log.debug("folded %d BatchNorm nodes", folded)
    return folded


def _drop_unused_attrs(gm: fx.GraphModule) -> None:
    """Remove parameters and buffers no node reads any more (folded BatchNorm), so they are not trained or saved.

    Only attributes owned directly by modules the graph does not call are candidates: a called leaf
    uses its own parameters, every other tensor is read through a ``get_attr`` node.
    """
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name, mod in list(gm.named_modules()):
        if name in called or any(name.startswith(f"{c}.") for c in called):
            continue
        for attr in [*mod._parameters, *mod._buffers]:
            full = f"{name}.{attr}" if name else attr
            if full not in used:
                delattr(mod, attr)
