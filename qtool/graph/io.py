"""Read and write ONNX models with one-line errors; writes are atomic."""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from qtool.artifacts import atomic_path
from qtool.errors import GraphError

_PROTOBUF_LIMIT = 2**31 - 1


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_model(path: str | Path, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model (external weight files beside it are read in) and run the ONNX checker.

    Args:
        path: the ``.onnx`` file.
        check: run ``onnx.checker.check_model``.

    Returns:
        The model.

    Raises:
        GraphError: missing/unreadable file, bytes that are not an ONNX model, or a checker failure.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise GraphError(f"ONNX model {p} not found") from None
    except OSError as e:
        raise GraphError(f"cannot read ONNX model {p}: {e.strerror or e}") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise GraphError(f"{p} is not a valid ONNX model: {_first_line(e)}") from None
    if not model.HasField("graph") or not model.graph.node or not model.opset_import:
        raise GraphError(f"{p} is not a valid ONNX model: no graph nodes or opset (empty or not ONNX bytes)")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as e:
            raise GraphError(f"{p}: cannot read its external weight data: {_first_line(e)}") from None
    if check:
        try:
            onnx.checker.check_model(model)
        except (onnx.checker.ValidationError, ValueError) as e:
            raise GraphError(f"{p} is not a valid ONNX model: checker: {_first_line(e)}") from None
    return model


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` to ``path`` through a temporary file and a rename (no partial file on failure).

    Returns:
        The written path.

    Raises:
        GraphError: the model exceeds the 2 GiB protobuf limit (external data is not supported here).
    """
    p = Path(path)
    size = model.ByteSize()
    if size > _PROTOBUF_LIMIT:
        raise GraphError(f"model for {p} is {size} bytes, over the 2 GiB protobuf limit")
    with atomic_path(p) as tmp:
        tmp.write_bytes(model.SerializeToString())
    return p
