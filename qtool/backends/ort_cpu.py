"""``cpu`` backend: ONNX Runtime on this machine's CPU, timed in a fresh subprocess.

intra-op threads N, inter-op 1, sequential execution, graph optimisation ALL. The subprocess
reports its own peak RSS, so the memory figure is the model's and not this process's.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from qtool.backends.base import BenchOptions, BenchResult, LatencyStats, cpu_info, default_precision, model_facts
from qtool.errors import BackendError

log = logging.getLogger(__name__)


def default_threads() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class OrtCpuBackend:
    """Time an ONNX model with ONNX Runtime's CPU execution provider."""

    name: ClassVar[str] = "cpu"

    def __init__(self, options: BenchOptions) -> None:
        self.options = options

    def run(self, model: Path, batches: Sequence[int | None]) -> list[BenchResult]:
        """Measure ``model`` at each batch; see :class:`~qtool.backends.base.Backend`."""
        return [self.run_one(Path(model), b) for b in batches]

    def run_one(self, model: Path, batch: int | None) -> BenchResult:
        """Measure ``model`` at one batch size.

        Raises:
            BackendError: a precision other than the model's own, a failed or timed-out worker.
            GraphError: the model file cannot be read.
        """
        opts = self.options
        facts = model_facts(Path(model))
        stored = facts.stored_precision
        precision = stored if opts.precision is None else default_precision(opts.precision, facts.has_qdq)
        if precision != stored:
            raise BackendError(f"the cpu backend runs the model as stored ({stored}); precision {precision!r} "
                               f"needs a {precision} model (qtool ptq for int8)")
        fixed = facts.inputs[0].fixed_batch
        batch = batch or fixed or 1
        for spec in facts.inputs:
            spec.concrete_shape(batch)  # fail here, with the input's name, rather than in the worker
        threads = opts.threads or default_threads()
        job = {"model": str(Path(model).resolve()), "batch": batch, "threads": threads, "warmup": opts.warmup,
               "iterations": opts.iterations, "min_iterations": opts.min_iterations, "min_time_s": opts.min_time_s,
               "max_time_s": opts.max_time_s,
               "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in facts.inputs]}
        out = _run_worker(job, opts.timeout_s)
        lat = LatencyStats.from_samples(out["samples_ms"])
        n = len(out["samples_ms"])
        env = {**cpu_info(), "python": platform.python_version(), "platform": platform.platform(),
               "onnxruntime": out["onnxruntime"], "numpy": out["numpy"], "providers": out["providers"],
               "threads": {"intra_op": threads, "inter_op": 1, "execution_mode": "sequential",
                           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
               "graph_optimization": "ORT_ENABLE_ALL",
               "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        notes = _notes(env, n, facts.has_qdq, out)
        return BenchResult(
            device=self.name, device_name=env["cpu_model"], model=str(model), model_size_bytes=facts.size_bytes,
            model_sha256=facts.sha256, precision=precision, batch=batch, threads=threads, iterations=n,
            warmup_iterations=opts.warmup, warmup_ms=None, latency_ms=lat,
            # images per second over the timed runs: batch x runs / total timed seconds = batch x 1000 / mean
            throughput_ips=batch * 1000.0 / lat.mean, peak_rss_mb=round(out["peak_rss_mb"], 2),
            environment=env,
            extra={"session_load_s": round(out["load_s"], 4),
                   "rss_before_session_mb": round(out["rss_before_session_mb"], 2),
                   "model_rss_mb": round(out["peak_rss_mb"] - out["rss_before_session_mb"], 2)},
            notes=notes)


def _run_worker(job: dict, timeout_s: float) -> dict:
    """Run :mod:`qtool.backends.ort_worker` on ``job`` in a fresh interpreter and return its JSON."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # so the child imports this very qtool
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "qtool.backends.ort_worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise BackendError(f"cpu bench of {job['model']} timed out after {timeout_s:g} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BackendError(f"cpu bench worker failed (exit {proc.returncode}): {tail}")
    out = json.loads(lines[-1])
    if "error" in out:
        raise BackendError(f"ONNX Runtime cannot run {job['model']}: {out['error']}")
    return out


def _notes(env: dict, n: int, has_qdq: bool, out: dict) -> list[str]:
    """Caveats a reader of the numbers should see next to them."""
    notes = []
    if n < 100:
        notes.append(f"p99 from {n} runs is interpolated between the slowest runs; use >= 100 iterations")
    if out.get("stopped_by_time_cap"):
        notes.append(f"stopped at the time cap after {n} runs")
    flags = env["cpu_flags"]
    if has_qdq and not (flags["avx512_vnni"] or flags["avx_vnni"] or flags["amx_int8"]):
        notes.append("CPU has no VNNI/AMX: int8 runs on the slower non-VNNI u8s8 kernels")
    load, cpus = env.get("loadavg_1m"), env.get("affinity_cpus") or env.get("logical_cpus") or 1
    if load is not None and load > 0.5 * cpus:
        notes.append(f"load average {load:.1f} on {cpus} CPUs while measuring: other work shares the CPU")
    return notes
