"""One sweep cell: build its model (fp32 copy, fp16, ``run_ptq`` or ``run_qat``), evaluate it, time it.

A job is plain picklable data, so it runs the same in this process or in a spawned worker. The
build and the evaluated cell are two cache entries: a cell whose evaluation or timing settings
changed reuses its build (and so its calibration ranges); a QAT cell starts from the ranges of the
PTQ build with the same calibrator, data source, part, target and width when the grid has one.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qtool.artifacts import write_json
from qtool.errors import DataError, QtoolError
from qtool.fidelity import map_fidelity
from qtool.metrics import f1_at
from qtool.ptq import StageTimer
from qtool.recipe import Recipe
from qtool.registry import Registry
from qtool.sweep.cache import Cache
from qtool.sweep.grid import Cell
from qtool.sweep.models import ModelSource
from qtool.sweep.precisions import PRECISIONS

log = logging.getLogger(__name__)

REFERENCE_MAPS = "maps.npy"  # the fp32 cell's test anomaly maps (float32), the reference of the others
OVERLAY_FILE = "overlay.npz"  # a quantized cell's maps on the test images that differ most from fp32


@dataclass(frozen=True)
class BuildContext:
    """What a builder gets: the model, the cell's recipe, the folder to write and the ranges to start from."""

    source: ModelSource
    recipe: Recipe
    out: Path
    init_from: Path | None = None


@dataclass(frozen=True)
class CellJob:
    """Everything one cell needs, as picklable data."""

    cell: Cell
    recipe_tree: dict[str, Any]
    source: ModelSource
    build_key: str
    cell_key: str
    cache_root: Path
    reference_dir: Path | None  # the fp32 cell's entry (None for the fp32 cell itself)
    init_from: Path | None  # the PTQ build whose ranges start a QAT cell
    parallel: int = 1  # cells running at once (timings then share the CPU)


BUILDERS: Registry[Callable[[BuildContext], dict[str, Any]]] = Registry("cell builder")
"""Builder name (``Cell.builder``) -> function writing ``ctx.out/model.onnx`` and returning its summary."""


def _ptq_summary(report: dict[str, Any]) -> dict[str, Any]:
    out = {"stage_seconds": report["stage_seconds"], "sqnr_db": report["sqnr_db"], "lint_issues": len(report["lint"]),
           "quantized_nodes": sum(report["plan"]["quantized_nodes"].values()), "emulated": report["plan"]["emulated"]}
    if "proxy" in report:  # a search stage ran: the proxy AD metric on the search set
        out["proxy"] = report["proxy"]
    if "mixed_precision" in report:
        mp = report["mixed_precision"]
        lat = mp.get("latency") or {}
        cost = round(lat["final_ms"] - lat["all_quantized_ms"], 4) if lat else 0.0
        out["fallback"] = {"budget": mp["budget"], "criterion": mp["criterion"], "rank": mp["rank"],
                           "layers": [f["layer"] for f in mp["fallback"]], "precision": mp["precision_kept"],
                           "latency_cost_ms": cost, "latency_stand_in": bool(lat.get("stand_in")),
                           "float_macs_share": (mp.get("macs") or {}).get("float_share", 0.0)}  # no fallback: 0
    return out


@BUILDERS.register("fp32")
def build_fp32(ctx: BuildContext) -> dict[str, Any]:
    """The fp32 reference: the exported model itself."""
    timer = StageTimer()
    with timer.stage("copy"):
        shutil.copyfile(ctx.source.onnx, ctx.out / "model.onnx")
    return {"stage_seconds": timer.seconds}


@BUILDERS.register("fp16")
def build_fp16(ctx: BuildContext) -> dict[str, Any]:
    """A float16 copy of the prepared fp32 graph (float32 inputs and outputs), with its SQNR vs fp32."""
    from qtool.data import ImageTransform, load_splits
    from qtool.graph import load_model, prepare, save_model, to_fp16
    from qtool.modelio import open_model, stamp_data_config
    from qtool.ptq import output_sqnr

    timer, out = StageTimer(), ctx.out / "model.onnx"
    with timer.stage("prepare"):
        prepared = prepare(load_model(ctx.source.onnx))
    with timer.stage("convert"):
        half = to_fp16(prepared)
    with timer.stage("save"):
        save_model(half, out)
        opened = open_model(ctx.source.onnx)
        if opened.data:
            stamp_data_config(out, opened.data)
    with timer.stage("sqnr"):
        data_cfg = opened.apply_transform(ctx.recipe.data)
        sqnr = output_sqnr(ctx.source.onnx, out, load_splits(data_cfg), ImageTransform(data_cfg),
                           ctx.recipe.eval.threads)
    return {"stage_seconds": timer.seconds, "sqnr_db": sqnr}


