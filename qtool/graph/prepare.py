"""Make a float ONNX model ready for quantization.

Static input shapes, constant folding, BN folding, unique node names, strict shape inference.
Node names of the original graph survive (part globs match them).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from qtool.errors import GraphError
from qtool.graph._index import GraphIndex, NameScope, name_nodes, node_attr, remove_unused_initializers

log = logging.getLogger(__name__)

# onnxslim passes that keep node names and node identity. Its fusions (Conv+BN, Conv+Add, Conv+Mul,
# MatMul+Add->Gemm, ...) name the fused node after its output tensor, and subexpression elimination /
# weight tying can merge a student node into an identical teacher node, so those stay off: qtool folds
# BatchNormalization itself and keeps the Conv's name.
SLIM_SKIP = ["graph_fusion", "subexpression_elimination", "weight_tying"]


def prepare(
    model: onnx.ModelProto,
    input_shape: Mapping[str, Sequence[int]] | None = None,
    simplify: bool = True,
) -> onnx.ModelProto:
    """Return a prepared copy of ``model``.

    Args:
        model: float ONNX model.
        input_shape: ``{input name: full shape}`` for inputs with dynamic dims (the calibration shape).
        simplify: constant-fold and remove dead nodes with onnxslim (names preserved, see SLIM_SKIP).

    Returns:
        The model with fixed input shapes, folded constants and BatchNormalization, unique node names
        and inferred shapes.

    Raises:
        GraphError: a dynamic input dim without a given shape, a given shape that does not fit,
            or strict shape inference failing.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if n := name_nodes(m):
        log.info("named %d unnamed or duplicate-named nodes", n)
    fix_input_shapes(m, input_shape)
    if simplify:
        m = _simplify(m)
    if n := fold_batchnorm(m):
        log.info("folded %d BatchNormalization nodes into Conv / ConvTranspose", n)
    if n := fuse_pad_into_conv(m):
        log.info("fused %d zero Pad nodes into their Conv's pads", n)
    return infer_shapes(m)


def fix_input_shapes(model: onnx.ModelProto, input_shape: Mapping[str, Sequence[int]] | None) -> None:
    """Make every graph input static in place, using ``input_shape`` for the given inputs.

    Raises:
        GraphError: unknown input name, rank or static-dim mismatch, or a dynamic dim left open.
    """
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    given = dict(input_shape or {})
    names = [i.name for i in inputs]
    for name in given:
        if name not in names:
            raise GraphError(f"input shape given for unknown input {name!r}; model inputs: {', '.join(names)}")
    for vi in inputs:
        tt = vi.type.tensor_type
        if vi.name in given:
            shape = [int(d) for d in given[vi.name]]
            if any(d <= 0 for d in shape):
                raise GraphError(f"input shape {shape} for {vi.name!r} must be positive integers")
            if tt.HasField("shape") and len(tt.shape.dim) != len(shape):
                raise GraphError(
                    f"input {vi.name!r} has rank {len(tt.shape.dim)} but the given shape {shape} has {len(shape)}"
                )
            for k, (dim, want) in enumerate(zip(tt.shape.dim, shape, strict=False)):
                if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != want:
                    raise GraphError(f"input {vi.name!r} dim {k} is {dim.dim_value}, but the given shape says {want}")
            tt.shape.ClearField("dim")
            for want in shape:
                tt.shape.dim.add().dim_value = want
            continue
        if not tt.HasField("shape"):
            raise GraphError(f"input {vi.name!r} has no shape; give a calibration shape with --input-shape")
        for k, dim in enumerate(tt.shape.dim):
            if not (dim.HasField("dim_value") and dim.dim_value > 0):
                label = dim.dim_param or f"#{k}"
                raise GraphError(
                    f"input {vi.name!r} has dynamic dim {label!r}; give a calibration shape with --input-shape"
                )
    if given:
        # symbolic dims elsewhere would contradict the now-static inputs; shape inference refills them
        del g.value_info[:]
        for vi in g.output:
            for dim in vi.type.tensor_type.shape.dim:
                if dim.HasField("dim_param"):
                    dim.Clear()


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        import onnxslim
    except ImportError:  # pragma: no cover - onnxslim is a dependency
        log.warning("onnxslim not installed; skipping constant folding")
        return model
    before = {n.name for n in model.graph.node}
    try:
        slim = onnxslim.slim(model, skip_optimizations=SLIM_SKIP)
    except Exception as e:  # a failed optional simplification must not stop quantization
        log.warning("onnxslim failed (%s); continuing without constant folding", str(e).splitlines()[0])
        return model
    if slim is None:
        log.warning("onnxslim returned no model; continuing without constant folding")
        return model
    name_nodes(slim)
    new = [n.name for n in slim.graph.node if n.name not in before]
    if new:
        log.info("onnxslim created %d nodes with new names, e.g. %s", len(new), new[:3])
    log.debug("onnxslim: %d -> %d nodes", len(model.graph.node), len(slim.graph.node))
    return slim


