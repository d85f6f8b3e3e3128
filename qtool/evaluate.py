"""Run a model (torch checkpoint or ONNX file) over a split and score it with qtool.metrics.

fp32 and quantized models go through the same code: a Predictor maps a batch of preprocessed
images (B,3,S,S) to anomaly maps (B,S,S) and image scores (B,).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from qtool.data import ImageTransform, Sample, Splits, iter_batches
from qtool.errors import GraphError
from qtool.metrics import evaluate_arrays, threshold_from_normals
from qtool.models.base import KDModel
from qtool.recipe import EvalConfig

log = logging.getLogger(__name__)
Progress = Callable[[int], None] | None


class Predictor(Protocol):
    """Batch of images -> (maps (B,H,W), scores (B,))."""

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predict maps and scores for a preprocessed batch."""
        ...


class TorchPredictor:
    """Predictor over a torch KD model."""

    def __init__(self, model: KDModel) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the model on a numpy batch."""
        amap, score = self.model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
        return amap[:, 0].numpy(), score.numpy()


class OnnxPredictor:
    """Predictor over an ONNX model in ONNX Runtime (CPU); runs fixed-batch models one batch slice at a time.

    ``path`` is a file, or the serialized bytes of a model built in memory. ``level`` names an ORT
    ``GraphOptimizationLevel``: the default fuses QDQ into integer kernels (as deployed);
    ``ORT_ENABLE_BASIC`` keeps Q/DQ as float arithmetic (the spec's simulation, as calibration runs it).
    """

    def __init__(self, path: Path | bytes, threads: int = 2, level: str = "ORT_ENABLE_ALL") -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        source = path if isinstance(path, bytes) else str(path)
        try:
            self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            where = "an in-memory model" if isinstance(path, bytes) else path
            raise GraphError(f"ONNX Runtime cannot load {where}: {str(e).splitlines()[0]}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amap, score = self.session.run(self.output_names[:2], {self.input_name: images})
        return amap.reshape(len(images), *amap.shape[-2:]), score.reshape(len(images))

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the session on a numpy batch (sliced to the model's fixed batch size if it has one)."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.batch is None or self.batch == len(images):
            return self._run(images)
        maps, scores = [], []
        for i in range(0, len(images), self.batch):
            chunk = images[i : i + self.batch]
            pad = self.batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            m, s = self._run(chunk)
            maps.append(m[: self.batch - pad])
            scores.append(s[: self.batch - pad])
        return np.concatenate(maps), np.concatenate(scores)


def predict(predictor: Predictor, samples: list[Sample], transform: ImageTransform, batch_size: int,
            progress: Progress = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Run ``predictor`` over ``samples``.

    Returns:
        (maps (N,S,S) float32, scores (N,), masks (N,S,S) uint8, seconds spent in the predictor).
    """
    maps, scores, masks, seconds = [], [], [], 0.0
    for images, batch in iter_batches(samples, transform, batch_size):
        t0 = time.perf_counter()
        m, s = predictor(images)
        seconds += time.perf_counter() - t0
        maps.append(m.astype(np.float32))
        scores.append(s)
        masks.append(np.stack([transform.mask(x) for x in batch]).astype(np.uint8))
        if progress:
            progress(len(batch))
    return np.concatenate(maps), np.concatenate(scores), np.concatenate(masks), seconds


def evaluate(predictor: Predictor, splits: Splits, transform: ImageTransform, cfg: EvalConfig,
             progress: Progress = None, keep_maps: bool = False) -> dict[str, Any]:
    """Score ``predictor`` on ``splits.test``; the F1 threshold is fitted on held-out normals only.

    Returns:
        JSON-able dict: per-category and mean metrics, threshold, timing, the raw image scores and
        each test image's category; with ``keep_maps`` also ``"maps"``, the test anomaly maps
        (N,S,S) float32 (not JSON-able: callers pop it before writing).
    """
    threshold = None
    if splits.holdout:
        _, hold_scores, _, _ = predict(predictor, splits.holdout, transform, cfg.batch_size, progress)
        threshold = threshold_from_normals(hold_scores)
    maps, scores, masks, seconds = predict(predictor, splits.test, transform, cfg.batch_size, progress)
    labels = np.array([s.label for s in splits.test])
    cats = [s.category for s in splits.test]
    metrics = evaluate_arrays(labels, scores, masks, maps, cats, max_fpr=cfg.max_fpr, threshold=threshold)
    result = {
        "metrics": metrics,
        "threshold": threshold,
        "n_test": len(splits.test),
        "predict_seconds_per_image": seconds / max(1, len(splits.test)),
        "scores": [float(x) for x in scores],
        "files": [str(s.path) for s in splits.test],
        "labels": labels.tolist(),
        "categories": cats,
    }
    if keep_maps:
        result["maps"] = maps
    return result
