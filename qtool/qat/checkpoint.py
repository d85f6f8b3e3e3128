"""QAT checkpoints: plain dicts of tensors and JSON-like values (``torch.load(weights_only=True)`` reads them).

A checkpoint holds the float model it started from (config + state dict), the PtqConfig and export
settings that fixed the spec, and the QAT model's state (folded weights, scales, zero points), so
:func:`load_qat_checkpoint` rebuilds the same fake-quantized graph and float ONNX graph.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from qtool.artifacts import atomic_path
from qtool.errors import ModelError
from qtool.models.checkpoint import read_payload
from qtool.qat.insert import QatModel, prepare_qat
from qtool.qat.objectives import LEARN_SETS

FORMAT = "qtool-qat-checkpoint"
VERSION = 1


def qat_payload(qm: QatModel, base: dict[str, Any], base_state: dict[str, torch.Tensor], ptq: dict[str, Any],
                export: dict[str, Any], qat: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint dict of a QAT model.

    Args:
        qm: the QAT model.
        base: the float checkpoint's payload without its state dict (model, data, image_size ...).
        base_state: the float model's state dict (before QAT).
        ptq / export / qat: the recipe sections that fixed the spec and the quantizers (JSON dumps).
        extra: epoch, history and other JSON-like facts (and optimizer state to resume).
    """
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": base["model"],
        "data": base["data"],
        "image_size": int(base["image_size"]),
        "base_state_dict": base_state,
        "ptq": ptq,
        "export": export,
        "qat": qat,
        "qat_state_dict": qm.model.state_dict(),
        "extra": extra or {},
    }


def save_qat_checkpoint(payload: dict[str, Any], path: Path) -> Path:
    """Write a payload from :func:`qat_payload` atomically; return ``path``."""
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_qat_checkpoint(path: Path) -> dict[str, Any]:
    """Load a QAT checkpoint safely (``weights_only=True``) and check its format.

    Raises:
        ModelError: missing or unreadable file, not a QAT checkpoint, or another version.
    """
    return read_payload(path, FORMAT, VERSION, "QAT checkpoint")


def float_graph(model: nn.Module, image_size: int, export: dict[str, Any]) -> onnx.ModelProto:
    """Export ``model`` with qtool.export (as PTQ does) and prepare it: the graph a spec is built from."""
    from qtool.export import export_onnx
    from qtool.graph import load_model, prepare

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fp32.onnx"
        export_onnx(model, path, image_size, int(export.get("batch_size", 1)), int(export.get("opset", 17)))
        return prepare(load_model(path))


def load_qat_checkpoint(path: Path) -> tuple[QatModel, onnx.ModelProto, dict[str, Any]]:
    """Rebuild the QAT model of a checkpoint.

    Returns:
        (QAT model in eval mode, the prepared float ONNX graph of its spec, payload without state dicts).

    Raises:
        ModelError: unreadable checkpoint or weights that do not fit. SpecMapError/QatError: as prepare_qat.
    """
    from qtool.graph import build_spec
    from qtool.models import build_model
    from qtool.recipe import ModelConfig, PtqConfig

    payload = read_qat_checkpoint(path)
    model = build_model(ModelConfig.model_validate({**payload["model"], "weights": "none"}), payload["image_size"])
    try:
        model.load_state_dict(payload["base_state_dict"])
    except RuntimeError as e:
        raise ModelError(f"QAT checkpoint {path}: float weights do not fit: {str(e).splitlines()[0]}") from None
    model.eval()
    graph = float_graph(model, payload["image_size"], payload["export"])
    spec = build_spec(graph, PtqConfig.model_validate(payload["ptq"]))
    qcfg = payload.get("qat", {})
    learn = LEARN_SETS.get(str(qcfg.get("learn", "student")))
    qm = prepare_qat(model, graph, spec, None, bool(qcfg.get("learnable_scales", False)),
                     float(qcfg.get("observer_momentum", 0.0)), ranges_only=learn.ranges_only)
    try:
        qm.model.load_state_dict(payload["qat_state_dict"])
    except RuntimeError as e:
        raise ModelError(f"QAT checkpoint {path}: QAT weights do not fit: {str(e).splitlines()[0]}") from None
    qm.model.eval()
    meta = {k: v for k, v in payload.items() if not k.endswith("state_dict")}
    return qm, graph, meta
