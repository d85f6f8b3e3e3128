"""Assemble a sweep's report from its cell results: metrics, deltas vs fp32, fidelity, latency, Pareto front."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from qtool import __version__
from qtool.recipe import Recipe
from qtool.report.schema import REPORT_SCHEMA, Metrics
from qtool.sweep.grid import axis_text, axis_values

METRIC_KEYS = tuple(Metrics.model_fields)
DELTA_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_at_threshold", "f1_at_fp32_threshold")
"""Metrics whose per-category change vs fp32 the report lists."""


def finite(value: Any) -> Any:
    """``value`` with every NaN/Inf float replaced by None (JSON has no such numbers), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point dominates, for (name, cost to minimise, value to maximise).

    A point is dominated when another is no worse in both and strictly better in one.
    """
    front = []
    for name, cost, value in points:
        if not any(c <= cost and v >= value and (c < cost or v > value) for _, c, v in points):
            front.append(name)
    return front


def short_labels(axes: list[dict[str, str | None]]) -> list[str]:
    """Readable labels: each cell's precision plus the axis values that vary among the cells."""
    keys = ("model", "method", "calibrator", "calib_source", "part", "target", "mixed_precision", "bias_correction")
    varying = [k for k in keys if len({a.get(k) for a in axes if a.get(k) is not None}) > 1
               or (k == "mixed_precision" and any(a.get(k) is not None for a in axes))]
    texts = ([axis_text(k, a.get(k)) for k in varying if a.get(k) is not None] for a in axes)
    return [" ".join([str(a["precision"]), *(t for t in row if t)]) for a, row in zip(axes, texts)]


