"""A tiny KD-shaped ONNX model whose anomaly signal lives in the outliers of one teacher tensor.

Teacher: relu(Laplacian of the image), large only where an image has sharp structure. Student: the
same filter at 0.9 x, saturated (Clip) at the largest teacher response seen on normals, as a student
that never saw anomalies. Map = sum over channels of (t - s)^2, score = max of the map. On smooth
normal images t ~ s; on scratches and noise blobs t >> s. Clipping the teacher tensor at its range on
normals makes t == s on every defect pixel: the anomaly is erased.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from scipy.ndimage import gaussian_filter

SIZE = 32
TEACHER_TENSOR = "/teacher/relu/Relu_output_0"
_LAPLACE = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], np.float32)


def smooth_normals(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """Seeded smooth random images (N, 3, S, S), zero mean and unit spread: the 'normal' texture."""
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.standard_normal((n, 3, size, size)), sigma=(0, 0, 3, 3), mode="wrap")
    return (x / x.std()).astype(np.float32)


def _weights(offset: float = 0.0) -> np.ndarray:
    """Two output channels, +Laplacian and -Laplacian of the channel mean, plus ``offset`` x the mean itself."""
    w = np.stack([_LAPLACE, -_LAPLACE])
    w[:, 1, 1] += offset
    return (w[:, None].repeat(3, axis=1) / 3.0).astype(np.float32)


def _responses(images: np.ndarray, offset: float) -> np.ndarray:
    from scipy.ndimage import correlate

    w = _weights(offset)[:, 0] * 3.0
    mean = images.mean(axis=1)
    return np.stack([[correlate(m, k, mode="constant") for k in w] for m in mean])


def outlier_model(normals: np.ndarray, offset: float = -0.05) -> onnx.ModelProto:
    """The model for ``normals``: the student saturates where its largest normal response is (<= the teacher's).

    So on normals t - s = -offset x mean (small), and once the teacher tensor is clipped at its
    range on normals, t - s on a defect pixel is at most the gap between the two maxima.
    """
    size = normals.shape[-1]
    teacher_max = float(np.maximum(_responses(normals, 0.0), 0).max())
    cap = min(teacher_max, float(_responses(normals, offset).max()))
    inits = [
        numpy_helper.from_array(_weights(), "t_w"), numpy_helper.from_array(np.zeros(2, np.float32), "t_b"),
        numpy_helper.from_array(_weights(offset), "s_w"), numpy_helper.from_array(np.zeros(2, np.float32), "s_b"),
        numpy_helper.from_array(np.array(0.0, np.float32), "s_lo"),
        numpy_helper.from_array(np.array(cap, np.float32), "s_hi"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    t_conv, s_conv = "/teacher/conv/Conv", "/student/conv/Conv"
    nodes = [
        helper.make_node("Conv", ["image", "t_w", "t_b"], [f"{t_conv}_output_0"], t_conv, **conv),
        helper.make_node("Relu", [f"{t_conv}_output_0"], [TEACHER_TENSOR], "/teacher/relu/Relu"),
        helper.make_node("Conv", ["image", "s_w", "s_b"], [f"{s_conv}_output_0"], s_conv, **conv),
        helper.make_node("Clip", ["/student/conv/Conv_output_0", "s_lo", "s_hi"], ["/student/clip/Clip_output_0"],
                         "/student/clip/Clip"),
        helper.make_node("Sub", [TEACHER_TENSOR, "/student/clip/Clip_output_0"], ["d"], "/head/Sub"),
        helper.make_node("Mul", ["d", "d"], ["d2"], "/head/Mul"),
        helper.make_node("ReduceSum", ["d2", "axis1"], ["anomaly_map"], "/head/ReduceSum", keepdims=1),
        helper.make_node("ReduceMax", ["anomaly_map"], ["score"], "/head/ReduceMax", axes=[1, 2, 3], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "outlier_kd",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, 1, size, size]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, [1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
