"""Calibration cost: qtool's streaming calibrators vs onnxruntime's own, same model, same images.

Each calibrator runs in a fresh subprocess (peak resident memory from os.wait4 of that child) over
the same preprocessed images (an .npy memory map written once): qtool entropy / percentile (driver
qtool.calibrate + calibrators/) and onnxruntime's create_calibrator with CalibrationMethod.Entropy and
Percentile (2048 bins), each calibrating the tensors of the same op types. A last check shows what
onnxruntime's quantize_static does with CalibrationMethod.Entropy (its ranges vs MinMax's).

Run: .venv/bin/python bench/calib_cost.py --model M.onnx --images 256   (default: MTD holdout+train
normals, an STFPM exported by qtool). Writes bench/results/calib_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OP_TYPES = ["Conv", "Add", "Clip", "Pad", "Mul", "Concat", "Resize", "MaxPool", "AveragePool"]


def worker(kind: str, model: str, images: str) -> None:
    """Calibrate in this process and print one JSON line (time, tensors)."""
    import onnx

    data = np.load(images, mmap_mode="r")
    t0 = time.perf_counter()
    if kind.startswith("qtool-"):
        from calibrators import get_calibrator
        from qtool.calibrate import calibrate
        from qtool.graph import build_spec, get_profile, load_model, prepare
        from qtool.recipe import PtqConfig

        prepared = prepare(load_model(model))
        spec = build_spec(prepared, PtqConfig(quantize="both"), get_profile("cpu"))
        tensors = spec.tensors_to_calibrate()
        cal = get_calibrator(kind.split("-", 1)[1], symmetric=False, num_bits=8)
        batches = (np.asarray(data[i : i + 8]) for i in range(0, len(data), 8))
        ranges = calibrate(prepared, tensors, batches, cal, threads=2, group=8)
        n = len(ranges)
    else:
        from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.i = 0

            def get_next(self):
                if self.i >= len(data):
                    return None
                self.i += 1
                return {"image": np.asarray(data[self.i - 1 : self.i])}

        method = {"ort-entropy": CalibrationMethod.Entropy, "ort-percentile": CalibrationMethod.Percentile}[kind]
        with tempfile.TemporaryDirectory() as tmp:
            cal = create_calibrator(model, OP_TYPES, augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                    calibrate_method=method, extra_options={"num_bins": 2048})
            cal.collect_data(Reader())
            ranges = cal.compute_data()
            n = len(ranges.data) if hasattr(ranges, "data") else len(ranges)
    del onnx
    print(json.dumps({"seconds": time.perf_counter() - t0, "tensors": n}))


def measure(kind: str, model: Path, images: Path, mem_limit_gb: float) -> dict:
    """Run one calibrator in a child capped at ``mem_limit_gb`` of address space; peak RSS from its rusage.

    A child that fails (out of memory under the cap) is recorded as failed with its last error line.
    """
    import resource

    def cap() -> None:
        limit = int(mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errf:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", kind, "--model", str(model), "--npy",
                                 str(images)], stdout=subprocess.PIPE, stderr=errf, text=True, preexec_fn=cap)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        errf.seek(0)
        err = errf.read()
    if status != 0:
        last = (err.strip().splitlines() or ["no output"])[-1][:200]
        code = os.waitstatus_to_exitcode(status)
        return {"kind": kind, "failed": f"exit {code} under a {mem_limit_gb} GB address-space cap: {last}",
                "seconds": round(time.perf_counter() - t0, 1)}
    res = json.loads(out.strip().splitlines()[-1])
    return {"kind": kind, **res, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "seconds": round(res["seconds"], 2)}


def default_model(work: Path, size: int) -> Path:
    from qtool.export import export_onnx
    from qtool.models import build_model
    from qtool.recipe import ModelConfig

    path = work / f"stfpm_lite0_{size}.onnx"
    if not path.exists():
        export_onnx(build_model(ModelConfig(), size), path, size)
    return path


def prepare_images(work: Path, n: int, size: int) -> Path:
    from qtool.data import ImageTransform, load_splits
    from qtool.recipe import DataConfig

    path = work / f"mtd_normals_{n}_{size}.npy"
    if not path.exists():
        cfg = DataConfig(format="mtd", root=str(HERE.parents[1] / "shared" / "data" / "mtd"), image_size=size,
                         normalize="per-image")
        splits = load_splits(cfg)
        tr = ImageTransform(cfg)
        samples = [*splits.holdout, *splits.train][:n]
        np.save(path, np.stack([tr.image(s.path) for s in samples]).astype(np.float32))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--npy", default=None)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--kinds", default="qtool-entropy,qtool-percentile,ort-entropy,ort-percentile")
    ap.add_argument("--mem-limit-gb", type=float, default=20.0, help="address-space cap of each child")
    ap.add_argument("--out", default=str(HERE / "results" / "calib_cost"), help="results path without suffix")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.npy)
        return
    from qtool.artifacts import package_versions, write_json

    work = HERE / "work"
    work.mkdir(exist_ok=True)
    model = Path(args.model) if args.model else default_model(work, args.size)
    images = prepare_images(work, args.images, args.size)
    rows = []
    for kind in args.kinds.split(","):
        rows.append(measure(kind, model, images, args.mem_limit_gb))
        print(rows[-1], flush=True)
    by = {r["kind"]: r for r in rows}
    ratios = {}
    for m in ("entropy", "percentile"):
        q, o = by.get(f"qtool-{m}"), by.get(f"ort-{m}")
        if q and o and "failed" not in q and "failed" not in o:
            ratios[m] = {"peak_memory_ort_over_qtool": round(o["peak_rss_mb"] / q["peak_rss_mb"], 2),
                         "time_ort_over_qtool": round(o["seconds"] / q["seconds"], 2)}
    cmd = f"python bench/calib_cost.py --images {args.images} --size {args.size} --kinds {args.kinds}" + (
        f" --model {args.model}" if args.model else "") + f" --mem-limit-gb {args.mem_limit_gb} --out {args.out}"
    meta = {"command": cmd, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "versions": package_versions(), "model": str(model), "images": args.images}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), {"meta": meta, "rows": rows, "ratios": ratios})
    lines = ["# Calibration cost: qtool vs onnxruntime calibrators", "", f"`{cmd}`", "",
             f"{args.images} images, model {model.name}", "", "| calibrator | seconds | peak RSS MB | tensors |",
             "|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['seconds']} | {r.get('peak_rss_mb', '-')} | {r.get('tensors', r.get('failed'))} |"
              for r in rows]
    lines += ["", "Ratios (onnxruntime / qtool): " + json.dumps(ratios)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