@BUILDERS.register("ptq")
def build_ptq(ctx: BuildContext) -> dict[str, Any]:
    """``qtool ptq`` on the fp32 ONNX with the cell's recipe."""
    from qtool.ptq import run_ptq

    return _ptq_summary(run_ptq(ctx.source.onnx, ctx.recipe, ctx.out))


@BUILDERS.register("qat")
def build_qat(ctx: BuildContext) -> dict[str, Any]:
    """``qtool qat`` on the checkpoint, starting from a PTQ build's ranges when there is one."""
    from qtool.qat.run import run_qat

    if ctx.source.checkpoint is None:
        raise DataError(f"QAT needs a qtool checkpoint; model {ctx.source.label} is {ctx.source.onnx}")
    recipe = ctx.recipe
    if ctx.init_from is not None:
        recipe = Recipe.model_validate({**recipe.model_dump(mode="json"),
                                        "qat": {**recipe.qat.model_dump(mode="json"), "init_from": str(ctx.init_from)}})
    report = run_qat(ctx.source.checkpoint, recipe, ctx.out)
    return {**_ptq_summary(report), "init": report["init"], "mean_epoch_seconds": report["mean_epoch_seconds"]}


def f1_at_reference(result: dict[str, Any], threshold: float | None) -> dict[str, float | None]:
    """Per category (and ``"mean"``): the F1 this cell's scores give at another model's threshold."""
    labels, scores = np.asarray(result["labels"]), np.asarray(result["scores"])
    cats = np.asarray(result["categories"], dtype=object)
    out: dict[str, float | None] = {}
    for cat in sorted(set(cats.tolist())):
        idx = np.flatnonzero(cats == cat)
        out[cat] = f1_at(labels[idx], scores[idx], threshold) if threshold is not None and labels[idx].any() else None
    defined = [v for v in out.values() if v is not None]
    out["mean"] = float(np.mean(defined)) if defined else None
    return out


