"""torch KD model (+ its anomaly-map head) -> ONNX with fixed input size.

Input ``image`` (B,3,S,S); outputs ``anomaly_map`` (B,1,S,S) and ``score`` (B,). The legacy
TorchScript exporter is used on purpose: it folds BatchNorm in eval mode and names nodes by module
path (``/teacher/...``, ``/student/...``, ``/head/...``), which the PTQ part policy relies on.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from qtool.artifacts import atomic_path
from qtool.errors import GraphError
from qtool.models.base import KDModel

log = logging.getLogger(__name__)
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")


def export_onnx(model: KDModel, path: Path, image_size: int, batch_size: int = 1, opset: int = 17) -> Path:
    """Export ``model``'s inference graph to ``path`` (atomically) and check it with onnx.checker.

    Raises:
        GraphError: the exporter or the checker failed.
    """
    import onnx

    model = model.eval()
    dummy = torch.zeros(batch_size, 3, image_size, image_size)
    with atomic_path(Path(path)) as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice
                torch.onnx.export(
                    model, (dummy,), str(tmp), dynamo=False, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), do_constant_folding=True,
                )
            onnx.checker.check_model(str(tmp))
        except Exception as e:
            raise GraphError(f"ONNX export of {type(model).__name__} failed: {str(e).splitlines()[0]}") from e
    log.info("exported %s", path)
    return Path(path)


def parity(model: KDModel, onnx_path: Path, images: np.ndarray) -> dict[str, float]:
    """Max absolute and relative difference between torch and ONNX Runtime on ``images``."""
    from qtool.evaluate import OnnxPredictor, TorchPredictor

    t_map, t_score = TorchPredictor(model)(images)
    o_map, o_score = OnnxPredictor(onnx_path)(images)
    scale = float(np.abs(t_map).max()) or 1.0
    return {
        "map_max_abs": float(np.abs(t_map - o_map).max()),
        "map_max_rel": float(np.abs(t_map - o_map).max() / scale),
        "score_max_abs": float(np.abs(t_score - o_score).max()),
    }
