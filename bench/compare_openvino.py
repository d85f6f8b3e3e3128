"""qtool int8 (ONNX Runtime, ``cpu`` profile) against OpenVINO fp32 and OpenVINO + NNCF int8, one run.

Same ONNX model, same calibration images (the recipe's ``ptq.calib_data``), same machine and thread
count: latency (and ratios), image/pixel AUROC of each through ``qtool.evaluate``, and a measured
int8 efficiency: the model's int8 MAC rate over this CPU's int8 GEMM rate, both measured in this run
(ONNX Runtime MatMulInteger, 2048^3). OpenVINO fp32 is compiled with INFERENCE_PRECISION_HINT=f32:
on CPUs with AVX512-BF16/AMX the CPU plugin otherwise runs bf16 without saying so.

    .venv/bin/python bench/compare_openvino.py --model runs/x/train/model.onnx --recipe recipes/quickstart.yaml
    .venv/bin/python bench/compare_openvino.py --smoke      # tiny untrained model on synthetic data

Writes ``bench/results/compare_openvino.{json,md}`` (``--out-dir``; the smoke run writes to a temp dir).
Needs ``pip install openvino nncf`` beside qtool.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from qtool.artifacts import atomic_write_text, write_json
from qtool.backends import BenchOptions, get_backend
from qtool.backends.base import LatencyStats, cpu_info
from qtool.backends.ort_cpu import default_threads
from qtool.calib_data import calibration_set
from qtool.data import ImageTransform, load_splits
from qtool.evaluate import OnnxPredictor, evaluate
from qtool.modelio import open_model
from qtool.recipe import Recipe, load_recipe

log = logging.getLogger("compare_openvino")


class OpenVinoPredictor:
    """qtool Predictor over a compiled OpenVINO model: (B,3,H,W) -> (maps (B,H,W), scores (B,))."""

    def __init__(self, compiled: Any, batch: int | None) -> None:
        self.request = compiled.create_infer_request()
        names = [o.get_any_name() for o in compiled.outputs]
        self.outputs = [compiled.outputs[names.index(n)] if n in names else compiled.outputs[i]
                        for i, n in enumerate(("anomaly_map", "score"))]
        self.batch = batch

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        res = self.request.infer({0: images})
        amap, score = (np.asarray(res[o]) for o in self.outputs)
        return amap.reshape(len(images), *amap.shape[-2:]), score.reshape(len(images))

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predict a batch, sliced (and padded) to the model's fixed batch if it has one."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.batch is None or len(images) == self.batch:
            return self._run(images)
        maps, scores = [], []
        for i in range(0, len(images), self.batch):
            chunk = images[i : i + self.batch]
            pad = self.batch - len(chunk)
            m, s = self._run(np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk)
            maps.append(m[: len(chunk)])
            scores.append(s[: len(chunk)])
        return np.concatenate(maps), np.concatenate(scores)


def ov_compile(core: Any, model: Any, threads: int) -> Any:
    """Compile for CPU in f32 (explicitly), latency mode, one stream, ``threads`` threads."""
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
                                             "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})


def time_ov(compiled: Any, x: np.ndarray, warmup: int, iterations: int | None, min_time_s: float = 2.0) -> LatencyStats:
    """Per-inference latency of a compiled model (same stopping rule as qtool's cpu backend)."""
    req = compiled.create_infer_request()
    for _ in range(warmup):
        req.infer({0: x})
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        req.infer({0: x})
        samples.append((time.perf_counter() - t) * 1000.0)
        elapsed = time.perf_counter() - start
        if iterations is not None and len(samples) >= iterations:
            break
        if iterations is None and ((len(samples) >= 100 and elapsed >= min_time_s) or elapsed >= 60):
            break
    return LatencyStats.from_samples(samples)


def gemm_rates(threads: int, n: int = 2048, runs: int = 5) -> dict[str, float]:
    """Measured ops/s (2*n^3 per run, median run) of ONNX Runtime MatMulInteger (u8 x s8) and fp32 MatMul."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out = {}
    for name, op, a_type, b in (
        ("int8_ops_per_s", "MatMulInteger", TensorProto.UINT8, rng.integers(-127, 128, (n, n), dtype=np.int8)),
        ("fp32_ops_per_s", "MatMul", TensorProto.FLOAT, rng.standard_normal((n, n)).astype(np.float32)),
    ):
        a = helper.make_tensor_value_info("a", a_type, [n, n])
        y_type = TensorProto.INT32 if op == "MatMulInteger" else TensorProto.FLOAT
        y = helper.make_tensor_value_info("y", y_type, [n, n])
        g = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "gemm", [a], [y],
                              [numpy_helper.from_array(b, "b")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        x = rng.integers(0, 256, (n, n), dtype=np.uint8) if op == "MatMulInteger" else \
            rng.standard_normal((n, n)).astype(np.float32)
        sess.run(None, {"a": x})
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            sess.run(None, {"a": x})
            times.append(time.perf_counter() - t)
        out[name] = 2.0 * n**3 / float(np.median(times))
    return out


def conv_macs(path: Path) -> dict[str, int]:
    """MACs per model run of Conv/ConvTranspose/MatMul/Gemm nodes, split into int8 and float.

    int8: activation and weight both come from DequantizeLinear. Shapes from ONNX shape inference.
    """
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    shapes = {i.name: list(i.dims) for i in g.initializer}
    for vi in [*g.input, *g.output, *g.value_info]:
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    producer = {o: n for n in g.node for o in n.output}
    dq_src = {n.output[0]: n.input[0] for n in g.node if n.op_type == "DequantizeLinear"}
    out = {"int8": 0, "float": 0}
    for n in g.node:
        if n.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            continue
        w = shapes.get(dq_src.get(n.input[1], n.input[1])) or shapes.get(n.input[1])
        y, x = shapes.get(n.output[0]), shapes.get(n.input[0])
        if not w or not y or not x or 0 in y:
            continue
        if n.op_type == "Conv":
            macs = int(np.prod(y)) * int(np.prod(w[1:]))
        elif n.op_type == "ConvTranspose":
            macs = int(np.prod(x)) * int(np.prod(w[1:]))
        else:
            macs = int(np.prod(y)) * int(x[-1])
        quantized = all(i in producer and producer[i].op_type == "DequantizeLinear" for i in n.input[:2])
        out["int8" if quantized else "float"] += macs
    return out


def _setup(args: argparse.Namespace, work: Path) -> tuple[Path, Recipe]:
    """The fp32 model and recipe: the given ones, or (smoke) an untrained tiny STFPM on synthetic data."""
    if not args.smoke:
        return Path(args.model), load_recipe(args.recipe, list(args.set))
    from qtool.models import build_model, save_checkpoint
    from qtool.runs import run_export

    recipe = load_recipe(None, [f"data.root={work / 'data'}", "data.image_size=64", "data.synth.categories=[grid]",
                                "data.synth.n_train=12", "data.synth.n_test_good=4", "data.synth.n_test_defect=4",
                                "data.synth.size=64", "ptq.calib=minmax", "ptq.calib_data.num_samples=8",
                                "eval.batch_size=4", *args.set])
    ckpt = save_checkpoint(build_model(recipe.model, 64), work / "model.pt", recipe)
    return run_export(ckpt, work / "fp32.onnx", recipe)["onnx"], recipe


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison; write JSON and Markdown; return the JSON document."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="fp32 ONNX exported by qtool (carries its transform)")
    p.add_argument("--recipe", help="recipe whose data, ptq.calib_data and eval sections are used")
    p.add_argument("--set", action="append", default=[], help="recipe override key=value (repeatable)")
    p.add_argument("--int8", help="an existing qtool int8 (cpu profile) ONNX; default: run qtool ptq now")
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--iterations", type=int, default=None, help="timed runs (default: >= 100 and >= 2 s)")
    p.add_argument("--out-dir", default=None, help="default bench/results (smoke: a temp dir)")
    p.add_argument("--smoke", action="store_true", help="tiny untrained model on synthetic data")
    args = p.parse_args(argv)
    if not args.smoke and not args.model:
        p.error("--model is required (or --smoke)")
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        sys.exit(f"error: {e.name} is not installed: pip install openvino nncf")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(tempfile.mkdtemp(prefix="qtool-ov-"))
    out_dir = Path(args.out_dir or (work if args.smoke else Path(__file__).parent / "results"))
    fp32, recipe = _setup(args, work)
    recipe = recipe.model_copy(update={"ptq": recipe.ptq.model_copy(update={"target": "cpu"})})
    data_cfg = open_model(fp32).apply_transform(recipe.data)
    recipe = recipe.model_copy(update={"data": data_cfg})
    splits, transform = load_splits(data_cfg), ImageTransform(data_cfg)
    if args.int8:
        int8 = Path(args.int8)
    else:
        from qtool.ptq import run_ptq

        log.info("qtool ptq (cpu profile, %s calibration) ...", recipe.ptq.calib)
        int8 = Path(run_ptq(fp32, recipe, work / "ptq")["output"])
    batch = OnnxPredictor(fp32, args.threads).batch
    calib = np.concatenate(list(calibration_set(splits, transform, recipe.ptq.calib_data).batches()))
    step = batch or len(calib)
    calib_items = [calib[i : i + step] for i in range(0, len(calib) - step + 1, step)]

    core = ov.Core()
    hint = core.get_property("CPU", "INFERENCE_PRECISION_HINT")  # bf16 on AVX512-BF16/AMX CPUs
    default_hint = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    ov_model = core.read_model(str(fp32))
    log.info("nncf.quantize on %d calibration items ...", len(calib_items))
    ov_int8_model = nncf.quantize(ov_model, nncf.Dataset(calib_items), subset_size=len(calib_items))
    ov_fp32, ov_int8 = ov_compile(core, ov_model, args.threads), ov_compile(core, ov_int8_model, args.threads)
    x = calib_items[0]

    opts = BenchOptions(threads=args.threads, iterations=args.iterations, warmup=10)
    rows: dict[str, dict[str, Any]] = {}
    for name, path in (("qtool fp32 (ORT)", fp32), ("qtool int8 (ORT, cpu profile)", int8)):
        r = get_backend("cpu", opts).run(path, [None])[0]
        rows[name] = {"latency_ms": r.latency_ms.__dict__, "predictor": OnnxPredictor(path, args.threads),
                      "macs_kind": "int8" if "int8" in name else "all", "fp": "int8" if "int8" in name else "fp32"}
    for name, compiled, kind in (("OpenVINO fp32 (f32 hint)", ov_fp32, "fp32"), ("OpenVINO + NNCF int8", ov_int8,
                                                                                 "int8")):
        rows[name] = {"latency_ms": time_ov(compiled, x, 10, args.iterations).__dict__,
                      "predictor": OpenVinoPredictor(compiled, batch), "macs_kind": "all", "fp": kind}
    rates = gemm_rates(args.threads)
    macs = conv_macs(int8)
    total_macs = macs["int8"] + macs["float"]
    ref = rows["OpenVINO fp32 (f32 hint)"]["latency_ms"]["p50"]
    ref8 = rows["OpenVINO + NNCF int8"]["latency_ms"]["p50"]
    img_per_batch = len(x)
    for name, row in rows.items():
        log.info("evaluating %s ...", name)
        m = evaluate(row.pop("predictor"), splits, transform, recipe.eval)["metrics"]["mean"]
        p50 = row["latency_ms"]["p50"]
        ips = img_per_batch * 1000.0 / row["latency_ms"]["mean"]
        work_macs = macs["int8"] if row["macs_kind"] == "int8" else total_macs
        peak = rates["int8_ops_per_s"] if row["fp"] == "int8" else rates["fp32_ops_per_s"]
        row.update(image_auroc=m.get("image_auroc"), pixel_auroc=m.get("pixel_auroc"), images_per_s=ips,
                   p50_vs_openvino_fp32=p50 / ref, p50_vs_openvino_int8=p50 / ref8,
                   measured_efficiency=2.0 * work_macs * ips / img_per_batch / peak)
    doc = {"command": [sys.executable, *sys.argv], "smoke": args.smoke, "model_fp32": str(fp32),
           "model_int8": str(int8), "threads": args.threads, "batch": img_per_batch, "machine": cpu_info(),
           "versions": {k: _version(k) for k in ("qtool", "onnxruntime", "openvino", "nncf", "numpy")},
           "openvino_cpu_default_precision_hint": default_hint, "calibration_items": len(calib_items),
           "gemm_2048": rates, "macs_per_batch": macs, "results": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "compare_openvino.json", doc)
    atomic_write_text(out_dir / "compare_openvino.md", markdown(doc))
    print(markdown(doc))
    print(f"wrote {out_dir / 'compare_openvino.json'} and .md")
    return doc


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def markdown(doc: dict[str, Any]) -> str:
    """A short Markdown report: machine, versions, command, the table, and how to read it."""
    m = doc["machine"]
    lines = [f"# qtool int8 vs OpenVINO{' (SMOKE: untrained tiny model)' if doc['smoke'] else ''}", "",
             f"- machine: {m['cpu_model']}, flags {', '.join(k for k, v in m['cpu_flags'].items() if v) or 'none'}, "
             f"{doc['threads']} threads, batch {doc['batch']}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in doc['versions'].items())}",
             f"- OpenVINO CPU default INFERENCE_PRECISION_HINT here: {doc['openvino_cpu_default_precision_hint']} "
             "(fp32 row compiled with f32 explicitly)",
             f"- measured GEMM 2048^3: int8 {doc['gemm_2048']['int8_ops_per_s'] / 1e9:.1f} GOPS, "
             f"fp32 {doc['gemm_2048']['fp32_ops_per_s'] / 1e9:.1f} GFLOPS",
             f"- command: `{' '.join(doc['command'])}`", "",
             "| runtime | p50 ms | p90 ms | p99 ms | img/s | p50 / OV fp32 | p50 / OV int8 | image AUROC | "
             "pixel AUROC | measured eff. |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in doc["results"].items():
        lat = r["latency_ms"]
        lines.append(f"| {name} | {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {r['images_per_s']:.1f} | "
                     f"{r['p50_vs_openvino_fp32']:.2f} | {r['p50_vs_openvino_int8']:.2f} | {_f(r['image_auroc'])} | "
                     f"{_f(r['pixel_auroc'])} | {100 * r['measured_efficiency']:.1f}% |")
    lines += ["", "measured eff. = 2 x MACs x images/s / measured GEMM ops/s of the same precision (int8 rows: "
              "int8 MatMulInteger; qtool int8 counts only its int8 Conv/MatMul MACs, NNCF int8 counts all)."]
    return "\n".join(lines) + "\n"


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


if __name__ == "__main__":
    main()
