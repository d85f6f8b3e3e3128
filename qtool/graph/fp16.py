"""Float16 conversion of a float32 ONNX model (the fp16 baseline and the fp16 fallback of a target)."""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from qtool.errors import GraphError
from qtool.graph._index import topo_sort


def to_fp16(
    model: onnx.ModelProto,
    keep_io_types: bool = True,
    op_block_list: Iterable[str] | None = None,
    node_block_list: Iterable[str] | None = None,
) -> onnx.ModelProto:
    """Return a float16 copy of ``model``.

    Uses onnxruntime's ``convert_float_to_float16`` (``onnxruntime.transformers.float16``, shipped
    with onnxruntime).

    Args:
        model: float32 model.
        keep_io_types: keep float32 graph inputs/outputs (Casts are inserted at the boundary).
        op_block_list: op types to keep in float32 (default: onnxruntime's list).
        node_block_list: node names to keep in float32.

    Raises:
        GraphError: the converter failed (the message has its first line).
    """
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as e:  # pragma: no cover - ships with onnxruntime
        raise GraphError(f"float16 conversion needs onnxruntime.transformers: {e}") from None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    try:
        out = convert_float_to_float16(
            m,
            keep_io_types=keep_io_types,
            op_block_list=list(op_block_list) if op_block_list is not None else None,
            node_block_list=list(node_block_list) if node_block_list is not None else None,
        )
    except Exception as e:  # wrap the converter's errors with context
        raise GraphError(f"float16 conversion failed: {str(e).strip().splitlines()[0] if str(e) else e!r}") from e
    topo_sort(out)  # the converter appends its boundary Casts last; the ONNX checker wants nodes in order
    return out
