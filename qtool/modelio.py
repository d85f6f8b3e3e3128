"""Open a model file of either kind (torch checkpoint or ONNX) with the data transform it expects.

Exported ONNX models carry the data transform settings (image size, resize, normalisation) in
their ``metadata_props`` under ``qtool.data``, so a quantized model is fed exactly as in training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qtool.errors import GraphError, ModelError
from qtool.evaluate import OnnxPredictor, Predictor, TorchPredictor
from qtool.models.base import KDModel
from qtool.recipe import DataConfig

DATA_METADATA_KEY = "qtool.data"
TRANSFORM_KEYS = ("image_size", "resize", "scale_ref", "normalize")


@dataclass
class OpenedModel:
    """A model ready to predict, its kind, and the transform settings it was trained with (if known)."""

    path: Path
    kind: str  # "checkpoint" or "onnx"
    data: dict | None
    torch_model: KDModel | None = None

    def predictor(self, threads: int = 2) -> Predictor:
        """A predictor over this model."""
        if self.torch_model is not None:
            return TorchPredictor(self.torch_model)
        return OnnxPredictor(self.path, threads)

    def apply_transform(self, cfg: DataConfig) -> DataConfig:
        """Return ``cfg`` with the model's image size, resize and normalisation (the model decides these)."""
        if not self.data:
            return cfg
        return cfg.model_copy(update={k: self.data[k] for k in TRANSFORM_KEYS if k in self.data})


def read_onnx_data_config(path: Path) -> dict | None:
    """The ``qtool.data`` metadata of an ONNX file, or None for foreign models."""
    from qtool.graph.io import load_model

    model = load_model(path)
    for prop in model.metadata_props:
        if prop.key == DATA_METADATA_KEY:
            return json.loads(prop.value)
    return None


def open_model(path: Path) -> OpenedModel:
    """Open ``path`` as a qtool checkpoint (``.pt``/``.pth``) or an ONNX model (``.onnx``).

    Raises:
        ModelError: unknown suffix or unreadable checkpoint. GraphError: unreadable ONNX.
    """
    from qtool.models import load_checkpoint

    path = Path(path)
    if path.suffix in (".pt", ".pth"):
        model, meta = load_checkpoint(path)
        return OpenedModel(path, "checkpoint", meta["data"], model)
    if path.suffix == ".onnx":
        return OpenedModel(path, "onnx", read_onnx_data_config(path))
    if not path.exists():
        raise ModelError(f"model file {path} not found")
    raise ModelError(f"model file {path}: unknown kind {path.suffix!r}; expected .pt, .pth or .onnx")


def stamp_data_config(onnx_path: Path, data: dict) -> None:
    """Write the transform settings into an ONNX file's metadata (atomically)."""
    from qtool.graph.io import load_model, save_model

    model = load_model(onnx_path)
    kept = [p for p in model.metadata_props if p.key != DATA_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key = DATA_METADATA_KEY
    entry.value = json.dumps({k: data[k] for k in TRANSFORM_KEYS})
    try:
        save_model(model, onnx_path)
    except OSError as e:
        raise GraphError(f"cannot write {onnx_path}: {e}") from e
