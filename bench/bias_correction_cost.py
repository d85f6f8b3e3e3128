"""Cost of bias correction, three ways to run the levels, side by side on one model, ranges and image set.

``frontier`` (qtool's way): :class:`qtool.graph.frontier.FrontierRunner` keeps the activations upstream of
the next level, so each level runs only the nodes between them and its outputs (``node_runs``: how many in all).
``upstream cut``: each level runs ``qtool.graph.probe.upstream_of`` its outputs from the input images (qtool's
way before commit 98d5480, which also re-read the images from disk per level; here all three hold them in
memory). ``whole graph``: each level runs the whole Q/DQ graph (ONNX Runtime runs every node whatever is
fetched). All three must give the same corrected model (checked byte for byte).

Run: .venv/bin/python bench/bias_correction_cost.py --model bench/work/rd40-seed1/rd/model.pt
         --recipe recipes/mtd_rd.yaml --bits 6 [--calib mse] [--set KEY=VALUE ...]
Writes PATH.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import onnx

import qtool.bias_correction as bc
from qtool.artifacts import bench_meta, versions_line, write_results
from qtool.calib_data import calibration_set
from qtool.calibrate import calibrate
from qtool.commands.common import fail_cleanly
from qtool.data import ImageTransform, load_splits
from qtool.graph import build_spec, get_profile, load_model, prepare
from qtool.graph.frontier import FrontierRunner
from qtool.graph.probe import add_outputs, probe_session, upstream_of
from qtool.recipe import load_recipe
from qtool.runs import run_export


def rerun_from_images(cut: Callable[[onnx.ModelProto, list[str]], onnx.ModelProto]) -> Callable:
    """A ``FrontierRunner.run`` that keeps no frontier: every step runs ``cut(model, targets)`` on the images."""
    def run(self: FrontierRunner, model: onnx.ModelProto, targets: list[str], moving: object, hold: bool = True):
        sess = probe_session(cut(model, targets), self.threads)
        for real, name, chunk in self.inputs:
            yield [a[:real] for a in sess.run(targets, {name: chunk})]
    return run


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
    frontier_run = FrontierRunner.run
    for way in ("frontier", "upstream cut", "whole graph"):
        if way != "frontier":
            FrontierRunner.run = rerun_from_images(add_outputs if way == "whole graph" else upstream_of)
        t0 = time.perf_counter()
        models[way], report = bc.correct_biases(prepared, spec, ranges, calib.batches, recipe.eval.threads)
        rows[way] = {"seconds": round(time.perf_counter() - t0, 2), "levels": report["levels"],
                     "relative_shift": report["relative_shift"], "node_runs": report.get("node_runs"),
                     "frontier_mb": report.get("frontier_mb")}
        FrontierRunner.run = frontier_run
    same = len({m.SerializeToString() for m in models.values()}) == 1
    meta = bench_meta("bench/bias_correction_cost.py", argv, images=calib.count, bits=args.bits,
                      calib=args.calib, identical_models=same)
    speedup = {w: round(rows[w]["seconds"] / rows["frontier"]["seconds"], 2) for w in rows}

    def markdown(path: Path) -> None:
        lines = ["# Bias correction: frontier vs upstream cut vs whole graph", "", f"`{meta['command']}`", "",
                 f"machine: {meta['machine']}; {meta['images']} calibration images, {args.calib}, {args.bits} bits; "
                 f"corrected models identical: {same}", "",
                 "| way | seconds | x frontier's | levels | mean relative shift before -> after |",
                 "|---|---|---|---|---|"]
        lines += [f"| {w} | {r['seconds']} | {speedup[w]} | {r['levels']} | "
                  f"{r['relative_shift']['before']:.4f} -> {r['relative_shift']['after']:.4f} |"
                  for w, r in rows.items()]
        f = rows["frontier"]
        lines += ["", f"frontier: {f['node_runs']} node runs per image chunk over all levels, largest frontier "
                      f"{f['frontier_mb']} MB"]
        path.write_text("\n".join([*lines, "", versions_line(meta["versions"])]) + "\n")

    write_results(Path(args.out), {"meta": meta, "rows": rows, "speedup": speedup}, markdown)
    print(rows, "identical:", same)


if __name__ == "__main__":
    fail_cleanly(main)()
