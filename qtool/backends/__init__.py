"""Backends run and time an ONNX model on a device.

``cpu`` (ONNX Runtime), ``cuda`` (TensorRT), ``jetson`` (trtexec over SSH). Found by name in
:data:`BACKENDS`; plugins join through the ``qtool.backends`` entry-point group. Hardware
libraries are imported only when a backend runs.
"""

from __future__ import annotations

from qtool.backends.base import PRECISIONS, Backend, BenchOptions, BenchResult, LatencyStats
from qtool.backends.jetson import JetsonBackend
from qtool.backends.ort_cpu import OrtCpuBackend
from qtool.backends.tensorrt import TensorRTBackend
from qtool.registry import Registry

BACKENDS: Registry[type] = Registry("backend", entry_point_group="qtool.backends")
for _cls in (OrtCpuBackend, TensorRTBackend, JetsonBackend):
    BACKENDS.add(_cls.name, _cls)


def get_backend(name: str, options: BenchOptions) -> Backend:
    """An instance of the backend registered as ``name``.

    Raises:
        RegistryError: unknown name; the message lists the available backends.
    """
    return BACKENDS.get(name)(options)


__all__ = ["BACKENDS", "PRECISIONS", "Backend", "BenchOptions", "BenchResult", "LatencyStats", "get_backend"]
