"""Whole runs behind the CLI commands: each writes its artifacts, the resolved recipe and a manifest.

Every run folder holds ``recipe.yaml`` (so the run can be repeated) and ``manifest.json``
(versions, machine, hashes of inputs and outputs).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from qtool.artifacts import write_json, write_manifest
from qtool.data import ImageTransform, load_splits
from qtool.evaluate import Progress, evaluate
from qtool.export import export_onnx, parity
from qtool.modelio import open_model, stamp_data_config
from qtool.models import build_model
from qtool.recipe import Recipe, dump_recipe
from qtool.train import check_splits, train

log = logging.getLogger(__name__)


def run_train(recipe: Recipe, out_dir: Path, export: bool = True, progress: Progress = None) -> dict[str, Any]:
    """Train per the recipe into ``out_dir`` (and export each model to ONNX beside its checkpoint).

    Returns:
        Summary: checkpoints, ONNX files, epochs, seconds, final losses.
    """
    out_dir = Path(out_dir)
    splits = load_splits(recipe.data)
    build_model(recipe.model, recipe.data.image_size)  # bad options, geometry or weights fail here, before any file
    check_splits(recipe, splits)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_recipe(recipe, out_dir / "recipe.yaml")
    write_json(out_dir / "split.json", splits.to_json())
    results = train(recipe, splits, out_dir, progress)
    summary: dict[str, Any] = {"models": []}
    for res in results:
        entry = {"category": res.category, "checkpoint": str(res.checkpoint), "epochs": res.epochs,
                 "train_seconds": round(res.seconds, 2), "final": res.history[-1] if res.history else None,
                 **({"selected_epoch": res.selected_epoch} if res.selected_epoch is not None else {})}
        if export:
            entry["onnx"] = str(run_export(res.checkpoint, res.checkpoint.with_suffix(".onnx"), recipe)["onnx"])
        summary["models"].append(entry)
    write_json(out_dir / "train.json", summary)
    write_manifest(out_dir, {}, {"command": "train"})
    return summary


def run_export(checkpoint: Path, out: Path, recipe: Recipe) -> dict[str, Any]:
    """Export a checkpoint to ONNX, stamp its transform, and measure torch/ORT parity on random input.

    Returns:
        {"onnx": path, "parity": {...}}
    """
    opened = open_model(checkpoint)
    model, size = opened.torch_model, int(opened.data["image_size"])
    export_onnx(model, out, size, recipe.export.batch_size, recipe.export.opset)
    stamp_data_config(out, opened.data)
    rng = np.random.default_rng(recipe.seed)
    images = rng.standard_normal((recipe.export.batch_size, 3, size, size)).astype(np.float32)
    return {"onnx": out, "parity": parity(model, out, images)}


def run_eval(model_path: Path, recipe: Recipe, out: Path | None = None, progress: Progress = None,
             keep_maps: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint or ONNX model on the recipe's dataset (test split; holdout for threshold).

    The model's own transform settings (size, resize, normalisation) override the recipe's. With
    ``keep_maps`` the result also holds ``"maps"`` (test anomaly maps, numpy; never written to ``out``).
    """
    opened = open_model(model_path)
    data_cfg = opened.apply_transform(recipe.data)
    splits = load_splits(data_cfg)
    t0 = time.perf_counter()
    result = evaluate(opened.predictor(recipe.eval.threads), splits, ImageTransform(data_cfg), recipe.eval, progress,
                      keep_maps=keep_maps)
    result["model"] = str(model_path)
    result["eval_seconds"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        write_json(Path(out), {k: v for k, v in result.items() if k != "maps"})
    return result


def run_pipeline(recipe: Recipe, out_dir: Path, progress: Progress = None) -> dict[str, Any]:
    """The main job on one recipe: train, export, PTQ, then evaluate fp32 and int8 side by side.

    Writes ``summary.json`` and ``summary.md`` in ``out_dir`` (train/ and ptq/ hold each stage's run).
    """
    from qtool.ptq import run_ptq

    out_dir = Path(out_dir)
    trained = run_train(recipe, out_dir / "train", export=True, progress=progress)
    rows = []
    for m in trained["models"]:
        sub = "" if m["category"] == "all" else f"-{m['category']}"
        ptq = run_ptq(Path(m["onnx"]), recipe, out_dir / f"ptq{sub}", progress=progress)
        for label, path in (("fp32", m["onnx"]), (f"int8 {recipe.ptq.calib}/{recipe.ptq.target}", ptq["output"])):
            res = run_eval(Path(path), recipe, out_dir / f"eval{sub}-{label.split()[0]}.json", progress)
            rows.append({"category": m["category"], "precision": label, **res["metrics"]["mean"],
                         "ms_per_image": round(1000 * res["predict_seconds_per_image"], 2)})
    summary = {"recipe": recipe.name, "rows": rows}
    write_json(out_dir / "summary.json", summary)
    keys = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "ms_per_image")
    lines = ["| model | precision | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        cells = [f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k)) for k in keys]
        lines.append(f"| {r['category']} | {r['precision']} | " + " | ".join(cells) + " |")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    dump_recipe(recipe, out_dir / "recipe.yaml")
    write_manifest(out_dir, {}, {"command": "run"})
    return summary
