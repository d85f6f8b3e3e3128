"""Tiny KD anomaly models (a few KB) and their ONNX exports for graph tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

SIZE = 16


def _branch(student: bool, act: str) -> nn.Module:
    if student:
        return _Student(act)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
    )


class _Student(nn.Module):
    """Conv-act, Conv + residual Add, act, Conv-act, MaxPool: same output shape as the teacher."""

    def __init__(self, act: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.act = nn.Tanh() if act == "tanh" else nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv1(x))
        b = torch.relu(self.conv2(a) + a)
        return self.pool(torch.relu(self.conv3(b)))


class _Head(nn.Module):
    """Normalise features, squared difference, upsample to the input, score = max of the map."""

    def forward(self, t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = 0.5 * ((F.normalize(t, dim=1) - F.normalize(s, dim=1)) ** 2).sum(1, keepdim=True)
        amap = F.interpolate(d, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return amap, amap.flatten(1).amax(1)


class TinyKD(nn.Module):
    """teacher/student/head submodules, like the bundled models."""

    def __init__(self, student_act: str = "relu", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.teacher = _branch(False, "relu")
        self.student = _branch(True, student_act)
        self.head = _Head()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.teacher(x), self.student(x))


def export_tiny(path: Path, student_act: str = "relu", batch: int = 1, dynamic: bool = False) -> Path:
    """Export a seeded :class:`TinyKD` with the legacy exporter (opset 17)."""
    model = TinyKD(student_act).eval()
    x = torch.randn(batch, 3, SIZE, SIZE)
    axes = {"input": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}} if dynamic else None
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["anomaly_map", "score"],
        dynamic_axes=axes,
    )
    return Path(path)


def tiny_model(tmp_path: Path, **kw) -> onnx.ModelProto:
    """Export and load a TinyKD."""
    return onnx.load(str(export_tiny(tmp_path / "tiny.onnx", **kw)))


def calib_batches(n: int = 4, batch: int = 1, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Seeded Gaussian calibration feeds for the ``input`` tensor."""
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)} for _ in range(n)]
