"""fp32 vs best PTQ vs QAT on MTD, at 8 bits and at a low width: image/pixel AUROC, AUPRO, QAT time per epoch.

One trained checkpoint (``--checkpoint``) and its recipe (default ``recipes/mtd_stfpm.yaml``). For
each bit width in ``--bits``: PTQ with every calibrator in ``--calibs`` and calibration source in
``--sources`` (``qtool.ptq.run_ptq``); the best PTQ run is the one with the highest image AUROC (then
pixel AUROC) on the test split, an oracle pick, so it is an upper bound for PTQ; then QAT
(``qtool.qat.run.run_qat``, ``--epochs``) started from that best run's ranges (``--init-from``) with
its calibrator settings. Every model is evaluated as ONNX with ONNX Runtime (``qtool.runs.run_eval``)
on the recipe's test split. The QAT rows give the training time per epoch and the holdout KD loss
before and after.

Run: .venv/bin/python bench/mtd_qat.py --checkpoint runs/mtd_stfpm/train/model.pt [--target cpu]
     [--bits 8,4] [--epochs 3] [--calibs minmax,entropy,percentile,mse] [--sources train,random-normal]
Writes bench/results/mtd_qat.{json,md} (``--out`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from qtool.artifacts import bench_meta, versions_line, write_results
from qtool.ptq import run_ptq
from qtool.qat.run import run_qat
from qtool.recipe import Recipe, load_recipe
from qtool.runs import run_eval, run_export

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


def evaluate(path: Path, recipe: Recipe) -> dict:
    """Mean test metrics of an ONNX model (its own transform settings) and its ms per image."""
    res = run_eval(path, recipe)
    return {**{k: res["metrics"]["mean"].get(k) for k in KEYS}, "n_test": res["n_test"],
            "ms_per_image": round(1000 * res["predict_seconds_per_image"], 2)}


def with_sets(recipe_path: str, overrides: list[str], *extra: str) -> Recipe:
    """The recipe with the command line's overrides, then ``extra`` ones."""
    return load_recipe(recipe_path, [*overrides, *extra])


def ptq_grid(fp32: Path, args: argparse.Namespace, bits: int, work: Path) -> list[dict]:
    """PTQ rows of one bit width, one per calibrator and calibration source."""
    rows = []
    for calib in [c for c in args.calibs.split(",") if c]:
        for source in [s for s in args.sources.split(",") if s]:
            recipe = with_sets(args.recipe, args.set, f"ptq.target={args.target}", f"ptq.calib={calib}",
                               f"ptq.calib_data.source={source}", f"ptq.activation_bits={bits}",
                               f"ptq.weight_bits={bits}")
            out = work / f"ptq_{bits}_{calib}_{source}"
            t0 = time.perf_counter()
            report = run_ptq(fp32, recipe, out)
            rows.append({"method": "ptq", "bits": bits, "calib": calib, "source": source, "run": str(out),
                         **evaluate(out / "model.onnx", recipe), "ptq_seconds": round(time.perf_counter() - t0, 1),
                         "sqnr_map_db": report["sqnr_db"]["anomaly_map"]})
            print({k: rows[-1][k] for k in ("method", "bits", "calib", "source", *KEYS[:3])}, flush=True)
    return rows


