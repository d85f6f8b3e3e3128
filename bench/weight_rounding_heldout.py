r"""Does OPTQ's smaller layer output error hold on images it did not see? Calibration vs held-out normals.

For one float ONNX and its PTQ recipe: the calibration images (``ptq.calib_data``, train source: the first N of
the normal pool) and the next ``--heldout`` normal images (held-out, then training normals; never the test split).
Every quantized Conv's input Gram matrices are taken on both sets (fp32 inputs, ``qtool.weight_rounding``); each
weight is rounded by nearest and by OPTQ on the calibration Gram at each ``--damp``; the relative output error
``|(W - Q) X|^2 / |W X|^2`` of every rounding is then measured on both sets. Reported: the mean over layers and the
share of layers where OPTQ's held-out error is below nearest's. Activations are not quantized here (weights only).

``--anomalies``: also synthetic anomalies (``qtool.data.synth_anomalies``, seed 1) made from the held-out normals,
the error measured only at the layer outputs inside their defect masks (each mask taken at the layer's output
grid), and a third rounding, OPTQ on the calibration Gram plus the Gram of synthetic anomalies (seed 0) made from
the calibration images themselves (their defect positions only, weighted ``--anomaly-weight`` per position).

Run: .venv/bin/python bench/weight_rounding_heldout.py --onnx bench/work/pool_s1_rd/mtd-rd/fp32.onnx \
         --recipe bench/work/pool_s1_rd/mtd-rd/mse-bc-train-4bit/ptq/recipe.yaml --damp 0.01,0.1,1 \
         --out bench/results/weight_rounding_heldout_mtd_rd
Writes PATH.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from onnx import numpy_helper

from qtool.artifacts import bench_meta, versions_line, write_results
from qtool.calib_data import normal_pool
from qtool.commands.common import fail_cleanly
from qtool.data import ImageTransform, iter_batches, load_splits
from qtool.data.synth_anomalies import synthesize
from qtool.graph import build_spec, get_profile, load_model, prepare
from qtool.graph._index import GraphIndex
from qtool.graph.insert_qdq import weight_grid
from qtool.recipe import load_recipe
from qtool.weight_rounding import (
    conv_layers,
    gptq_values,
    layer_grams,
    nearest_values,
    relative_error,
    row_grid,
)

ROOT = Path(__file__).resolve().parents[1]


@fail_cleanly
def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--damp", default="0.01,0.1,1")
    ap.add_argument("--anomalies", action="store_true")
    ap.add_argument("--anomaly-weight", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    recipe = load_recipe(Path(args.recipe))
    cfg = recipe.ptq
    damps = [float(d) for d in args.damp.split(",")]
    model = prepare(load_model(Path(args.onnx)), input_shape=cfg.input_shape or None)
    spec = build_spec(model, cfg, get_profile(cfg.target))
    layers, _ = conv_layers(model, spec)
    splits, transform = load_splits(recipe.data), ImageTransform(recipe.data)
    n = cfg.calib_data.num_samples
    pool = normal_pool(splits, n + args.heldout)
    sets = {"calibration": pool[:n], "held-out": pool[n:]}
    grams = {}
    for name, samples in sets.items():
        batches = (images for images, _ in iter_batches(samples, transform, cfg.calib_data.batch_size))
        grams[name], _ = layer_grams(model, layers, batches, recipe.eval.threads)
    if args.anomalies:
        for name, samples, seed in (("held-out anomalies", sets["held-out"], 1), ("calibration anomalies",
                                                                                  sets["calibration"], 0)):
            normals = np.concatenate([im for im, _ in iter_batches(samples, transform, cfg.calib_data.batch_size)])
            synth = synthesize(normals, recipe.ptq.search.kinds, seed)
            step = cfg.calib_data.batch_size
            starts = range(0, len(synth.images), step)
            grams[name], _ = layer_grams(model, layers, (synth.images[i : i + step] for i in starts),
                                         recipe.eval.threads, (synth.masks[i : i + step] for i in starts))
    idx = GraphIndex(model)
    rows = []
    for layer in layers:
        p = spec.weights[layer.weight]
        w = numpy_helper.to_array(idx.initializers[layer.weight])
        scale, zp = weight_grid(layer.weight, p, w, spec.weight_range, {})
        groups = grams["calibration"][layer.weight].shape[0]
        s, z = row_grid(scale, zp, w.shape[0], groups)
        wg = w.reshape(groups, w.shape[0] // groups, -1).astype(np.float64)
        roundings = {"nearest": nearest_values(wg, s, z, p.qmin, p.qmax)}
        for d in damps:
            roundings[f"gptq damp {d:g}"] = gptq_values(wg, grams["calibration"][layer.weight], s, z,
                                                        p.qmin, p.qmax, damp=d)
        if args.anomalies:
            h = grams["calibration"][layer.weight] + args.anomaly_weight * grams["calibration anomalies"][layer.weight]
            roundings["gptq + calibration anomalies"] = gptq_values(wg, h, s, z, p.qmin, p.qmax)
        rows.append({"weight": layer.weight, "columns": int(wg.shape[2]),
                     "errors": {k: {name: relative_error(wg, q, g[layer.weight]) for name, g in grams.items()
                                    if name != "calibration anomalies"}
                                for k, q in roundings.items()}})
    methods = list(rows[0]["errors"]) if rows else []
    judged = [n for n in grams if n != "calibration anomalies"]
    summary = {m: {name: float(np.mean([r["errors"][m][name] for r in rows])) for name in judged} for m in methods}
    wins = {m: {name: float(np.mean([r["errors"][m][name] < r["errors"]["nearest"][name] for r in rows]))
                for name in judged} for m in methods[1:]}
    meta = bench_meta("bench/weight_rounding_heldout.py", argv, images={k: len(v) for k, v in sets.items()},
                      bits=cfg.weight_bits)
    payload = {"meta": meta, "summary": summary, "heldout_wins": wins, "layers": rows}

    def markdown(path: Path) -> None:
        lines = ["# OPTQ rounding: layer output error on calibration vs held-out images", "",
                 f"`{meta['command']}`", "",
                 f"machine: {meta['machine']}; {cfg.weight_bits}-bit weights, fp32 activations; {len(rows)} Conv "
                 f"layers; images: {meta['images']} (never the test split)", "",
                 "Mean over layers of the relative output error (share of layers below nearest's):", "",
                 "| rounding | " + " | ".join(judged) + " |", "|---|" + "---|" * len(judged)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(
                f"{summary[m][n]:.4g}" + ("" if m == "nearest" else f" ({wins[m][n]:.0%})") for n in judged) + " |")
        lines += ["", versions_line(meta["versions"]), ""]
        path.write_text("\n".join(lines))

    write_results(Path(args.out), payload, markdown)
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main(sys.argv[1:])
