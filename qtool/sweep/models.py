"""The model axis of a sweep: each entry becomes an fp32 ONNX (and a checkpoint where there is one).

An entry is an existing file (a checkpoint is exported once) or the recipe's model trained per the
recipe; trained and exported models live in the cache, keyed by what made them, and training
resumes from its last epoch if a sweep was killed during it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtool.artifacts import sha256_file, write_json
from qtool.errors import ModelError, RecipeError
from qtool.recipe import DataConfig, Recipe
from qtool.sweep.cache import Cache, code_fingerprint, content_key
from qtool.sweep.grid import CHECKPOINT_SUFFIXES, merged_model

log = logging.getLogger(__name__)
Progress = Callable[[int], None] | None
TRAINING_CODE = ("qtool/models", "qtool/train.py", "qtool/data", "qtool/export.py", "qtool/modelio.py")
"""Sources that make a trained or exported model; they key its cache entry."""


@dataclass(frozen=True)
class ModelSource:
    """One resolved model: its fp32 ONNX, its checkpoint (None for an ONNX-only model) and their hashes."""

    label: str
    onnx: Path
    checkpoint: Path | None
    onnx_sha256: str
    checkpoint_sha256: str | None
    origin: str  # "file", "exported" or "trained"
    train_seconds: float | None = None
    cached: bool = False

    def identity(self) -> dict[str, str | None]:
        """What cell keys depend on: the content of the model files, not where they are."""
        return {"onnx": self.onnx_sha256, "checkpoint": self.checkpoint_sha256}

    def to_json(self) -> dict[str, Any]:
        """JSON-able description (paths as strings)."""
        return {"label": self.label, "onnx": str(self.onnx), "checkpoint": str(self.checkpoint) if self.checkpoint
                else None, "onnx_sha256": self.onnx_sha256, "checkpoint_sha256": self.checkpoint_sha256,
                "origin": self.origin, "train_seconds": self.train_seconds, "cached": self.cached}


def data_fingerprint(cfg: DataConfig) -> str:
    """Hash of the dataset the recipe reads: its split (file names per split) and every file's size.

    Raises:
        DataError: unreadable dataset (synthetic data is generated first).
    """
    from qtool.data import load_splits

    splits = load_splits(cfg)
    sizes = [(str(s.path), s.path.stat().st_size, str(s.mask) if s.mask else None)
             for part in (splits.train, splits.holdout, splits.test) for s in part]
    return content_key({"split": splits.to_json(), "sizes": sizes})


def _from_file(label: str, path: Path, recipe: Recipe, cache: Cache) -> ModelSource:
    if not path.is_file():
        raise ModelError(f"sweep model {label}: file {path} not found")
    if path.suffix == ".onnx":
        return ModelSource(label, path, None, sha256_file(path), None, "file")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ModelError(f"sweep model {label}: {path} is neither a qtool checkpoint (.pt) nor ONNX (.onnx)")
    from qtool.runs import run_export

    ckpt_sha = sha256_file(path)
    key = content_key({"kind": "export", "checkpoint": ckpt_sha, "export": recipe.export.model_dump(mode="json"),
                       "seed": recipe.seed, "code": code_fingerprint(TRAINING_CODE)})
    cached = cache.has("models", key)
    if not cached:
        with cache.writing("models", key, {"checkpoint": str(path)}) as tmp:
            run_export(path, tmp / "model.onnx", recipe)
    onnx = cache.entry("models", key) / "model.onnx"
    return ModelSource(label, onnx, path, sha256_file(onnx), ckpt_sha, "exported", cached=cached)


def _trained(label: str, recipe: Recipe, data_fp: str, cache: Cache, progress: Progress) -> ModelSource:
    from qtool.runs import run_train

    if recipe.train.mode != "unified":
        raise RecipeError(f"recipe key train.mode: a sweep trains one unified model per model entry "
                          f"(got {recipe.train.mode!r}); give one-class models as sweep.models paths")
    sections = {k: getattr(recipe, k).model_dump(mode="json") for k in ("data", "model", "train", "export")}
    key = content_key({"kind": "train", "sections": sections, "seed": recipe.seed, "data": data_fp,
                       "code": code_fingerprint(TRAINING_CODE)})
    cached = cache.has("models", key)
    if not cached:
        with cache.partial("models", key) as work:
            if not cache.has("models", key):  # another sweep may have finished it while this one waited
                log.info("training model %s into %s (resumes from last.pt if present)", label, work)
                t0 = time.perf_counter()
                summary = run_train(recipe, work, export=True, progress=progress)
                summary["sweep_train_seconds"] = round(time.perf_counter() - t0, 2)
                write_json(work / "train.json", summary)
                cache.finish("models", key, work, {"label": label, "sections": sections})
    entry = cache.entry("models", key)
    summary = json.loads((entry / "train.json").read_text())
    ckpt, onnx = entry / "model.pt", entry / "model.onnx"
    return ModelSource(label, onnx, ckpt, sha256_file(onnx), sha256_file(ckpt), "trained",
                       train_seconds=summary.get("sweep_train_seconds"), cached=cached)


def resolve_models(recipe: Recipe, entries: dict[str, Any], data_fp: str, cache: Cache,
                   progress: Progress = None) -> dict[str, ModelSource]:
    """Label -> :class:`ModelSource` for every model entry (training or exporting what is not cached).

    Raises:
        ModelError: a missing or unknown model file. RecipeError: a non-unified training mode.
    """
    out = {}
    for i, (label, entry) in enumerate(entries.items()):
        if entry.path is not None:
            out[label] = _from_file(label, Path(entry.path), recipe, cache)
        else:
            model = merged_model(recipe, entry, f"sweep.models.{i}")
            trained = recipe.model_copy(update={"model": model})
            out[label] = _trained(label, trained, data_fp, cache, progress)
        log.info("model %s: %s", label, out[label].onnx)
    return out
