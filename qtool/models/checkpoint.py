"""Self-contained checkpoints: weights plus the config needed to rebuild and feed the model.

A checkpoint carries the model section (backbone, levels ...), the input size and the data
transform settings (resize, normalisation), so evaluation, export and PTQ preprocess exactly as
training did. Loading uses ``torch.load(weights_only=True)``; the teacher is rebuilt from the
stored weights, so no ImageNet file is needed to load one.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from qtool.artifacts import atomic_path
from qtool.errors import ModelError
from qtool.models.base import KDModel, build_model
from qtool.recipe import DataConfig, ModelConfig, Recipe

FORMAT = "qtool-checkpoint"
VERSION = 1


def save_checkpoint(model: KDModel, path: Path, recipe: Recipe, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights with ``recipe``'s model and data sections (atomically).

    Args:
        model: the trained model.
        path: destination ``.pt`` file.
        recipe: the run's recipe; its model and data sections are stored.
        extra: JSON-like facts (epoch, history, optimizer state for resume ...).
    Returns:
        ``path``.
    """
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": recipe.model.model_dump(mode="json"),
        "data": recipe.data.model_dump(mode="json"),
        "image_size": recipe.data.image_size,
        "state_dict": model.state_dict(),
        "extra": extra or {},
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_torch_file(path: Path, kind: str) -> Any:
    """``torch.load`` of ``path`` with ``weights_only=True`` on the CPU; ``kind`` names the file in messages.

    Raises:
        ModelError: missing file, or not a torch file (the loader's first line).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{kind} {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError(f"{kind} {path} cannot be read: not a torch file, or it holds objects other than "
                         "tensors and plain containers (loaded with weights_only=True)") from None
    except Exception as e:
        raise ModelError(f"{kind} {path} cannot be read: {str(e).splitlines()[0]}") from None


def read_payload(path: Path, fmt: str, version: int, kind: str = "checkpoint") -> dict[str, Any]:
    """Load a qtool payload safely (``weights_only=True``) and check its ``format`` and ``version``.

    ``kind`` names the file in messages ("checkpoint", "QAT checkpoint").

    Raises:
        ModelError: missing file, not a torch file, another format, or another version.
    """
    path = Path(path)
    payload = load_torch_file(path, kind)
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ModelError(f"{path} is not a qtool {kind}")
    if payload.get("version") != version:
        raise ModelError(f"{kind} {path} has version {payload.get('version')}; this qtool reads {version}")
    return payload


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a model checkpoint payload safely and check its format (see :func:`read_payload`)."""
    return read_payload(path, FORMAT, VERSION)


def load_checkpoint(path: Path, expect: ModelConfig | None = None) -> tuple[KDModel, dict[str, Any]]:
    """Rebuild the model stored in ``path``.

    Args:
        path: a file written by :func:`save_checkpoint`.
        expect: when given, the model section the caller expects; a mismatch is an error.
    Returns:
        (model in eval mode, payload without the state dict).
    Raises:
        ModelError: unreadable file, config mismatch, or weights that do not fit the config.
    """
    payload = read_checkpoint(path)
    cfg = ModelConfig.model_validate({**payload["model"], "weights": "none"})
    if expect is not None:
        stored = ModelConfig.model_validate(payload["model"])
        for key in ("name", "backbone", "levels"):
            if getattr(stored, key) != getattr(expect, key):
                raise ModelError(
                    f"checkpoint {path} has model.{key}={getattr(stored, key)!r}, "
                    f"the recipe asks for {getattr(expect, key)!r}"
                )
    model = build_model(cfg, int(payload["image_size"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise ModelError(f"checkpoint {path} weights do not fit its config: {str(e).splitlines()[0]}") from None
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    meta["data_config"] = DataConfig.model_validate(payload["data"])
    return model.eval(), meta
