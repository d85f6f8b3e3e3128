"""Mixed precision's share of the lower-width loss recovered, and its cost on the graph this CPU can run.

Widths under 8 bits have no integer kernels in ONNX Runtime CPU (qtool emulates them in float), so a 4- or
6-bit mixed-precision model's own latency says nothing about deployment. For each cell (a bench/map_aware.py
cell folder, ``cell.json`` and ``ptq/``, of a ``--mixed-precision`` run under 8 bits), this builds with
``qtool ptq`` itself, from the same source model and recipe at 8 bits: the all-int8 graph, and the stand-in with
the cell's float layers excluded (``ptq.exclude_nodes``); times fp32, all-int8 and the stand-in interleaved
round by round in one process (bench/mtd_models.ort_latency_ms); and states the float layers' share of the
multiply-accumulates. Accuracy: the cell's test metrics against the all-quantized cell of the same width (the
second folder) and fp32 (evaluated here), and the share of the fp32 - all-quantized gap the cell recovers.

Run: .venv/bin/python bench/mixed_precision_latency.py --cell NAME=MP_CELL:ALL_CELL [--cell ...] --work DIR --out PATH
Writes PATH.{json,md}. Run it with no other job on the machine. ``--out PATH --render`` writes PATH.md again
from PATH.json, measuring nothing.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from map_aware import KEYS
from mtd_models import ort_latency_ms

from qtool.artifacts import bench_meta, sha256_file, versions_line, write_results
from qtool.graph import load_model, node_macs, prepare
from qtool.ptq import run_ptq
from qtool.recipe import PtqConfig, Recipe, load_recipe
from qtool.runs import run_eval

#: A metric whose fp32 - all-quantized gap is under this has no loss to recover (its share is not stated).
MIN_GAP = 0.01


def cell_dirs(text: str) -> tuple[str, Path, Path]:
    """``NAME=MP_CELL:ALL_CELL`` -> name and the two cell folders, each checked to hold ``cell.json`` and ``ptq/``."""
    name, _, dirs = text.partition("=")
    mp_cell, _, all_cell = dirs.partition(":")
    if not (name and mp_cell and all_cell):
        raise SystemExit(f"--cell {text!r}: expected NAME=MP_CELL:ALL_CELL")
    for d in (mp_cell, all_cell):
        if not (Path(d) / "cell.json").is_file() or not (Path(d) / "ptq" / "report.json").is_file():
            raise SystemExit(f"--cell {name}: {d} is not a bench/map_aware.py cell folder (cell.json, ptq/report.json)")
    return name, Path(mp_cell), Path(all_cell)


def cell_setup(run_dir: Path) -> dict[str, Any]:
    """Source model, recipe, width and float layers' nodes of a mixed-precision ``qtool ptq`` run folder."""
    report = json.loads((run_dir / "report.json").read_text())
    mp = report.get("mixed_precision")
    if mp is None:
        raise SystemExit(f"{run_dir}: not a mixed-precision run (no mixed_precision in report.json)")
    exported = run_dir / "fp32.onnx"
    return {"source": exported if exported.exists() else Path(report["model"]),
            "recipe": load_recipe(run_dir / "recipe.yaml"), "bits": report["plan"]["activation_bits"],
            "layers": mp["layers"], "float_layers": [f["layer"] for f in mp["fallback"]],
            "float_nodes": [n for f in mp["fallback"] for n in f["nodes"]], "criterion": mp["criterion"],
            "budget": mp["budget"]}


def recovered(mp: float, quantized: float, fp32: float) -> float | None:
    """Share of the fp32 - all-quantized gap that mixed precision closes (None: a gap under ``MIN_GAP``)."""
    return round((mp - quantized) / (fp32 - quantized), 3) if fp32 - quantized >= MIN_GAP else None


