"""PTQ accuracy grid and int8 speed of one trained STFPM on MTD, in one run.

Grid: every calibrator x calibration source x target profile (cpu, tensorrt) x quantized part at 8
bits, plus cpu-avx2 (7-bit weights, for x86 without VNNI) and the lower widths 6 and 4 for the cpu
profile with both parts quantized, each evaluated on the recipe's test split
(image AUROC, pixel AUROC, AUPRO, F1) next to fp32. Calibration runs once per source: the same
activation stream feeds every calibrator (asymmetric for ``cpu``, symmetric for ``tensorrt``) through
the library's own driver (``qtool.calibrate``); QDQ insertion, lint and evaluation are the library's
(``qtool.graph``, ``qtool.metrics``). Images are decoded once and kept in memory.

Speed: fp32 vs the best int8 ``cpu`` model at batch 1 and 8, 2 threads, through ``qtool.backends``
(the same measurement as ``qtool bench --device cpu``), in the same run.

Run: .venv/bin/python bench/mtd_ptq.py --checkpoint bench/work/mtd-stfpm/model.pt
Writes bench/results/mtd_ptq.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from calibrators import Calibrator, HistogramCalibrator, get_calibrator
from qtool.artifacts import package_versions, sha256_file, versions_line, write_json
from qtool.calib_data import calibration_set
from qtool.calibrate import calibrate
from qtool.data import ImageTransform, iter_batches, load_splits
from qtool.evaluate import OnnxPredictor
from qtool.graph import build_spec, get_profile, insert_qdq_report, lint, load_model, prepare, save_model
from qtool.metrics import evaluate_arrays, f1_at, threshold_from_normals
from qtool.modelio import open_model
from qtool.recipe import load_recipe
from qtool.runs import run_export

ROOT = Path(__file__).resolve().parents[1]
CALIBS = ("minmax", "percentile", "entropy", "mse")
SOURCES = ("train", "random-normal", "mix")
TARGETS = ("cpu", "tensorrt")
PARTS = ("student", "teacher", "both")
KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_at_threshold")


class FanOut(Calibrator):
    """Feeds one activation stream to several calibrators (one calibration pass for the whole grid)."""

    def __init__(self, members: dict[tuple[str, bool, int], Calibrator]) -> None:
        super().__init__()
        self.members = members
        self.observers: list[Calibrator] = []
        owners: dict[tuple[bool, int], HistogramCalibrator] = {}
        for cal in members.values():  # histogram rules read one shared collector per (|x| or x, bins)
            if isinstance(cal, HistogramCalibrator):
                key = (cal.collector.absolute, cal.collector.num_bins)
                if key in owners:
                    cal.share_collector(owners[key].collector)
                    continue
                owners[key] = cal
            self.observers.append(cal)

    def observe(self, name: str, array: np.ndarray) -> None:
        """Forward the batch to every member that owns its statistics."""
        for cal in self.observers:
            cal.observe(name, array)

    def compute(self) -> dict:
        """Ranges of every member, keyed like ``members``."""
        return {key: cal.compute() for key, cal in self.members.items()}


class Evaluator:
    """Test split and holdout decoded once; scores any ONNX model with the library's metrics."""

    def __init__(self, splits, transform: ImageTransform, threads: int) -> None:
        self.threads = threads
        self.holdout = np.concatenate([b for b, _ in iter_batches(splits.holdout, transform, 32)])
        self.test = np.concatenate([b for b, _ in iter_batches(splits.test, transform, 32)])
        self.masks = np.stack([transform.mask(s) for s in splits.test]).astype(np.uint8)
        self.labels = np.array([s.label for s in splits.test])
        self.cats = [s.category for s in splits.test]

    def __call__(self, model: Path, fp32_threshold: float | None = None) -> dict:
        """Metrics (mean over categories), threshold fitted on holdout, F1 at the fp32 threshold too."""
        pred = OnnxPredictor(model, self.threads)
        _, hold = self._run(pred, self.holdout)
        t0 = time.perf_counter()
        maps, scores = self._run(pred, self.test)
        seconds = time.perf_counter() - t0
        thr = threshold_from_normals(hold)
        mean = evaluate_arrays(self.labels, scores, self.masks, maps, self.cats, threshold=thr)["mean"]
        row = {k: mean.get(k) for k in KEYS}
        if fp32_threshold is not None:
            row["f1_at_fp32_threshold"] = f1_at(self.labels, scores, fp32_threshold)
        row.update(threshold=thr, eval_ms_per_image=round(1000 * seconds / len(self.test), 2))
        return row

    @staticmethod
    def _run(pred: OnnxPredictor, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = [], []
        for i in range(0, len(images), 16):
            m, s = pred(images[i : i + 16])
            maps.append(m.astype(np.float32))
            scores.append(s)
        return np.concatenate(maps), np.concatenate(scores)


def grid_cells(bits_extra: list[int]) -> list[dict]:
    """Every 8-bit cell of the grid, cpu-avx2 (7-bit weights) for both parts, then lower widths for cpu/both."""
    cells = [dict(calib=c, source=s, target=t, part=p, bits=8)
             for c, s, t, p in itertools.product(CALIBS, SOURCES, TARGETS, PARTS)]
    cells += [dict(calib=c, source=s, target="cpu-avx2", part="both", bits=8)
              for c, s in itertools.product(CALIBS, SOURCES)]
    cells += [dict(calib=c, source=s, target="cpu", part="both", bits=b)
              for b, c, s in itertools.product(bits_extra, CALIBS, SOURCES)]
    return cells


def calibrate_sources(prepared, recipe, splits, transform, bits: list[int], threads: int) -> dict:
    """One calibration pass per source feeding every (calibrator, symmetric, bits); ranges and seconds."""
    both = recipe.ptq.model_copy(update={"quantize": "both"})
    names = {n for t in TARGETS for n in build_spec(prepared, both, get_profile(t)).tensors_to_calibrate()}
    out = {}
    for source in SOURCES:
        cfg = recipe.ptq.calib_data.model_copy(update={"source": source})
        calib = calibration_set(splits, transform, cfg)
        members = {(c, sym, b): get_calibrator(c, symmetric=sym, num_bits=b)
                   for c in CALIBS for sym in (False, True) for b in bits}
        t0 = time.perf_counter()
        ranges = calibrate(prepared, sorted(names), calib.batches(), FanOut(members), threads=threads,
                           group=cfg.batch_size)
        out[source] = {"ranges": ranges, "seconds": round(time.perf_counter() - t0, 1),
                       "description": {k: v for k, v in calib.description.items() if k != "files"}}
        print(f"calibrated on {source}: {out[source]['seconds']} s", flush=True)
    return out


def quantize(prepared, recipe, cell: dict, ranges: dict, path: Path) -> dict:
    """Write the QDQ model of one cell; return what was quantized and the lint result."""
    cfg = recipe.ptq.model_copy(update={"quantize": cell["part"], "target": cell["target"],
                                        "activation_bits": cell["bits"], "weight_bits": cell["bits"]})
    profile = get_profile(cell["target"])
    spec = build_spec(prepared, cfg, profile)
    sym = profile.activation_symmetric
    chosen = ranges[(cell["calib"], sym, cell["bits"])]
    qdq, report = insert_qdq_report(prepared, spec, {n: chosen[n] for n in spec.tensors_to_calibrate()})
    save_model(qdq, path)
    return {"quantized_nodes": sum(1 for d in spec.decisions if d.quantized), "lint_issues": len(lint(qdq, profile)),
            "emulated": spec.emulated}


def ort_quantize_static(fp32: Path, out: Path, images: np.ndarray, batch: int) -> None:
    """The anchor: onnxruntime's own quantize_static (QDQ, MinMax, uint8 activations, int8 per-channel weights)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)])

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else {"image": np.ascontiguousarray(b)}

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def speed(ckpt: Path, fp32: Path, int8: Path, recipe, work: Path, cell: dict, ranges: dict,
          threads: int, calib_images: np.ndarray) -> list[dict]:
    """fp32 vs our int8 vs onnxruntime's quantize_static int8, batch 1 and 8, through the cpu backend."""
    from qtool.backends import BenchOptions
    from qtool.backends.runner import run_bench

    rows = []
    opts = BenchOptions(threads=threads, min_time_s=5.0)
    for batch in (1, 8):
        f, q = fp32, int8
        if batch != 1:
            f = work / f"fp32_b{batch}.onnx"
            run_export(ckpt, f, recipe.model_copy(update={"export": recipe.export.model_copy(
                update={"batch_size": batch})}))
            prepared = prepare(load_model(f))
            q = work / f"int8_b{batch}.onnx"
            quantize(prepared, recipe, cell, ranges, q)
        anchor = work / f"ort_int8_b{batch}.onnx"
        ort_quantize_static(f, anchor, calib_images, batch)
        res = {}
        for name, m in (("fp32", f), ("int8", q), ("ort_int8", anchor), ("fp32_again", f)):
            r = run_bench("cpu", m, [batch], opts)[0]
            res[name] = {"p50_ms": r.latency_ms.p50, "p90_ms": r.latency_ms.p90, "throughput_ips": r.throughput_ips,
                         "peak_rss_mb": r.peak_rss_mb, "size_mb": round(r.model_size_bytes / 2**20, 2)}
        fp32_p50 = min(res["fp32"]["p50_ms"], res["fp32_again"]["p50_ms"])
        rows.append({"batch": batch, **res, "speedup_p50": round(fp32_p50 / res["int8"]["p50_ms"], 2),
                     "ort_speedup_p50": round(fp32_p50 / res["ort_int8"]["p50_ms"], 2),
                     "cpu": r.environment.get("cpu_model"), "cpu_flags": r.environment.get("cpu_flags"),
                     "notes": r.notes})
        print(f"batch {batch}: fp32 {fp32_p50} ms, int8 {res['int8']['p50_ms']} ms", flush=True)
    return rows


def write_markdown(path: Path, doc: dict) -> None:
    """Short Markdown summary: fp32, best cells, the full 8-bit grid, speed."""
    fp = doc["fp32"]
    lines = ["# PTQ of STFPM on MTD: calibrator x source x target x part", "", f"`{doc['meta']['command']}`", "",
             f"machine: {doc['meta']['machine']}; checkpoint sha256 {doc['meta']['checkpoint_sha256'][:12]}; "
             f"calibration: {doc['meta']['num_calib']} samples per source; test images {doc['meta']['n_test']}", "",
             "| cell | bits | image AUROC | pixel AUROC | AUPRO | F1 (refit) | F1 @ fp32 thr | d image AUROC |",
             "|---|---|---|---|---|---|---|---|",
             f"| fp32 | 32 | {fp['image_auroc']:.4f} | {fp['pixel_auroc']:.4f} | {fp['aupro']:.4f} | "
             f"{fp['f1_at_threshold']:.4f} | - | - |"]
    for r in sorted(doc["cells"], key=lambda r: (r["bits"] != 8, r["target"], r["part"], r["calib"], r["source"])):
        lines.append(f"| {r['target']}/{r['part']}/{r['calib']}/{r['source']} | {r['bits']} | {r['image_auroc']:.4f} | "
                     f"{r['pixel_auroc']:.4f} | {r['aupro']:.4f} | {r['f1_at_threshold']:.4f} | "
                     f"{r['f1_at_fp32_threshold']:.4f} | {100 * (r['image_auroc'] - fp['image_auroc']):+.2f} |")
    lines += ["", "Speed (ONNX Runtime CPU, 2 threads, p50 ms; fp32 measured before and after the int8 models, "
              "best kept; anchor: onnxruntime quantize_static QDQ MinMax U8S8 per-channel on the same fp32 graph):", "",
              "| batch | fp32 p50 | qtool int8 p50 | speedup | ORT int8 p50 | ORT speedup | fp32 MB | int8 MB |",
              "|---|---|---|---|---|---|---|---|"]
    for s in doc["speed"]:
        fp32_p50 = min(s["fp32"]["p50_ms"], s["fp32_again"]["p50_ms"])
        lines.append(f"| {s['batch']} | {fp32_p50} | {s['int8']['p50_ms']} | {s['speedup_p50']}x | "
                     f"{s['ort_int8']['p50_ms']} | {s['ort_speedup_p50']}x | {s['fp32']['size_mb']} | "
                     f"{s['int8']['size_mb']} |")
    lines += ["", f"best int8 cpu cell: {doc['best_cpu']}", "",
              "calibration seconds per source (one pass feeding all calibrators): "
              + ", ".join(f"{k} {v}" for k, v in doc["calibration_seconds"].items()), "",
              versions_line(doc["meta"]["versions"], skip_missing=True)]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Run the grid and the speed comparison; write JSON and Markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "mtd_stfpm.yaml"))
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--low-bits", default="6,4", help="extra widths for cpu/both ('' for none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="only the first N cells (smoke runs)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "mtd-ptq"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mtd_ptq"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(args.recipe, args.set)
    opened = open_model(Path(args.checkpoint))
    data_cfg = opened.apply_transform(recipe.data)
    splits = load_splits(data_cfg)
    transform = ImageTransform(data_cfg)
    fp32 = work / "fp32.onnx"
    run_export(Path(args.checkpoint), fp32, recipe)
    prepared = prepare(load_model(fp32))
    low = [int(b) for b in args.low_bits.split(",") if b]
    t0 = time.perf_counter()
    evaluator = Evaluator(splits, transform, args.threads)
    print(f"decoded {len(evaluator.test)} test images in {time.perf_counter() - t0:.1f} s", flush=True)
    fp = evaluator(fp32)
    print("fp32", {k: fp[k] for k in KEYS}, flush=True)
    calib = calibrate_sources(prepared, recipe, splits, transform, [8, *low], args.threads)
    cells = []
    for cell in grid_cells(low)[: args.limit]:
        path = work / "cell.onnx"
        t1 = time.perf_counter()
        info = quantize(prepared, recipe, cell, calib[cell["source"]]["ranges"], path)
        row = {**cell, **info, **evaluator(path, fp["threshold"]), "seconds": round(time.perf_counter() - t1, 1)}
        cells.append(row)
        print({k: row[k] for k in ("calib", "source", "target", "part", "bits", "image_auroc", "pixel_auroc",
                                   "aupro")}, flush=True)
    cpu8 = [r for r in cells if r["target"] in ("cpu", "cpu-avx2") and r["bits"] == 8 and r["part"] == "both"]
    best = max(cpu8, key=lambda r: (r["image_auroc"], r["pixel_auroc"]))
    best_cell = {k: best[k] for k in ("calib", "source", "target", "part", "bits")}
    int8 = work / "best_int8.onnx"
    quantize(prepared, recipe, best_cell, calib[best["source"]]["ranges"], int8)
    speed_rows = speed(Path(args.checkpoint), fp32, int8, recipe, work, best_cell, calib[best["source"]]["ranges"],
                       args.threads, evaluator.holdout[:16])
    command = "python bench/mtd_ptq.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    doc = {"meta": {"command": command, "machine": f"{platform.processor() or platform.machine()}, "
                    f"{platform.platform()}", "versions": package_versions(),
                    "checkpoint": args.checkpoint, "checkpoint_sha256": sha256_file(Path(args.checkpoint)),
                    "num_calib": recipe.ptq.calib_data.num_samples, "n_test": len(evaluator.test),
                    "split": "recipe " + args.recipe},
           "fp32": fp, "cells": cells, "best_cpu": best_cell, "speed": speed_rows,
           "calibration_seconds": {s: calib[s]["seconds"] for s in SOURCES},
           "calibration_sources": {s: calib[s]["description"] for s in SOURCES}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), doc)
    write_markdown(out.with_suffix(".md"), doc)


if __name__ == "__main__":
    main()
