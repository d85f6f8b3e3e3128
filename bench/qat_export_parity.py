r"""A QAT run's fake-quant torch model against its QDQ export, beside how far tiny input noise moves each map.

For each ``--cell CELL_DIR`` (a ``bench/map_distillation.py`` cell folder: ``qat/qat.pt``, ``qat/model.onnx``,
``qat/fp32.onnx``) on the first ``--images`` check normals of the run (its report's file list; never the test
split): the mean and the largest relative difference of the anomaly maps (|a - b| over |b|, mean over mean and max
over max) between

- the fake-quant torch model (``qat.pt`` rebuilt) and its QDQ export (ONNX Runtime, Q/DQ in float);
- the QDQ export on the images and on the images plus Gaussian noise of ``--noise`` times their largest value;
- the float checkpoint in torch and its ONNX export, and that export under the same noise (the float baseline).

If the export mismatch is of the size of the noise's effect on the export itself, it is the quantized map's own
sensitivity (values on a rounding boundary flip), not a lowering error.

Run: .venv/bin/python bench/qat_export_parity.py --cell bench/work/pool_s2_mtd_rd/mtd-rd/mapdg-in8-train-8bit \\
         --out bench/results/qat_export_parity
Writes PATH.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from qat_trajectory import check_normals

from qtool.artifacts import bench_meta, versions_line, write_results
from qtool.commands.common import fail_cleanly
from qtool.evaluate import OnnxPredictor, TorchPredictor
from qtool.recipe import load_recipe
from qtool.search import RUN_LEVEL


def relative(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean and largest relative difference of map ``a`` against map ``b``."""
    return {"mean": float(np.abs(a - b).mean() / np.abs(b).mean()), "max": float(np.abs(a - b).max() / np.abs(b).max())}


def parity(cell: Path, images: int, noise: float, threads: int) -> dict:
    """The four comparisons of one cell folder."""
    from qtool.models import load_checkpoint
    from qtool.qat.checkpoint import load_qat_checkpoint

    files = [cell / "qat" / n for n in ("qat.pt", "model.onnx", "fp32.onnx", "report.json", "recipe.yaml")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        sys.exit(f"error: {missing[0]}: not a finished QAT cell")
    report = json.loads((cell / "qat" / "report.json").read_text())
    recipe = load_recipe(cell / "qat" / "recipe.yaml")
    x = check_normals(cell / "qat" / "model.onnx", report, recipe)[:images]
    noisy = x + np.random.default_rng(0).standard_normal(x.shape).astype(np.float32) * noise * float(np.abs(x).max())

    def onnx_map(name: str, inputs: np.ndarray) -> np.ndarray:
        return OnnxPredictor(cell / "qat" / name, threads, RUN_LEVEL)(inputs)[0]

    qdq, fp32 = onnx_map("model.onnx", x), onnx_map("fp32.onnx", x)
    qm, _, _ = load_qat_checkpoint(cell / "qat" / "qat.pt")
    model, _ = load_checkpoint(Path(report["model"]))
    return {"cell": str(cell), "images": len(x), "noise": noise,
            "qdq_vs_fake_quant": relative(TorchPredictor(qm.model)(x)[0], qdq),
            "qdq_under_noise": relative(onnx_map("model.onnx", noisy), qdq),
            "fp32_onnx_vs_torch": relative(TorchPredictor(model.eval())(x)[0], fp32),
            "fp32_under_noise": relative(onnx_map("fp32.onnx", noisy), fp32)}


def write_markdown(path: Path, meta: dict, rows: list[dict]) -> None:
    """One row per cell: the four relative differences (mean / max)."""
    lines = ["# QAT export parity against the quantized map's own sensitivity", "", f"`{meta['command']}`", "",
             f"machine: {meta['machine']}. Relative difference of the anomaly maps, mean / max (|a - b| over |b|); "
             f"noise: Gaussian, {rows[0]['noise']:g} times the images' largest value.", "",
             "| cell | images | QDQ export vs fake-quant torch | QDQ export under noise | fp32 ONNX vs torch | "
             "fp32 ONNX under noise |", "|---|---|---|---|---|---|"]
    for r in rows:
        cols = [r[k] for k in ("qdq_vs_fake_quant", "qdq_under_noise", "fp32_onnx_vs_torch", "fp32_under_noise")]
        lines.append(f"| {r['cell']} | {r['images']} | " + " | ".join(f"{c['mean']:.2e} / {c['max']:.2e}" for c in cols)
                     + " |")
    lines += ["", versions_line(meta["versions"])]
    path.write_text("\n".join(lines) + "\n")


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    """Parse arguments, compare every cell, write the results."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", type=Path, action="append", required=True, help="a map_distillation cell folder")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--noise", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [parity(c, args.images, args.noise, args.threads) for c in args.cell]
    meta = bench_meta("bench/qat_export_parity.py", argv)
    write_results(Path(args.out), {"meta": meta, "cells": rows}, lambda path: write_markdown(path, meta, rows))


if __name__ == "__main__":
    main()