def proxy_correlation(cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Spearman correlation of proxy and test AUROC (image, pixel) over ok cells with a proxy; None under 3 cells."""
    from qtool.proxy import rank_correlation

    rows = [c for c in cells if c["status"] == "ok" and c.get("proxy")]
    if len(rows) < 3:
        return None
    out: dict[str, Any] = {"n_cells": len(rows)}
    for key in ("image_auroc", "pixel_auroc"):
        pairs = [(c["proxy"]["quantized"].get(key), c["metrics"].get(key)) for c in rows]
        pairs = [p for p in pairs if None not in p]
        out[key] = rank_correlation(pairs)
    return out


def _flat_seconds(result: dict[str, Any]) -> dict[str, float]:
    s = dict(result.get("stage_seconds", {}))
    build = s.pop("build_stages", {}) or {}
    return {**{k: float(v) for k, v in s.items()}, **{f"build.{k}": float(v) for k, v in build.items()}}


def _deltas(per: dict[str, dict], ref: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """Per category (and the mean): metric minus the fp32 reference's, None where either is undefined."""
    out = {}
    for cat, row in per.items():
        base = ref.get(cat, {})
        out[cat] = {k: (row[k] - base[k]) if row.get(k) is not None and base.get(k) is not None else None
                    for k in DELTA_KEYS}
    return out


def _ok_entry(result: dict[str, Any], ref: dict[str, Any] | None, entry: Path) -> dict[str, Any]:
    per = {c: {k: row.get(k) for k in (*METRIC_KEYS, "n_images", "n_anomalous", "note")}
           for c, row in result["metrics"]["per_category"].items()}
    mean = {k: result["metrics"]["mean"].get(k) for k in METRIC_KEYS}
    deltas = None
    if ref is not None:
        ref_per = ref["metrics"]["per_category"]
        deltas = _deltas({**per, "mean": mean}, {**ref_per, "mean": ref["metrics"]["mean"]})
    latency = {k: v for k, v in result["latency"].items() if k != "model_size_bytes"}
    overlay = result.get("overlay")
    if overlay:
        files = json.loads((entry / "eval.json").read_text())["files"]
        overlay = {**overlay, "files": [files[i] for i in overlay["indices"]]}
    return {"metrics": mean, "per_category": per, "deltas": deltas, "threshold": result["threshold"],
            "fp32_threshold": result["fp32_threshold"], "fidelity": result["fidelity"], "latency": latency,
            "model_size_bytes": result["model_size_bytes"], "sqnr_db": _sqnr(result["build"].get("sqnr_db")),
            "stage_seconds": _flat_seconds(result), "overlay": overlay,
            "proxy": result["build"].get("proxy"), "fallback": result["build"].get("fallback")}


def _sqnr(sqnr: dict[str, Any] | None) -> dict[str, float | None] | None:
    if not sqnr:
        return None
    return {k: (float(v) if v is not None else None) for k, v in sqnr.items() if k in ("anomaly_map", "score")}


def assemble_report(recipe: Recipe, grid: Any, sources: dict[str, Any], jobs: list[Any],
                    results: dict[str, dict[str, Any]], cached: set[str], cache: Any) -> dict[str, Any]:
    """The report document (before timing fields): one entry per cell in grid order, skipped cells last.

    Args:
        recipe, grid, sources, jobs: the sweep's recipe, expanded grid, resolved models and cell jobs.
        results: cell key -> result (ok, failed or skipped). cached: keys found finished in the cache.
        cache: the cache (entries are referenced by path).
    """
    from qtool.backends.base import cpu_info

    refs = {j.cell.model: results.get(j.cell_key) for j in jobs if j.cell.precision == "fp32"}
    all_axes = [j.cell.axes() for j in jobs] + [c.axes() for c, _ in grid.skipped]
    labels = short_labels(all_axes)
    cells = []
    for i, job in enumerate(jobs):
        r = results[job.cell_key]
        entry: dict[str, Any] = {"id": job.cell.id, "label": labels[i], **job.cell.axes(), "status": r["status"],
                                 "cached": job.cell_key in cached, "error": r.get("error") or r.get("reason"),
                                 "key": job.cell_key, "build_key": job.build_key,
                                 "entry": str(cache.entry("cells", job.cell_key)),
                                 "reference_entry": str(job.reference_dir) if job.reference_dir else None}
        if r["status"] == "ok":
            ref = refs.get(job.cell.model)
            entry.update(_ok_entry(r, ref if ref and ref["status"] == "ok" and ref is not r else None,
                                   cache.entry("cells", job.cell_key)))
        cells.append(entry)
    for k, (cell, reason) in enumerate(grid.skipped):
        cells.append({"id": cell.id, "label": labels[len(jobs) + k], **cell.axes(), "status": "skipped",
                      "cached": False, "error": reason})
    metric = recipe.sweep.pareto_metric
    points = [(c["id"], c["latency"]["p50_ms"], c["metrics"][metric]) for c in cells
              if c["status"] == "ok" and c["metrics"].get(metric) is not None]
    front = set(pareto_front(points))
    for c in cells:
        c["pareto"] = c["id"] in front
    sw = recipe.sweep
    axes = {"model": list(grid.models), "precision": sw.precisions, "method": sw.methods,
            "calibrator": sw.calibrators, "calib_source": sw.calib_sources, "part": sw.parts, "target": sw.targets,
            "mixed_precision": ["off" if b is None else axis_text("mixed_precision", b) for b in sw.mixed_precisions],
            "bias_correction": [axis_text("bias_correction", b) or "off"
                                for b in axis_values(recipe, "bias_correction")]}
    categories = sorted({cat for c in cells if c.get("per_category") for cat in c["per_category"]})
    return finite({
        "schema": REPORT_SCHEMA, "qtool": __version__, "recipe": recipe.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": list(sys.argv), "axes": axes,
        "pareto_metric": metric, "categories": categories, "models": [s.to_json() for s in sources.values()],
        "cells": cells, "notes": list(grid.notes), "cache_dir": str(cache.root), "machine": cpu_info(),
        "proxy_correlation": proxy_correlation(cells),
    })
