"""fp32 comparison of the bundled KD models (STFPM, RD, US) on MTD: accuracy, ORT latency, size.

For each model: a trained checkpoint (``--checkpoint NAME=PATH``) or, with ``--train``, a run of
``recipes/mtd_<name>.yaml`` into ``--work/<name>`` (resumes from its ``last.pt``); then ONNX export
(parity checked), fp32 evaluation of the ONNX model with ONNX Runtime (image AUROC, pixel AUROC,
AUPRO on the recipe's test split), latency (batch 1, ``--threads`` intra-op threads, warmup, median
of ``--iters`` runs) and size (ONNX file, parameters per part).

Run: .venv/bin/python bench/mtd_models.py --train [--models stfpm,rd,us] [--set key=value ...]
Writes bench/results/mtd_models.{json,md} (``--out`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from qtool.artifacts import bench_meta, versions_line, write_results
from qtool.models import MODELS, load_checkpoint
from qtool.recipe import load_recipe
from qtool.runs import run_eval, run_export, run_train

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


def ort_latency_ms(models: dict[str, tuple[Path, int]], threads: int, warmup: int, iters: int
                   ) -> dict[str, dict[str, float]]:
    """Median / min / p90 ms of batch-1 ONNX Runtime CPU runs, the models interleaved round by round.

    Every round runs each model once on its fixed random image, so a slow spell of the machine hits
    all models alike and their ratios are side by side. Thread spinning is off: the spinning pools
    of the idle sessions would otherwise take the cores from the running one (measured: every
    model about 2x slower interleaved with spinning on, the same as alone with it off).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    runs = {}
    for name, (path, size) in models.items():
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, size, size), np.float32)}
        for _ in range(warmup):
            sess.run(None, feed)
        runs[name] = (sess, feed)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iters):
        for name, (sess, feed) in runs.items():
            t0 = time.perf_counter()
            sess.run(None, feed)
            times[name].append(1000 * (time.perf_counter() - t0))
    out = {}
    for name, t in times.items():
        t.sort()
        out[name] = {"median_ms": round(statistics.median(t), 2), "min_ms": round(t[0], 2),
                     "p90_ms": round(t[min(len(t) - 1, int(0.9 * len(t)))], 2)}
    return out


def checkpoint_for(name: str, args: argparse.Namespace, given: dict[str, str], overrides: list[str]) -> Path:
    """The model's checkpoint: given on the command line, or trained (resumed) into the work folder."""
    if name in given:
        return Path(given[name])
    if not args.train:
        sys.exit(f"error: no checkpoint for {name}; pass --checkpoint {name}=PATH or --train")
    recipe = load_recipe(Path(args.recipe_dir) / f"mtd_{name}.yaml", overrides)
    summary = run_train(recipe, Path(args.work) / name, export=False)
    if len(summary["models"]) != 1:
        sys.exit(f"error: {name} trained {len(summary['models'])} models; this benchmark needs train.mode=unified")
    return Path(summary["models"][0]["checkpoint"])


def bench_model(name: str, ckpt: Path, args: argparse.Namespace, overrides: list[str]) -> dict:
    """Export, evaluate and time one model."""
    recipe = load_recipe(Path(args.recipe_dir) / f"mtd_{name}.yaml", overrides)
    model, meta = load_checkpoint(ckpt)
    size, extra, stored = int(meta["image_size"]), dict(meta["extra"]), meta["model"]
    onnx_path = Path(args.work) / name / "bench.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    exported = run_export(ckpt, onnx_path, recipe)
    result = run_eval(onnx_path, recipe)
    params = {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in ("teacher", "student")}
    return {
        "model": name, "checkpoint": str(ckpt), "backbone": recipe.model.backbone,
        "options": recipe.model.options, "image_size": size,
        **{k: result["metrics"]["mean"].get(k) for k in KEYS},
        "n_test": result["n_test"],
        "onnx": str(onnx_path),
        "onnx_mb": round(onnx_path.stat().st_size / 2**20, 2),
        "params": params, "parity": exported["parity"],
        "epochs": extra.get("epoch"), "selected_epoch": extra.get("selected_epoch"),
        "train_seconds": extra.get("train_seconds"),
        "map_levels": (stored.get("options", {}).get("map_levels", stored.get("levels"))
                       if "map_levels" in getattr(MODELS.get(name), "MAP_OPTIONS", ()) else None),
        "map_sigma": blur.sigma if (blur := getattr(model.head, "blur", None)) is not None else 0.0,
        "holdout_curve": [round(h["holdout_loss"], 4) for h in extra.get("history", []) if "holdout_loss" in h],
    }