def with_recovered(tested: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Per metric: the mixed, all-quantized and fp32 values and the share recovered."""
    return {k: {**{m: tested[m][k] for m in ("mixed", "all-quantized", "fp32")},
                "recovered": recovered(tested["mixed"][k], tested["all-quantized"][k], tested["fp32"][k])}
            for k in KEYS}


def fp32_metrics(setup: dict[str, Any], work: Path) -> dict[str, float]:
    """Test metrics of the cell's fp32 source (cached in ``work``)."""
    cached = work / "fp32_metrics.json"
    if not cached.exists():
        work.mkdir(parents=True, exist_ok=True)
        metrics = run_eval(setup["source"], setup["recipe"])["metrics"]["mean"]
        cached.write_text(json.dumps({k: metrics.get(k) for k in KEYS}))
    return json.loads(cached.read_text())


def int8_recipe(setup: dict[str, Any], exclude: list[str]) -> Recipe:
    """The cell's recipe at 8 bits (same calibrator, data, bias correction), no mixed precision, ``exclude`` float."""
    recipe = setup["recipe"]
    ptq = recipe.ptq.model_copy(update={"activation_bits": 8, "weight_bits": 8, "mixed_precision": None,
                                        "mixed_precision_criterion": PtqConfig().mixed_precision_criterion,
                                        "exclude_nodes": [*recipe.ptq.exclude_nodes, *map(glob.escape, exclude)]})
    return recipe.model_copy(update={"ptq": ptq})


def source_work(setup: dict[str, Any], work: Path) -> Path:
    """The folder of what every cell of one source shares (fp32 metrics, the all-int8 build): built once."""
    key = hashlib.sha256((sha256_file(setup["source"]) + int8_recipe(setup, []).model_dump_json()).encode())
    return work / f"source-{key.hexdigest()[:12]}"


def build_int8(setup: dict[str, Any], out: Path, exclude: list[str]) -> Path:
    """``qtool ptq`` of :func:`int8_recipe` into ``out`` (reused when there)."""
    if not (out / "model.onnx").exists():
        run_ptq(setup["source"], int8_recipe(setup, exclude), out)
    return out / "model.onnx"


def float_share(setup: dict[str, Any]) -> float:
    """The float nodes' share of the prepared graph's multiply-accumulates (prepared as ``qtool ptq`` prepares it)."""
    prepared = prepare(load_model(setup["source"]), input_shape=setup["recipe"].ptq.input_shape or None)
    missing = set(setup["float_nodes"]) - {n.name for n in prepared.graph.node}
    if missing:
        raise SystemExit(f"float layer node {sorted(missing)[0]!r} is not in the prepared graph of {setup['source']}")
    macs = node_macs(prepared)
    return sum(macs.get(n, 0) for n in setup["float_nodes"]) / sum(macs.values())


def main(argv: list[str] | None = None) -> None:
    """Build the 8-bit graphs of every cell, time them with fp32 side by side, write the results."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", action="append", default=[], metavar="NAME=MP_CELL:ALL_CELL")
    ap.add_argument("--work", help="folder for the 8-bit builds and fp32 metrics (reused when present)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--out", required=True)
    ap.add_argument("--render", action="store_true",
                    help="only write PATH.md again from PATH.json (shares recomputed), measuring nothing")
    args = ap.parse_args(argv)
    if not args.render and not (args.cell and args.work):
        ap.error("give --cell (at least one) and --work, or --render")
    if args.render:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        for r in saved["rows"]:
            r["accuracy"] = with_recovered({m: {k: r["accuracy"][k][m] for k in KEYS}
                                            for m in ("mixed", "all-quantized", "fp32")})
        return write_results(Path(args.out), saved, lambda path: markdown(path, saved["meta"], saved["rows"]))
    rows = []
    cells = [cell_dirs(c) for c in args.cell]  # every folder checked before anything is built
    for name, mp_cell, all_cell in cells:
        run_dir = mp_cell / "ptq"
        setup = cell_setup(run_dir)
        work, shared = Path(args.work) / name, source_work(setup, Path(args.work))
        tested = {"mixed": json.loads((mp_cell / "cell.json").read_text()),
                  "all-quantized": json.loads((all_cell / "cell.json").read_text()),
                  "fp32": fp32_metrics(setup, shared)}
        accuracy = with_recovered(tested)
        models = {"fp32": setup["source"], "all-int8": build_int8(setup, shared / "all8", []),
                  "stand-in": build_int8(setup, work / "mp8", setup["float_nodes"])}
        size = load_model(setup["source"]).graph.input[0].type.tensor_type.shape.dim[-1].dim_value
        latency = ort_latency_ms({k: (p, size) for k, p in models.items()}, args.threads, args.warmup, args.iters)
        ms = {k: latency[k]["median_ms"] for k in models}
        rows.append({"cell": name, "run": str(run_dir), "all_quantized": str(all_cell), "accuracy": accuracy,
                     "bits": setup["bits"], "criterion": setup["criterion"],
                     "budget": setup["budget"], "float_layers": len(setup["float_layers"]), "layers": setup["layers"],
                     "float_macs_share": round(float_share(setup), 4),
                     "latency": latency, "sha256": {k: sha256_file(p) for k, p in models.items()},
                     "stand_in_vs_all_int8": round(ms["stand-in"] / ms["all-int8"], 3),
                     "fp32_vs_stand_in": round(ms["fp32"] / ms["stand-in"], 3),
                     "fp32_vs_all_int8": round(ms["fp32"] / ms["all-int8"], 3)})
        print(rows[-1]["cell"], ms, flush=True)
    meta = bench_meta("bench/mixed_precision_latency.py", argv, threads=args.threads, iters=args.iters)
    write_results(Path(args.out), {"meta": meta, "rows": rows}, lambda path: markdown(path, meta, rows))


def markdown(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The results table: loss recovered per metric, then the cost (float MACs, latencies side by side)."""
    lines = ["# Mixed precision: the lower-width loss recovered, and the cost", "", f"`{meta['command']}`", "",
             "Test metrics: all-quantized -> mixed precision (fp32); recovered: share of the fp32 - "
             f"all-quantized gap closed (- where that gap is under {MIN_GAP}: no loss to recover).", "",
             "| cell | bits | float layers | " + " | ".join(f"{k} | {k} recovered" for k in KEYS) + " |",
             "|---" * (3 + 2 * len(KEYS)) + "|"]
    for r in rows:
        a = r["accuracy"]
        lines.append(f"| {r['cell']} | {r['bits']} | {r['float_layers']} of {r['layers']} | " + " | ".join(
            f"{a[k]['all-quantized']:.4f} -> {a[k]['mixed']:.4f} ({a[k]['fp32']:.4f}) | "
            + ("-" if a[k]["recovered"] is None else f"{100 * a[k]['recovered'] + 0.0:.0f} %") for k in KEYS) + " |")
    lines += ["", "## Cost", "",
              f"machine: {meta['machine']}; ONNX Runtime CPU, {meta['threads']} threads, batch 1, median of "
              f"{meta['iters']} interleaved rounds. The stand-in is the cell's float layers kept float and every "
              "other layer at 8 bits (integer kernels): what this CPU can run, not the speed of the cell's own "
              "width (emulated in float here).", "",
              "| cell | bits | float layers | float MACs | fp32 ms | all-int8 ms | stand-in ms "
              "| stand-in / all-int8 | fp32 / stand-in | fp32 / all-int8 |", "|---" * 10 + "|"]
    for r in rows:
        m = {k: r["latency"][k]["median_ms"] for k in ("fp32", "all-int8", "stand-in")}
        lines.append(f"| {r['cell']} | {r['bits']} | {r['float_layers']} of {r['layers']} | "
                     f"{r['float_macs_share']:.3f} | {m['fp32']} | {m['all-int8']} | {m['stand-in']} | "
                     f"{r['stand_in_vs_all_int8']} | {r['fp32_vs_stand_in']} | {r['fp32_vs_all_int8']} |")
    lines += ["", versions_line(meta["versions"], skip_missing=True)]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
