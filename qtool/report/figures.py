"""The figures of a sweep report: gather their data (report entries, cached maps, test images) and draw them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qtool.errors import QtoolError
from qtool.recipe import Recipe
from qtool.report import plots

log = logging.getLogger(__name__)
MAX_OVERLAY_CELLS = 24


@dataclass(frozen=True)
class Figure:
    """One drawn figure: file stem, heading, caption, PNG bytes (None: nothing to draw, caption says why)."""

    name: str
    title: str
    caption: str
    png: bytes | None


def _display(image: np.ndarray) -> np.ndarray:
    """A preprocessed (3,S,S) input as an (S,S,3) picture in [0, 1] (per-channel min-max)."""
    x = np.transpose(image, (1, 2, 0)).astype(np.float64)
    lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
    return np.clip((x - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0, 1.0)


def _overlay_rows(cell: dict[str, Any], transform: Any) -> list[dict[str, Any]]:
    ref = np.load(Path(cell["reference_entry"]) / "maps.npy", mmap_mode="r")
    data = np.load(Path(cell["entry"]) / "overlay.npz")
    rows = []
    for k, (i, name) in enumerate(zip(cell["overlay"]["indices"], cell["overlay"]["files"], strict=True)):
        rows.append({"image": _display(transform.image(Path(name))), "ref": np.asarray(ref[i], np.float32),
                     "map": data["maps"][k], "name": Path(name).parent.name + "/" + Path(name).name,
                     "diff": cell["overlay"]["max_abs_diff"][k]})
    return rows


def overlay_figures(report: dict[str, Any], recipe: Recipe) -> list[Figure]:
    """fp32 vs each quantized cell on its most different test images (the first ``MAX_OVERLAY_CELLS`` cells)."""
    from qtool.data import ImageTransform
    from qtool.modelio import open_model

    models = {m["label"]: m for m in report["models"]}
    transforms: dict[str, Any] = {}
    out = []
    cells = [c for c in report["cells"] if c["status"] == "ok" and c.get("overlay") and c["calibrator"]]
    for cell in cells[:MAX_OVERLAY_CELLS]:
        try:
            if cell["model"] not in transforms:
                opened = open_model(Path(models[cell["model"]]["onnx"]))
                transforms[cell["model"]] = ImageTransform(opened.apply_transform(recipe.data))
            png = plots.overlay_plot(cell["label"], _overlay_rows(cell, transforms[cell["model"]]))
            caption = (f"{cell['id']}: image, fp32 map, this cell's map (same colour scale) and |difference| on the "
                       f"{len(cell['overlay']['indices'])} test images where the maps differ most.")
        except (QtoolError, OSError, KeyError, ValueError) as e:
            log.warning("overlay of %s not drawn: %s", cell["id"], e)
            png, caption = None, f"{cell['id']}: overlay not drawn ({type(e).__name__}: {e})"
        out.append(Figure(f"overlay-{len(out):02d}", f"fp32 vs {cell['label']}", caption, png))
    if len(cells) > MAX_OVERLAY_CELLS:
        log.info("overlays drawn for the first %d of %d quantized cells", MAX_OVERLAY_CELLS, len(cells))
    return out


def render_figures(report: dict[str, Any], recipe: Recipe) -> list[Figure]:
    """Every figure of the report, in the order the HTML shows them."""
    metric, cells = report["pareto_metric"], report["cells"]
    name = plots.METRIC_NAMES.get(metric, metric)
    return [
        Figure("pareto", "Accuracy vs latency", f"{name} and AUPRO against p50 latency; the green step line joins "
               f"the Pareto front on {name} (no other cell is both faster and more accurate).",
               plots.pareto_plot(cells, metric)),
        Figure("calib-source", "Calibrator x calibration data",
               "Each quantized configuration measured with every calibrator and data source of the grid."
               if plots.comparison_groups(cells) else "Not drawn: no configuration was measured with two or more "
               "calibrator/data-source pairs.", plots.calib_source_plot(cells, metric)),
        Figure("category-deltas", "Per-category change vs fp32",
               "Metric of the cell minus fp32's, per category; F1 at the fp32 threshold shows the score shift.",
               plots.category_delta_plot(cells, report["categories"])),
        *overlay_figures(report, recipe),
    ]