def _most_different(maps: np.ndarray, ref: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` test images whose maps differ most from the reference (max |diff|), and every diff."""
    diff = np.abs(maps.astype(np.float64) - ref).reshape(len(maps), -1).max(axis=1)
    return np.argsort(-diff, kind="stable")[:k], diff


def _compare(job: CellJob, res: dict[str, Any], maps: np.ndarray, out: Path, overlays: int) -> dict[str, Any]:
    """Fidelity to the fp32 reference, F1 at its threshold, and the overlay data of the most different images."""
    if job.reference_dir is None:
        np.save(out / REFERENCE_MAPS, maps.astype(np.float32))
        ref, ref_maps = res, maps
    else:
        ref = json.loads((job.reference_dir / "eval.json").read_text())
        ref_maps = np.load(job.reference_dir / REFERENCE_MAPS, mmap_mode="r")
        if ref["files"] != res["files"]:
            raise DataError(f"cell {job.cell.id}: its test split differs from the fp32 reference's")
    fidelity = map_fidelity(ref_maps, maps, ref["scores"], res["scores"])
    f1_ref = f1_at_reference(res, ref["threshold"])
    for cat, row in res["metrics"]["per_category"].items():
        row["f1_at_fp32_threshold"] = f1_ref[cat]
    res["metrics"]["mean"]["f1_at_fp32_threshold"] = f1_ref["mean"]
    overlay = None
    if job.reference_dir is not None and overlays:
        idx, diff = _most_different(maps, ref_maps, overlays)
        np.savez_compressed(out / OVERLAY_FILE, indices=idx, maps=maps[idx].astype(np.float32), diff=diff)
        overlay = {"indices": idx.tolist(), "max_abs_diff": [float(diff[i]) for i in idx]}
    return {"fidelity": fidelity, "fp32_threshold": ref["threshold"], "overlay": overlay}


#: Timing note of cells whose activations are narrower than 8 bits (verified on ORT CPU: no QLinearConv is fused).
EMULATED_ACTIVATIONS_NOTE = (
    "activations below 8 bits are emulated with a float Clip before each QuantizeLinear, which keeps ONNX Runtime "
    "from fusing integer kernels (the QDQ graph runs in float): not a deployment speed of the width")


def _bench(job: CellJob, recipe: Recipe, model: Path, out: Path) -> dict[str, Any]:
    from qtool.backends import BenchOptions
    from qtool.backends.runner import run_bench

    b = recipe.sweep.bench
    opts = BenchOptions(threads=b.threads, iterations=b.iterations, warmup=b.warmup, timeout_s=b.timeout_s,
                        precision=PRECISIONS.get(job.cell.precision).bench, host=b.host,
                        ssh_options=list(b.ssh_options))
    r = run_bench(b.device, model, [b.batch], opts, out / "bench.json")[0]
    lat = r.latency_ms
    bits = PRECISIONS.get(job.cell.precision).activation_bits
    return {"device": r.device, "device_name": r.device_name, "batch": r.batch, "threads": r.threads,
            "iterations": r.iterations, "p50_ms": lat.p50, "p90_ms": lat.p90, "p99_ms": lat.p99, "mean_ms": lat.mean,
            "throughput_ips": r.throughput_ips, "peak_rss_mb": r.peak_rss_mb,
            "model_rss_mb": r.extra.get("model_rss_mb"), "simulated": r.simulated,
            "notes": [*r.notes, *([f"timed while up to {job.parallel} sweep cells ran in parallel (--jobs)"]
                                  if job.parallel > 1 else []),
                      *([EMULATED_ACTIVATIONS_NOTE] if bits is not None and bits < 8 else [])],
            "model_size_bytes": r.model_size_bytes}


def _build(job: CellJob, recipe: Recipe, cache: Cache) -> tuple[Path, dict[str, Any], bool]:
    """The cell's build entry (made now unless cached): its folder, its summary, whether it was cached."""
    cached = cache.has("builds", job.build_key)
    if not cached:
        with cache.writing("builds", job.build_key, {"cell": job.cell.id}) as tmp:
            summary = BUILDERS.get(job.cell.builder)(BuildContext(job.source, recipe, tmp, job.init_from))
            write_json(tmp / "build.json", summary)
    folder = cache.entry("builds", job.build_key)
    return folder, json.loads((folder / "build.json").read_text()), cached


def run_job(job: CellJob) -> dict[str, Any]:
    """Build (or reuse the build of), evaluate and time one cell into its cache entry.

    Returns:
        The cell's result (``result.json`` of its entry), or ``{"status": "failed", "error": ...}``
        when a qtool error (bad graph, refused calibration, failed backend ...) stopped it.
    """
    from qtool.runs import run_eval

    cache = Cache(job.cache_root)
    recipe = Recipe.model_validate(job.recipe_tree)
    timer = StageTimer()
    try:
        with timer.stage("build"):
            build_dir, build, build_cached = _build(job, recipe, cache)
        with cache.writing("cells", job.cell_key, {"cell": job.cell.id, "build": job.build_key}) as out:
            model = build_dir / "model.onnx"
            with timer.stage("eval"):
                res = run_eval(model, recipe, out / "eval.json", keep_maps=True)
                maps = res.pop("maps")
            with timer.stage("fidelity"):
                compared = _compare(job, res, maps, out, recipe.sweep.overlays)
            write_json(out / "eval.json", res)
            with timer.stage("bench"):
                latency = _bench(job, recipe, model, out)
            result = {"status": "ok", "id": job.cell.id, "cell": job.cell.axes(), "key": job.cell_key,
                      "build_key": job.build_key, "build_cached": build_cached, "model_file": str(model),
                      "metrics": res["metrics"], "threshold": res["threshold"], **compared, "latency": latency,
                      "model_size_bytes": latency["model_size_bytes"], "build": build, "n_test": res["n_test"],
                      "stage_seconds": {**timer.seconds, "build_stages": build.get("stage_seconds", {})}}
            write_json(out / "result.json", result)
    except QtoolError as e:
        log.warning("cell %s failed: %s", job.cell.id, e)
        return {"status": "failed", "id": job.cell.id, "cell": job.cell.axes(), "key": job.cell_key,
                "error": f"{type(e).__name__}: {e}", "wall_seconds": round(sum(timer.seconds.values()), 3)}
    return {**result, "wall_seconds": round(sum(timer.seconds.values()), 3)}
