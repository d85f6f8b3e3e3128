"""ONNX Runtime helpers for graph tests: run a model, numpy min/max ranges, optimised-graph dumps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qtool.graph import add_outputs


def session(model: onnx.ModelProto | Path, level: str = "ORT_DISABLE_ALL", optimized: Path | None = None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run(model, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    sess = session(model)
    return [sess.run(None, f) for f in feeds]


def minmax_ranges(model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]]) -> dict:
    """Independent numpy MinMax: expose ``names`` as outputs, take min/max over every batch."""
    probe = add_outputs(model, names)
    sess = session(probe)
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for f in feeds:
        for n, v in zip(names, sess.run(names, f), strict=True):
            lo[n] = min(lo[n], float(v.min()))
            hi[n] = max(hi[n], float(v.max()))
    return {n: (lo[n], hi[n]) for n in names}


def optimized_ops(model: onnx.ModelProto, tmp: Path, level: str = "ORT_ENABLE_EXTENDED") -> list[tuple[str, str]]:
    """(op_type, name) of every node after ORT's CPU graph optimisation."""
    out = tmp / "optimized.onnx"
    session(model, level, optimized=out)
    return [(n.op_type, n.name) for n in onnx.load(str(out)).graph.node]


def map_outputs(model: onnx.ModelProto, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps (N, S, S) and scores (N,) of a KD model from one plain ORT session, image by image."""
    sess = session(model, "ORT_ENABLE_BASIC")
    runs = [sess.run(["anomaly_map", "score"], {"image": x[None]}) for x in images]
    return np.concatenate([m[:, 0] for m, _ in runs]), np.concatenate([s for _, s in runs])
