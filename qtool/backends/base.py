"""What every backend shares: the options it takes, the result schema it returns, and model facts.

A backend turns (ONNX model, batch) into one :class:`BenchResult`; results serialise to plain JSON.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from qtool.artifacts import sha256_file
from qtool.errors import BackendError, GraphError

RESULT_SCHEMA = "qtool.bench/1"
PRECISIONS = ("fp32", "fp16", "int8")
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


@dataclass
class BenchOptions:
    """Everything a run can be asked for; each backend reads the fields it understands.

    ``iterations`` None means automatic: at least ``min_iterations`` timed runs and ``min_time_s``
    seconds (capped at ``max_time_s``); a number means exactly that many timed runs (trtexec: at
    least). ``warmup`` counts runs (cpu, cuda); trtexec warms up for ``warmup_ms``.
    """

    threads: int | None = None
    iterations: int | None = None
    warmup: int = 10
    warmup_ms: float = 500.0
    min_iterations: int = 100
    min_time_s: float = 2.0
    max_time_s: float = 60.0
    precision: str | None = None
    timeout_s: float = 900.0
    host: str | None = None
    ssh_options: list[str] = field(default_factory=list)
    ssh_config: str | None = None
    remote_cache_dir: str | None = None
    cache_dir: Path | None = None


@dataclass
class LatencyStats:
    """Latency summary in milliseconds (None where a tool does not report a statistic)."""

    p50: float
    p90: float | None
    p99: float | None
    mean: float
    std: float | None = None
    min: float | None = None
    max: float | None = None

    @classmethod
    def from_samples(cls, samples_ms: list[float] | np.ndarray) -> LatencyStats:
        """Percentiles (linear interpolation), mean, std (ddof 0), min and max of ``samples_ms``."""
        a = np.asarray(samples_ms, dtype=np.float64)
        if a.size == 0:
            raise BackendError("no latency samples were measured")
        p50, p90, p99 = (float(x) for x in np.percentile(a, [50, 90, 99]))
        return cls(p50, p90, p99, float(a.mean()), float(a.std()), float(a.min()), float(a.max()))


@dataclass
class BenchResult:
    """One measured (model, device, precision, batch) point.

    ``throughput_ips`` is images per second (batch x inferences per second); ``simulated`` is True
    when any measuring tool was a stand-in, in which case the numbers describe nothing real.
    ``peak_rss_mb`` (cpu) is the measuring process's peak RSS, runtime included (``extra`` holds the
    part added by the session); ``device_memory_mb`` is GPU memory (cuda) or the Jetson's peak
    system RAM in use (shared by its CPU and GPU).
    """

    device: str
    device_name: str
    model: str
    model_size_bytes: int
    model_sha256: str
    precision: str
    batch: int
    threads: int | None
    iterations: int
    warmup_iterations: int | None
    warmup_ms: float | None
    latency_ms: LatencyStats
    throughput_ips: float
    peak_rss_mb: float | None = None
    device_memory_mb: float | None = None
    host: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    reference: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    simulated: bool = False
    timestamp: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    schema: ClassVar[str] = RESULT_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (``latency_ms`` as a nested mapping)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchResult:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["latency_ms"] = LatencyStats(**data["latency_ms"])
        return cls(**data)


class Backend(Protocol):
    """A way to run and time an ONNX model on one kind of device."""

    name: ClassVar[str]

    def __init__(self, options: BenchOptions) -> None: ...

    def run(self, model: Path, batches: Sequence[int | None]) -> list[BenchResult]:
        """Measure ``model`` at each batch size (None: the model's own fixed batch, else 1).

        Raises:
            BackendError: one line naming what is missing or failed.
        """
        ...


@dataclass(frozen=True)
class ModelFacts:
    """What a result records about the model file, and what a backend needs to feed it."""

    path: Path
    size_bytes: int
    sha256: str
    inputs: list[InputSpec]
    has_qdq: bool
    has_fp16: bool = False  # float16 weights (an fp16 conversion)

    @property
    def stored_precision(self) -> str:
        """What the file holds: int8 (QDQ), fp16 (float16 weights) or fp32."""
        return "int8" if self.has_qdq else "fp16" if self.has_fp16 else "fp32"


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, shape (ints or symbolic names) and numpy dtype name."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    @property
    def fixed_batch(self) -> int | None:
        """The first dimension if it is a number, else None (dynamic batch)."""
        return self.shape[0] if self.shape and isinstance(self.shape[0], int) else None

    def concrete_shape(self, batch: int | None) -> tuple[int, ...]:
        """Shape with the batch filled in.

        Raises:
            BackendError: a fixed batch differs from ``batch``, or a non-batch dimension is symbolic.
        """
        if not self.shape:
            return ()
        first = self.fixed_batch
        if first is not None and batch is not None and batch != first:
            raise BackendError(f"input {self.name!r} has a fixed batch of {first}; batch {batch} needs a "
                               "dynamic-batch export")
        dims = [first if first is not None else (batch or 1)]
        for d in self.shape[1:]:
            if not isinstance(d, int):
                raise BackendError(f"input {self.name!r} has a symbolic dimension {d!r} besides the batch; "
                                   "export with a fixed image size")
            dims.append(d)
        return tuple(dims)


def model_facts(path: Path) -> ModelFacts:
    """Size, SHA-256, inputs and whether ``path`` holds QuantizeLinear/DequantizeLinear nodes.

    Raises:
        GraphError: the file is missing or not a readable ONNX model.
    """
    import onnx
    from onnx import helper

    path = Path(path)
    if not path.is_file():
        raise GraphError(f"model file {path} not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise GraphError(f"cannot read ONNX model {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    init = {i.name for i in model.graph.initializer}
    inputs = []
    for vi in model.graph.input:
        if vi.name in init:
            continue
        t = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        inputs.append(InputSpec(vi.name, shape, dtype))
    if not inputs:
        raise GraphError(f"model {path} has no graph inputs to feed")
    has_qdq = any(n.op_type in QDQ_OPS for n in model.graph.node)
    has_fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    return ModelFacts(path, path.stat().st_size, sha256_file(path), inputs, has_qdq, has_fp16)


def random_feeds(inputs: list[InputSpec], batch: int | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs of each input's shape and dtype (standard normal for floats)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        shape, dt = spec.concrete_shape(batch), np.dtype(spec.dtype)
        if dt.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind in "iu":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dt)
        elif dt.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise BackendError(f"input {spec.name!r} has dtype {dt.name}, which bench cannot generate")
    return feeds


def default_precision(requested: str | None, has_qdq: bool) -> str:
    """The precision to run: as asked, else int8 for a QDQ model and fp32 otherwise.

    Raises:
        BackendError: ``requested`` is not one of :data:`PRECISIONS`.
    """
    if requested is None:
        return "int8" if has_qdq else "fp32"
    if requested not in PRECISIONS:
        raise BackendError(f"unknown precision {requested!r}; available: {', '.join(PRECISIONS)}")
    return requested


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """CPU model and the instruction-set flags that decide int8 speed, from /proc/cpuinfo text."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags_line = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimddp", "i8mm")
    return {"cpu_model": model.group(1).strip() if model else "unknown",
            "cpu_flags": {f: f in flags for f in wanted},
            "logical_cpus": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
