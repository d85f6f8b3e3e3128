"""The report's tables as plain rows of strings, shared by the Markdown and HTML writers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Table:
    """A titled table: an id (HTML anchor), headers and rows of already formatted cells."""

    id: str
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


def num(value: float | None, digits: int = 4) -> str:
    """``value`` with ``digits`` decimals, or ``-`` when undefined."""
    return "-" if value is None else f"{value:.{digits}f}"


def signed(value: float | None, digits: int = 3) -> str:
    """``+0.012`` style, or empty when undefined."""
    return "" if value is None else f" ({value:+.{digits}f})"


def _get(d: dict[str, Any] | None, key: str) -> Any:
    return None if d is None else d.get(key)


def cells_table(report: dict[str, Any]) -> Table:
    """The key table: one row per cell with accuracy, fidelity, latency, memory, size and time."""
    headers = ["cell", "status", "Pareto", "image AUROC", "pixel AUROC", "AUPRO", "F1 (own thr)", "F1 (fp32 thr)",
               "pixel r vs fp32", "max score shift", "p50 ms", "p90 ms", "img/s", "peak MB", "size MB", "cached",
               "time s"]
    rows = []
    for c in report["cells"]:
        m, f, lat = c.get("metrics"), c.get("fidelity"), c.get("latency")
        secs = c.get("stage_seconds") or {}
        total = sum(v for k, v in secs.items() if "." not in k)
        status = c["status"] if not c.get("error") else f"{c['status']}: {c['error']}"
        rows.append([c["label"], status, "yes" if c.get("pareto") else "",
                     *(num(_get(m, k)) for k in ("image_auroc", "pixel_auroc", "aupro", "f1_at_threshold",
                                                 "f1_at_fp32_threshold")),
                     num(_get(f, "pixel_pearson")), num(_get(f, "score_max_abs_shift")),
                     num(_get(lat, "p50_ms"), 2), num(_get(lat, "p90_ms"), 2), num(_get(lat, "throughput_ips"), 1),
                     num(_get(lat, "peak_rss_mb"), 1),
                     num(c["model_size_bytes"] / 2**20, 2) if c.get("model_size_bytes") else "-",
                     "yes" if c.get("cached") else "", num(total, 1) if secs else "-"])
    note = (f"F1 (own thr): threshold re-fitted on held-out normals for that cell; F1 (fp32 thr): the fp32 "
            f"model's threshold applied to the cell's scores. Pareto: on the front of {report['pareto_metric']} "
            "vs p50 latency. Cached: reused from the cache, not recomputed in this run.")
    timing = dict.fromkeys(n for c in report["cells"] for n in (c.get("latency") or {}).get("notes", []))
    loads = [n for n in timing if n.startswith("load average ")]
    if loads:  # one line for the load notes, which differ per cell only in the number
        worst = max(loads, key=lambda n: float(n.split()[2]))
        timing = {**{n: None for n in timing if n not in loads}, f"up to {worst}": None}
    if timing:
        note += " Timing notes: " + "; ".join(timing) + "."
    return Table("cells", "Cells", headers, rows, note)


def category_table(report: dict[str, Any]) -> Table:
    """Per category and cell: metrics with their change vs fp32 in brackets."""
    keys = ("image_auroc", "pixel_auroc", "aupro", "f1_at_threshold", "f1_at_fp32_threshold")
    headers = ["category", "cell", "image AUROC", "pixel AUROC", "AUPRO", "F1 (own thr)", "F1 (fp32 thr)"]
    rows = []
    for cat in report["categories"]:
        for c in report["cells"]:
            per = (c.get("per_category") or {}).get(cat)
            if per is None:
                continue
            delta = (c.get("deltas") or {}).get(cat, {})
            rows.append([cat, c["label"], *(num(per.get(k)) + signed(delta.get(k)) for k in keys)])
    return Table("per-category", "Per category (change vs fp32 in brackets)", headers, rows)


def stage_table(report: dict[str, Any]) -> Table:
    """Wall time of each stage of each cell (build stages listed in the last column)."""
    headers = ["cell", "build s", "eval s", "fidelity s", "bench s", "build stages"]
    rows = []
    for c in report["cells"]:
        s = c.get("stage_seconds")
        if not s:
            continue
        sub = ", ".join(f"{k.split('.', 1)[1]} {v:.2f}" for k, v in s.items() if k.startswith("build."))
        rows.append([c["label"], *(num(s.get(k), 2) for k in ("build", "eval", "fidelity", "bench")), sub])
    overall = ", ".join(f"{k} {v:.1f} s" for k, v in report["stage_seconds"].items())
    return Table("stages", "Wall time per stage", headers, rows,
                 f"Sweep: {overall}; total {report['wall_seconds']:.1f} s. A cached cell shows the times of the run "
                 "that made it.")


def models_table(report: dict[str, Any]) -> Table:
    """The model axis as resolved."""
    headers = ["model", "origin", "ONNX", "sha256", "train s", "cached"]
    rows = [[m["label"], m["origin"], m["onnx"], m["onnx_sha256"][:12], num(m["train_seconds"], 1),
             "yes" if m["cached"] else ""] for m in report["models"]]
    return Table("models", "Models", headers, rows)


def _budget(fallback: dict[str, Any]) -> str:
    """A fallback's criterion and budget, and its rank unless the default (reports before it have none)."""
    rank = fallback.get("rank", "sensitivity")
    return f"{fallback['criterion']} {fallback['budget']:g}" + ("" if rank == "sensitivity" else f", {rank}")