def qat_row(best: dict, args: argparse.Namespace, bits: int, work: Path) -> dict:
    """QAT from the best PTQ run's ranges and calibrator settings, evaluated like the others."""
    extra = [f"ptq.target={args.target}", f"ptq.calib={best['calib']}", f"ptq.calib_data.source={best['source']}",
             f"ptq.activation_bits={bits}", f"ptq.weight_bits={bits}", f"qat.init_from={best['run']}"]
    if args.epochs is not None:
        extra.append(f"qat.epochs={args.epochs}")
    recipe = with_sets(args.recipe, args.set, *extra)
    out = work / f"qat_{bits}"
    report = run_qat(Path(args.checkpoint), recipe, out)
    losses = [h["holdout_loss"] for h in report["history"] if "holdout_loss" in h]
    return {"method": "qat", "bits": bits, "calib": best["calib"], "source": best["source"], "run": str(out),
            **evaluate(out / "model.onnx", recipe), "epochs": recipe.qat.epochs,
            "epoch_seconds": report["epoch_seconds"], "mean_epoch_seconds": round(report["mean_epoch_seconds"], 2),
            "train_images": report["train_images"], "learnable_scales": recipe.qat.learnable_scales,
            "holdout_loss_before": losses[0] if losses else None, "holdout_loss_after": losses[-1] if losses else None,
            "sqnr_map_db": report["sqnr_db"]["anomaly_map"],
            "sqnr_vs_qat_float_db": report["sqnr_vs_qat_float_db"]["anomaly_map"]}


def fmt(v: object) -> str:
    """A table cell."""
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def write_markdown(path: Path, meta: dict, rows: list[dict]) -> None:
    """Short Markdown table: every row, the best PTQ marked, with command, machine and versions."""
    lines = ["# fp32 vs PTQ vs QAT on MTD (ONNX Runtime CPU evaluation)", "", f"`{meta['command']}`", "",
             f"machine: {meta['machine']}; target profile {meta['target']}; best PTQ = highest test image AUROC "
             "(oracle pick)", "",
             "| method | bits | calibration | image AUROC | pixel AUROC | AUPRO | F1-max | QAT s/epoch |",
             "|---" * 8 + "|"]
    for r in rows:
        calib = f"{r['calib']}/{r['source']}" if r.get("calib") else ""
        method = r["method"] + (" (best)" if r.get("best") else "")
        lines.append(f"| {method} | {r['bits']} | {calib} | " + " | ".join(fmt(r.get(k)) for k in KEYS)
                     + f" | {'' if r.get('mean_epoch_seconds') is None else round(r['mean_epoch_seconds'], 1)} |")
    lines += ["", versions_line(meta["versions"], skip_missing=True)]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run fp32 / PTQ grid / QAT per bit width, write the JSON and Markdown results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="trained qtool checkpoint (model.pt)")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "mtd_stfpm.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    ap.add_argument("--target", default="cpu", choices=["cpu", "tensorrt"])
    ap.add_argument("--bits", default="8,4", help="bit widths, e.g. 8,4 or 8,6")
    ap.add_argument("--epochs", type=int, default=None, help="QAT epochs (default: the recipe's qat.epochs)")
    ap.add_argument("--calibs", default="minmax,entropy,percentile,mse")
    ap.add_argument("--sources", default="train,random-normal")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-mtd-qat"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mtd_qat"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = with_sets(args.recipe, args.set)
    fp32 = work / "fp32.onnx"
    run_export(Path(args.checkpoint), fp32, base)
    rows = [{"method": "fp32", "bits": 32, **evaluate(fp32, base)}]
    print({k: rows[0][k] for k in ("method", *KEYS[:3])}, flush=True)
    for bits in [int(b) for b in args.bits.split(",") if b]:
        ptq = ptq_grid(fp32, args, bits, work)
        best = max(ptq, key=lambda r: (r["image_auroc"] or 0.0, r["pixel_auroc"] or 0.0))
        best["best"] = True
        rows += [*ptq, qat_row(best, args, bits, work)]
        print({k: rows[-1][k] for k in ("method", "bits", *KEYS[:3], "mean_epoch_seconds")}, flush=True)
    meta = bench_meta("bench/mtd_qat.py", argv if argv is not None else sys.argv[1:], target=args.target,
                      checkpoint=args.checkpoint, recipe=args.recipe)
    write_results(Path(args.out), {"meta": meta, "rows": rows}, lambda md: write_markdown(md, meta, rows))


if __name__ == "__main__":
    main()