def folded_conv_bn(weight: np.ndarray, bias: np.ndarray | None, gamma: np.ndarray | None, beta: np.ndarray | None,
                   mean: np.ndarray, var: np.ndarray, eps: float, transposed: bool = False, groups: int = 1
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Weight and bias of a convolution with the inference BatchNorm after it folded in (float64).

    ``W' = W * g / sqrt(v + eps)`` per output channel, ``b' = (b - m) * g / sqrt(v + eps) + beta``. The
    output channel is axis 0 of a Conv weight ``(C_out, C_in / groups, k...)``; a ConvTranspose weight
    is ``(C_in, C_out / groups, k...)``, output channel ``c`` at group ``c // (C_out / groups)``, column
    ``c % (C_out / groups)``. The one arithmetic of the ONNX fold (:func:`fold_batchnorm`) and of QAT's
    (:mod:`qtool.qat.fold`), so both quantize the same weights.
    """
    w = np.asarray(weight, np.float64)
    mean = np.asarray(mean, np.float64)
    f = (np.ones_like(mean) if gamma is None else np.asarray(gamma, np.float64)) / np.sqrt(
        np.asarray(var, np.float64) + eps)
    b = np.zeros_like(mean) if bias is None else np.asarray(bias, np.float64)
    b_new = (b - mean) * f + (0.0 if beta is None else np.asarray(beta, np.float64))
    kernel = [1] * (w.ndim - 2)
    if transposed:
        cin, cout_g = w.shape[:2]
        grouped = w.reshape(groups, cin // groups, cout_g, *w.shape[2:])
        w_new = (grouped * f.reshape(groups, 1, cout_g, *kernel)).reshape(w.shape)
    else:
        w_new = w * f.reshape(-1, 1, *kernel)
    return w_new, b_new


FOLDABLE = frozenset({"Conv", "ConvTranspose"})


def fold_batchnorm(model: onnx.ModelProto) -> int:
    """Fold inference-mode BatchNormalization nodes into the Conv or ConvTranspose that feeds them, in place.

    The convolution keeps its name and takes over the BN output; folded weights get new initializers
    (the originals may be shared). BNs after anything else, in training mode, or with non-constant
    parameters are left alone.

    Returns:
        How many BatchNormalization nodes were folded.
    """
    idx = GraphIndex(model)
    scope = NameScope(model)
    folded = []
    for bn in model.graph.node:
        if bn.op_type != "BatchNormalization" or node_attr(bn, "training_mode", 0) or any(bn.output[1:]):
            continue
        x = bn.input[0]
        conv = idx.producer.get(x)
        if conv is None or conv.op_type not in FOLDABLE or len(idx.consumers[x]) != 1 or x in idx.graph_outputs:
            continue
        names = [conv.input[1], *bn.input[1:5]] + ([conv.input[2]] if len(conv.input) > 2 and conv.input[2] else [])
        if not all(n in idx.initializers for n in names):
            continue
        w = numpy_helper.to_array(idx.initializers[conv.input[1]])
        gamma, beta, mean, var = (numpy_helper.to_array(idx.initializers[n]) for n in bn.input[1:5])
        bias = numpy_helper.to_array(idx.initializers[names[5]]) if len(names) > 5 else None
        w_new, b_new = folded_conv_bn(w, bias, gamma, beta, mean, var, float(node_attr(bn, "epsilon", 1e-5)),
                                      conv.op_type == "ConvTranspose", int(node_attr(conv, "group", 1)))
        w_name, b_name = scope.new(f"{conv.name}.weight_bnfold"), scope.new(f"{conv.name}.bias_bnfold")
        model.graph.initializer.extend([numpy_helper.from_array(w_new.astype(w.dtype), w_name),
                                        numpy_helper.from_array(b_new.astype(w.dtype), b_name)])
        del conv.input[1:]
        conv.input.extend([w_name, b_name])
        conv.output[0] = bn.output[0]
        folded.append(bn)
    return _remove_nodes(model, folded)


def _remove_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> int:
    """Drop ``nodes`` (already bypassed) and the initializers nobody reads any more; return how many."""
    for node in nodes:
        model.graph.node.remove(node)
    if nodes:
        remove_unused_initializers(model)
    return len(nodes)


def _const(idx: GraphIndex, name: str) -> np.ndarray | None:
    """The value of initializer ``name`` (None for an absent optional input or a computed tensor)."""
    return numpy_helper.to_array(idx.initializers[name]) if name in idx.initializers else None


def _spatial_pads(idx: GraphIndex, pad: onnx.NodeProto) -> list[int] | None:
    """Conv-style ``[h0, w0, ..., h1, w1, ...]`` of a constant-zero 4-D+ Pad on spatial dims only, else None."""
    if node_attr(pad, "mode", b"constant") not in (b"constant", "constant") or len(pad.input) < 2:
        return None
    pads = _const(idx, pad.input[1])
    value = _const(idx, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
    if pads is None or value is None or np.any(value != 0) or (len(pad.input) > 3 and pad.input[3]):
        return None  # non-constant pads, non-zero fill, or an explicit axes input
    pads = [int(v) for v in pads.reshape(-1)]
    rank = len(pads) // 2
    begin, end = pads[:rank], pads[rank:]
    if rank < 3 or min(pads) < 0 or any(begin[:2]) or any(end[:2]):
        return None
    return begin[2:] + end[2:]


def fuse_pad_into_conv(model: onnx.ModelProto) -> int:
    """Fold zero Pad nodes (TF "same" padding) into the pads of the Conv nodes they feed, in place.

    A Pad left between two quantized Convs runs in float between a DequantizeLinear and a
    QuantizeLinear in ONNX Runtime (about a tenth of an int8 EfficientNet's time); inside the
    Conv it costs nothing. Only Pads whose every consumer is a Conv with explicit padding fuse.

    Returns:
        How many Pad nodes were removed.
    """
    idx = GraphIndex(model)
    fused = []
    for pad in model.graph.node:
        if pad.op_type != "Pad" or pad.output[0] in idx.graph_outputs:
            continue
        extra = _spatial_pads(idx, pad)
        users = idx.consumers.get(pad.output[0], [])
        if extra is None or not users or any(
            n.op_type != "Conv" or i != 0 or node_attr(n, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            for n, i in users
        ):
            continue
        owns = [list(node_attr(conv, "pads", [0] * len(extra))) for conv, _ in users]
        if any(len(own) != len(extra) for own in owns):
            continue
        for (conv, _), own in zip(users, owns):
            for a in [a for a in conv.attribute if a.name == "pads"]:
                conv.attribute.remove(a)
            conv.attribute.append(onnx.helper.make_attribute("pads", [x + y for x, y in zip(own, extra)]))
            conv.input[0] = pad.input[0]
        fused.append(pad)
    return _remove_nodes(model, fused)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Strict ONNX shape inference (types checked, data propagated).

    Raises:
        GraphError: with the first line of the inference error.
    """
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as e:
        raise GraphError(f"shape inference failed: {str(e).strip().splitlines()[0]}") from None