def proxy_table(report: dict[str, Any]) -> Table | None:
    """Per quantized cell with a search stage: proxy vs test metric, and the layers mixed precision kept float."""
    rows = []
    for c in report["cells"]:
        p, fb, m = c.get("proxy"), c.get("fallback"), c.get("metrics")
        if not p and not fb:
            continue
        q = (p or {}).get("quantized", {})
        rows.append([c["label"], num(q.get("image_auroc")), num(_get(m, "image_auroc")), num(q.get("pixel_auroc")),
                     num(_get(m, "pixel_auroc")), num((p or {}).get("drop")),
                     "-" if not fb else f"{len(fb['layers'])} {fb['precision']} ({_budget(fb)})",
                     num(_get(fb, "float_macs_share"), 3),
                     num(_get(fb, "latency_cost_ms"), 3) + (" (8-bit stand-in)" if _get(fb, "latency_stand_in")
                                                             else ""),
                     ", ".join((fb or {}).get("layers", [])[:6])])
    if not rows:
        return None
    corr = report.get("proxy_correlation")
    note = ("Proxy: image and pixel AUROC of synthetic anomalies (made from normal calibration images) against "
            "those normals, on the search set; drop: the larger AUROC drop from fp32 there. Float layers: kept "
            "out of int8 by mixed precision within the budget; float MACs: their share of the multiply-accumulates; "
            "cost: ONNX Runtime latency of the model with them float minus the all-quantized one (for widths under "
            "8 bits, which have no integer kernels here, timed on the 8-bit stand-in: the same layers float, the "
            "rest at 8 bits); the budget bounds the proxy drop (separation) or the share of the all-quantized "
            "graph's map distortion left (distortion).")
    if corr:
        note += (f" Spearman rank correlation of proxy and test AUROC across {corr['n_cells']} cells: image "
                 f"{num(corr['image_auroc'], 3)}, pixel {num(corr['pixel_auroc'], 3)}.")
    headers = ["cell", "proxy image AUROC", "test image AUROC", "proxy pixel AUROC", "test pixel AUROC",
               "proxy drop", "float layers", "float MACs", "cost ms", "layers (first 6)"]
    return Table("proxy", "Proxy metric and mixed precision", headers, rows, note)


def all_tables(report: dict[str, Any]) -> list[Table]:
    """The tables in report order (the proxy table when a cell has a proxy or a fallback)."""
    tables = [cells_table(report), category_table(report), proxy_table(report), stage_table(report),
              models_table(report)]
    return [t for t in tables if t is not None]
