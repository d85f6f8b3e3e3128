"""Cost of bias correction: each level run on its upstream cut (qtool's way) vs on the whole Q/DQ graph.

ONNX Runtime runs every node of a graph whatever outputs are fetched, so ``qtool.bias_correction`` runs
each level on ``qtool.graph.probe.upstream_of`` (the nodes the level's outputs need). Both ways give the
same corrected model (checked here byte for byte); this times them side by side on one model, the same
calibration images and ranges, after one calibration.

Run: .venv/bin/python bench/bias_correction_cost.py --model bench/work/rd40-seed1/rd/model.pt
         --recipe recipes/mtd_rd.yaml --bits 6 [--calib mse] [--set KEY=VALUE ...]
Writes PATH.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import qtool.bias_correction as bc
from qtool.artifacts import bench_meta, versions_line, write_results
from qtool.calib_data import calibration_set
from qtool.calibrate import calibrate
from qtool.commands.common import fail_cleanly
from qtool.data import ImageTransform, load_splits
from qtool.graph import build_spec, get_profile, load_model, prepare
from qtool.graph.probe import add_outputs
from qtool.recipe import load_recipe
from qtool.runs import run_export


def main(argv: list[str] | None = None) -> None:
    """Calibrate once, correct the biases both ways, compare the models and the seconds."""
    from calibrators import get_calibrator

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a qtool checkpoint")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--bits", type=int, default=6)
    ap.add_argument("--calib", default="mse")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--work", default="bench/work/bias_correction_cost")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    recipe = load_recipe(Path(args.recipe), [*args.overrides, f"ptq.activation_bits={args.bits}",
                                             f"ptq.weight_bits={args.bits}", f"ptq.calib={args.calib}"])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run_export(Path(args.model), work / "fp32.onnx", recipe)
    cfg, profile = recipe.ptq, get_profile(recipe.ptq.target)
    prepared = prepare(load_model(work / "fp32.onnx"))
    spec = build_spec(prepared, cfg, profile)
    splits = load_splits(recipe.data)
    calib = calibration_set(splits, ImageTransform(recipe.data), cfg.calib_data)
    calibrator = get_calibrator(cfg.calib, symmetric=profile.activation_symmetric, num_bits=cfg.activation_bits)
    ranges = calibrate(prepared, spec.tensors_to_calibrate(), calib.batches(), calibrator, recipe.eval.threads)
    rows = {}
    models = {}
    for way in ("upstream cut", "whole graph"):
        cut = bc.upstream_of
        if way == "whole graph":
            bc.upstream_of = add_outputs  # the whole graph, probed
        t0 = time.perf_counter()
        models[way], report = bc.correct_biases(prepared, spec, ranges, calib.batches, recipe.eval.threads)
        rows[way] = {"seconds": round(time.perf_counter() - t0, 2), "levels": report["levels"],
                     "graph_runs": report["graph_runs"], "relative_shift": report["relative_shift"]}
        bc.upstream_of = cut
    same = models["upstream cut"].SerializeToString() == models["whole graph"].SerializeToString()
    meta = bench_meta("bench/bias_correction_cost.py", argv, images=calib.count, bits=args.bits,
                      calib=args.calib, identical_models=same)
    speedup = rows["whole graph"]["seconds"] / rows["upstream cut"]["seconds"]

    def markdown(path: Path) -> None:
        lines = ["# Bias correction: upstream cut vs whole graph", "", f"`{meta['command']}`", "",
                 f"machine: {meta['machine']}; {meta['images']} calibration images, {args.calib}, {args.bits} bits; "
                 f"corrected models identical: {same}; whole / cut = {speedup:.2f}x", "",
                 "| way | seconds | levels | graph runs | mean relative shift before -> after |",
                 "|---|---|---|---|---|"]
        lines += [f"| {w} | {r['seconds']} | {r['levels']} | {r['graph_runs']} | "
                  f"{r['relative_shift']['before']:.4f} -> {r['relative_shift']['after']:.4f} |"
                  for w, r in rows.items()]
        path.write_text("\n".join([*lines, "", versions_line(meta["versions"])]) + "\n")

    write_results(Path(args.out), {"meta": meta, "rows": rows, "speedup": speedup}, markdown)
    print(rows, "identical:", same)


if __name__ == "__main__":
    fail_cleanly(main)()
