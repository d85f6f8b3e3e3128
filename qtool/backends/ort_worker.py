"""The measuring half of the ``cpu`` backend, run in a fresh process so its peak RSS is the model's.

Invoked as ``python -m qtool.backends.ort_worker '<json job>'``; prints one JSON line with the
latency samples and the process's memory high-water marks, or ``{"error": ...}`` and exit 3.
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any


def _status_kb(key: str) -> float | None:
    """A ``/proc/self/status`` field in kB (VmHWM: peak RSS, VmRSS: current RSS)."""
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return float(m.group(1)) if m else None


def _peak_rss_mb() -> float:
    hwm = _status_kb("VmHWM")
    # ru_maxrss is in kB on Linux; /proc is preferred because it is exact for this process.
    return (hwm if hwm is not None else float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)) / 1024.0


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Create the ORT session, warm up, time runs per the job's stopping rule; return samples and memory."""
    import numpy as np
    import onnxruntime as ort

    from qtool.backends.base import InputSpec, random_feeds

    rss_before = (_status_kb("VmRSS") or 0.0) / 1024.0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(job["threads"])
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    t0 = time.perf_counter()
    session = ort.InferenceSession(job["model"], opts, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    specs = [InputSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in job["inputs"]]
    feeds = random_feeds(specs, job["batch"])
    for _ in range(int(job["warmup"])):
        session.run(None, feeds)
    samples: list[float] = []
    stopped_by_cap = False
    exact = job.get("iterations")
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        session.run(None, feeds)
        samples.append((time.perf_counter() - t) * 1000.0)
        elapsed = time.perf_counter() - start
        if exact is not None:
            if len(samples) >= exact:
                break
            continue
        if len(samples) >= job["min_iterations"] and elapsed >= job["min_time_s"]:
            break
        if elapsed >= job["max_time_s"] and len(samples) >= 10:
            stopped_by_cap = True
            break
    return {"samples_ms": [float(x) for x in np.asarray(samples)], "load_s": load_s,
            "rss_before_session_mb": rss_before, "peak_rss_mb": _peak_rss_mb(),
            "stopped_by_time_cap": stopped_by_cap, "providers": session.get_providers(),
            "onnxruntime": ort.__version__, "numpy": np.__version__}


def main(argv: list[str]) -> int:
    """Run the job given as JSON in ``argv[1]``; print the result JSON; 0 on success, 3 on failure."""
    try:
        out = measure(json.loads(argv[1]))
    except Exception as e:  # reported to the parent as one line, which wraps it in a BackendError
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(json.dumps({"error": f"{type(e).__name__}: {msg}"}))
        return 3
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