def write_markdown(path: Path, meta: dict, rows: list[dict]) -> None:
    """Short Markdown table of the rows with the command, machine and versions."""
    lines = ["# Bundled KD models on MTD (fp32, ONNX Runtime CPU)", "", f"`{meta['command']}`", "",
             f"machine: {meta['machine']}; threads {meta['threads']}; batch 1; warmup {meta['warmup']}, "
             f"median of {meta['iters']} rounds, the models interleaved in each", "",
             "| model | backbone | image AUROC | pixel AUROC | AUPRO | F1-max | ms median (min, p90) | ONNX MB | "
             "student params | epochs | train s | map levels | map blur sigma |", "|---" * 13 + "|"]
    for r in rows:
        cells = [f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in KEYS]
        lines.append(f"| {r['model']} | {r['backbone']} | " + " | ".join(cells) +
                     f" | {r['latency']['median_ms']} ({r['latency']['min_ms']}, {r['latency']['p90_ms']}) | "
                     f"{r['onnx_mb']} | {r['params']['student']:,} | "
                     f"{r['epochs']}{_selected(r)} | {r['train_seconds'] and round(r['train_seconds'])} | "
                     f"{r.get('map_levels') or '-'} | {r['map_sigma']:g} |")
    lines += ["", versions_line(meta["versions"], skip_missing=True)]
    path.write_text("\n".join(lines) + "\n")


def _selected(row: dict) -> str:
    """`` (model: epoch K, best proxy)`` when the checkpoint holds a proxy-selected epoch, else nothing."""
    sel = row.get("selected_epoch")
    return f" (model: epoch {sel}, best proxy)" if sel is not None else ""


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, benchmark each model, write the JSON and Markdown results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="stfpm,rd,us")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--train", action="store_true", help="train models without --checkpoint (resumes)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-mtd-models"))
    ap.add_argument("--recipe-dir", default=str(ROOT / "recipes"))
    ap.add_argument("--set", action="append", default=[], metavar="[NAME:]KEY=VALUE",
                    help="recipe override, for every model or only for model NAME")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mtd_models"))
    args = ap.parse_args(argv)
    given = dict(c.split("=", 1) for c in args.checkpoint)
    names = [n for n in args.models.split(",") if n]
    rows = []
    for name in names:
        overrides = [o.split(":", 1)[1] if o.startswith(f"{name}:") else o
                     for o in args.set if ":" not in o.split("=", 1)[0] or o.startswith(f"{name}:")]
        ckpt = checkpoint_for(name, args, given, overrides)
        rows.append(bench_model(name, ckpt, args, overrides))
        print({k: rows[-1][k] for k in ("model", *KEYS, "onnx_mb")}, flush=True)
    latency = ort_latency_ms({r["model"]: (Path(r["onnx"]), r["image_size"]) for r in rows}, args.threads,
                             args.warmup, args.iters)
    for r in rows:
        r["latency"] = latency[r["model"]]
        print(r["model"], r["latency"], flush=True)
    meta = bench_meta("bench/mtd_models.py", argv if argv is not None else sys.argv[1:], threads=args.threads,
                      warmup=args.warmup, iters=args.iters)
    write_results(Path(args.out), {"meta": meta, "rows": rows}, lambda md: write_markdown(md, meta, rows))


if __name__ == "__main__":
    main()
