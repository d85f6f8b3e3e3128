"""Matplotlib figures of a sweep report, drawn off-screen (``matplotlib.figure.Figure``, Agg) to PNG bytes.

Each function takes report data (cell entries) and returns PNG bytes, or None when the grid has
nothing to show for that figure (the report then says why).
"""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Any

import numpy as np

from qtool.report.assemble import pareto_front

PRECISION_COLORS = {"fp32": "#222222", "fp16": "#7f7f7f", "int8": "#1f77b4", "int6": "#ff7f0e", "int4": "#d62728",
                    "w6a8": "#9467bd", "w4a8": "#8c564b"}
METHOD_MARKERS = {None: "D", "ptq": "o", "qat": "s"}
METRIC_NAMES = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO",
                "f1_at_threshold": "F1 (own threshold)", "f1_at_fp32_threshold": "F1 (fp32 threshold)",
                "pixel_pearson": "pixel Pearson vs fp32"}


def _figure(width: float, height: float, layout: str | None = "constrained") -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout=layout)


def _png(fig: Any, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _ok(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in cells if c["status"] == "ok"]


def _value(cell: dict[str, Any], metric: str) -> float | None:
    if metric == "pixel_pearson":
        return (cell.get("fidelity") or {}).get("pixel_pearson")
    return (cell.get("metrics") or {}).get(metric)


def pareto_plot(cells: list[dict[str, Any]], metric: str) -> bytes | None:
    """Accuracy vs p50 latency of every cell (``metric`` and AUPRO), the Pareto front drawn as a step line."""
    ok = [c for c in _ok(cells) if c.get("latency")]
    if not ok:
        return None
    metrics = [metric, "aupro" if metric != "aupro" else "pixel_auroc"]
    fig = _figure(11, 4.4)
    for ax, m in zip(fig.subplots(1, 2), metrics, strict=True):
        pts = [(c["id"], c["latency"]["p50_ms"], _value(c, m)) for c in ok if _value(c, m) is not None]
        front = set(pareto_front(pts))
        for c in ok:
            y = _value(c, m)
            if y is None:
                continue
            x = c["latency"]["p50_ms"]
            ax.scatter(x, y, s=70 if c["id"] in front else 40, marker=METHOD_MARKERS.get(c["method"], "o"),
                       color=PRECISION_COLORS.get(c["precision"], "#17becf"), edgecolor="black" if c["id"] in front
                       else "none", zorder=3, label=c["precision"])
            ax.annotate(c["label"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        on_front = sorted((x, y) for i, x, y in pts if i in front)
        if on_front:
            xs, ys = zip(*on_front, strict=True)
            ax.step(xs, ys, where="post", color="#2ca02c", lw=1.5, zorder=2, label="Pareto front")
        ax.set_xlabel(f"p50 latency (ms, {ok[0]['latency']['device']}, batch {ok[0]['latency']['batch']})")
        ax.set_ylabel(METRIC_NAMES.get(m, m))
        ax.grid(alpha=0.3)
        handles = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
        ax.legend(handles.values(), handles.keys(), fontsize=7, loc="best")
    fig.suptitle("Accuracy vs latency (higher and further left is better; marker: o PTQ, s QAT, D float)")
    return _png(fig)


def comparison_groups(cells: list[dict[str, Any]]) -> list[tuple[tuple, list[dict[str, Any]]]]:
    """Quantized cells grouped by every axis but calibrator and data source; groups of 2+ cells, largest first."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for c in _ok(cells):
        if c["calibrator"] is not None:
            groups[(c["model"], c["precision"], c["method"], c["part"], c["target"])].append(c)
    return sorted(((k, v) for k, v in groups.items() if len(v) > 1), key=lambda kv: -len(kv[1]))


def calib_source_plot(cells: list[dict[str, Any]], metric: str, max_groups: int = 4) -> bytes | None:
    """Heatmaps calibrator x calibration-data source of ``metric``, AUPRO and pixel correlation vs fp32."""
    groups = comparison_groups(cells)[:max_groups]
    if not groups:
        return None
    metrics = [metric, "aupro" if metric != "aupro" else "pixel_auroc", "pixel_pearson"]
    calibs = sorted({c["calibrator"] for _, g in groups for c in g})
    sources = sorted({c["calib_source"] for _, g in groups for c in g})
    fig = _figure(3.6 * len(metrics), 0.5 + (0.9 + 0.45 * len(sources)) * len(groups))
    axes = np.atleast_2d(fig.subplots(len(groups), len(metrics), squeeze=False))
    for row, (key, group) in enumerate(groups):
        for col, m in enumerate(metrics):
            grid = np.full((len(sources), len(calibs)), np.nan)
            for c in group:
                v = _value(c, m)
                if v is not None:
                    grid[sources.index(c["calib_source"]), calibs.index(c["calibrator"])] = v
            ax = axes[row, col]
            im = ax.imshow(grid, cmap="viridis", aspect="auto")
            for (i, j), v in np.ndenumerate(grid):
                ax.text(j, i, "-" if np.isnan(v) else f"{v:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if not np.isnan(v) and v < np.nanmean(grid) else "black")
            ax.set_xticks(range(len(calibs)), calibs, fontsize=8)
            ax.set_yticks(range(len(sources)), sources, fontsize=8)
            ax.set_title(f"{METRIC_NAMES.get(m, m)}\n{' '.join(str(k) for k in key if k)}", fontsize=8)
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("Calibrator (columns) x calibration data (rows)")
    return _png(fig)


def category_delta_plot(cells: list[dict[str, Any]], categories: list[str], metrics: tuple[str, ...] = (
        "image_auroc", "aupro", "f1_at_fp32_threshold")) -> bytes | None:
    """Per-category change vs fp32 of each cell (rows) in each category (columns), one panel per metric."""
    rows = [c for c in _ok(cells) if c.get("deltas")]
    if not rows or not categories:
        return None
    cols = [*categories, "mean"]
    panel = max(2.4, 0.62 * len(cols))
    fig = _figure(2.6 + panel * len(metrics), 1.4 + 0.3 * len(rows))
    axes = np.atleast_1d(fig.subplots(1, len(metrics), sharey=True))
    for k, (ax, m) in enumerate(zip(axes, metrics, strict=True)):
        grid = np.array([[np.nan if c["deltas"].get(cat, {}).get(m) is None else c["deltas"][cat][m] for cat in cols]
                         for c in rows], dtype=float)
        vmax = max(0.01, float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 0.01)
        ax.imshow(grid, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
        if grid.size <= 400:
            for (i, j), v in np.ndenumerate(grid):
                ax.text(j, i, "-" if np.isnan(v) else f"{v:+.3f}", ha="center", va="center", fontsize=6.5,
                        color="white" if not np.isnan(v) and abs(v) > 0.6 * vmax else "black")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), [c["label"] for c in rows], fontsize=7)
        ax.tick_params(axis="y", labelleft=k == 0)
        ax.set_title(f"delta {METRIC_NAMES.get(m, m)}", fontsize=9)
    fig.suptitle("Per-category change vs fp32 (blue: better, red: worse; colour scale per panel)")
    return _png(fig)


def overlay_plot(title: str, rows: list[dict[str, Any]]) -> bytes:
    """For each image: the image, fp32's map over it, the cell's map over it (one colour scale), and |diff|.

    ``rows`` items: ``image`` (S,S,3) in [0, 1], ``ref`` and ``map`` (S,S), ``name``, ``diff`` (max |diff|).
    """
    height = 2.5 * len(rows) + 0.7
    fig = _figure(10, height, layout=None)  # a fixed grid: constrained layout costs 2x here
    fig.subplots_adjust(left=0.01, right=0.95, bottom=0.02, top=1 - 0.75 / height, wspace=0.08, hspace=0.2)
    axes = np.atleast_2d(fig.subplots(len(rows), 4, squeeze=False))
    for r, row in enumerate(rows):
        lo, hi = float(min(row["ref"].min(), row["map"].min())), float(max(row["ref"].max(), row["map"].max()))
        diff = np.abs(row["map"] - row["ref"])
        panels = [("image: " + row["name"], None), ("fp32", row["ref"]), (title, row["map"]),
                  (f"|diff| (max {row['diff']:.3g})", diff)]
        for c, (name, amap) in enumerate(panels):
            ax = axes[r, c]
            ax.set_axis_off()
            ax.set_title(name, fontsize=8)
            if c < 3:
                ax.imshow(row["image"])
            if amap is not None and c < 3:
                ax.imshow(amap, cmap="jet", alpha=0.45, vmin=lo, vmax=hi)
            elif amap is not None:
                im = ax.imshow(amap, cmap="magma")
                fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"fp32 vs {title}: the test images whose maps differ most", fontsize=10)
    return _png(fig, dpi=80)  # photographic panels compress poorly; keep the self-contained HTML small
