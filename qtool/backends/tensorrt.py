"""``cuda`` backend: a TensorRT engine built from the (QDQ) ONNX on this machine's GPU.

Timed with CUDA events. tensorrt and torch.cuda are imported inside the functions that use them, so this
module imports everywhere; engines and timing caches are cached by model hash + TensorRT version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from qtool.artifacts import atomic_path
from qtool.backends.base import BenchOptions, BenchResult, LatencyStats, ModelFacts, default_precision, model_facts
from qtool.errors import BackendError

log = logging.getLogger(__name__)
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "qtool" / "tensorrt"


def import_tensorrt() -> Any:
    """The ``tensorrt`` module.

    Raises:
        BackendError: TensorRT is not installed.
    """
    try:
        import tensorrt
    except ImportError:
        raise BackendError("TensorRT is not installed (pip install qtool[tensorrt]); the cuda backend needs it "
                           "and a CUDA GPU") from None
    return tensorrt


def cuda_device() -> dict[str, Any]:
    """Name and compute capability of CUDA device 0.

    Raises:
        BackendError: torch has no CUDA or no GPU is visible.
    """
    import os

    import torch

    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise BackendError("no CUDA GPU visible (torch.cuda.is_available() is False"
                           + (f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "") + ")")
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}",
            "cuda": torch.version.cuda}


def builder_flags(precision: str, has_qdq: bool) -> list[str]:
    """TensorRT ``BuilderFlag`` names for a precision.

    A QDQ model always needs INT8 (explicit quantization); fp16 adds FP16; fp32 adds nothing.

    Raises:
        BackendError: int8 asked of a model without Q/DQ nodes (no implicit calibration here).
    """
    if precision == "int8" and not has_qdq:
        raise BackendError("int8 needs a QDQ model (explicit quantization); run qtool ptq --target tensorrt first")
    flags = ["INT8"] if has_qdq else []
    if precision == "fp16":
        flags.append("FP16")
    return flags


def cache_key(model_sha256: str, trt_version: str, precision: str, shapes: dict[str, list[int]],
              device: str) -> str:
    """Hex key of an engine: model bytes, TensorRT version, precision, input shapes and GPU."""
    blob = json.dumps({"model": model_sha256, "trt": trt_version, "precision": precision, "shapes": shapes,
                       "device": device}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cache_paths(cache_dir: Path, key: str, trt_version: str) -> tuple[Path, Path]:
    """(engine path, timing-cache path); the timing cache is shared by every model of one TRT version."""
    return Path(cache_dir) / f"{key}.engine", Path(cache_dir) / f"timing-trt{trt_version}.cache"


def build_engine(trt: Any, onnx_path: Path, flags: list[str], shapes: dict[str, list[int]],
                 timing_cache: Path) -> bytes:
    """Parse the ONNX, build a serialized engine with ``flags`` and a fixed-shape profile; update the timing cache.

    Raises:
        BackendError: the parser or the builder failed (first parser error named).
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 8.x needs the explicit-batch flag; 10 made it the only mode and deprecated the flag.
    major = int(trt.__version__.split(".")[0])
    explicit = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if major < 10 else 0
    network = builder.create_network(explicit)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        err = parser.get_error(0) if parser.num_errors else "unknown parser error"
        raise BackendError(f"TensorRT cannot parse {onnx_path}: {err}")
    config = builder.create_builder_config()
    for f in flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = shapes[t.name]
        profile.set_shape(t.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BackendError(f"TensorRT failed to build an engine for {onnx_path} (flags {flags or ['none']})")
    with atomic_path(timing_cache) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(engine)


def time_engine(trt: Any, engine_bytes: bytes, feeds: dict[str, Any], warmup: int, iterations: int) -> dict:
    """Run the engine ``warmup`` + ``iterations`` times on torch CUDA buffers; per-run ms from CUDA events."""
    import numpy as np
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    context = engine.create_execution_context()
    torch.cuda.reset_peak_memory_stats()
    buffers = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            buffers[name] = torch.from_numpy(feeds[name]).cuda()
            context.set_input_shape(name, tuple(buffers[name].shape))
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if name not in buffers:
            dtype = torch.from_numpy(np.zeros(1, trt.nptype(engine.get_tensor_dtype(name)))).dtype
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.Stream()
    samples = []
    with torch.cuda.stream(stream):
        for i in range(warmup + iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            context.execute_async_v3(stream.cuda_stream)
            end.record(stream)
            end.synchronize()
            if i >= warmup:
                samples.append(start.elapsed_time(end))
    return {"samples_ms": samples, "device_memory_mb": torch.cuda.max_memory_allocated() / 2**20
            + getattr(engine, "device_memory_size", 0) / 2**20}


class TensorRTBackend:
    """Build (or load from cache) a TensorRT engine and time it with CUDA events."""

    name: ClassVar[str] = "cuda"

    def __init__(self, options: BenchOptions) -> None:
        self.options = options

    def run(self, model: Path, batches: Sequence[int | None]) -> list[BenchResult]:
        """Measure ``model`` at each batch on CUDA device 0; see :class:`~qtool.backends.base.Backend`.

        Raises:
            BackendError: TensorRT missing, no GPU, parse/build failure.
        """
        trt = import_tensorrt()
        gpu = cuda_device()
        facts = model_facts(Path(model))
        precision = default_precision(self.options.precision, facts.has_qdq)
        flags = builder_flags(precision, facts.has_qdq)
        return [self._run_one(trt, gpu, facts, precision, flags, b) for b in batches]

    def _run_one(self, trt: Any, gpu: dict, facts: ModelFacts, precision: str, flags: list[str],
                 batch: int | None) -> BenchResult:
        from qtool.backends.base import random_feeds

        opts = self.options
        batch = batch or facts.inputs[0].fixed_batch or 1
        shapes = {s.name: list(s.concrete_shape(batch)) for s in facts.inputs}
        cache_dir = Path(opts.cache_dir or DEFAULT_CACHE_DIR)
        cache_dir.mkdir(parents=True, exist_ok=True)
        device = f"{gpu['name']} sm{gpu['compute_capability']}"
        key = cache_key(facts.sha256, trt.__version__, precision, shapes, device)
        engine_path, timing_path = cache_paths(cache_dir, key, trt.__version__)
        notes = []
        if engine_path.is_file():
            engine = engine_path.read_bytes()
            notes.append(f"engine loaded from cache {engine_path}")
        else:
            engine = build_engine(trt, facts.path, flags, shapes, timing_path)
            with atomic_path(engine_path) as tmp:
                tmp.write_bytes(engine)
        iterations = opts.iterations or opts.min_iterations
        out = time_engine(trt, engine, random_feeds(facts.inputs, batch), opts.warmup, iterations)
        lat = LatencyStats.from_samples(out["samples_ms"])
        if iterations < 100:
            notes.append(f"p99 from {iterations} runs is interpolated between the slowest runs")
        notes.append("latency is GPU time between CUDA events around execute_async_v3 (inputs already on the GPU)")
        return BenchResult(
            device=self.name, device_name=gpu["name"], model=str(facts.path), model_size_bytes=facts.size_bytes,
            model_sha256=facts.sha256, precision=precision, batch=batch, threads=None, iterations=iterations,
            warmup_iterations=opts.warmup, warmup_ms=None, latency_ms=lat, throughput_ips=batch * 1000.0 / lat.mean,
            device_memory_mb=round(out["device_memory_mb"], 2),
            environment={"tensorrt": trt.__version__, **gpu, "builder_flags": flags,
                         "python": platform.python_version(), "engine_cache": str(engine_path),
                         "timing_cache": str(timing_path)},
            notes=notes)
