"""Map-aware calibration vs every standard calibrator x calibration source, at 8/6/4 bits, STFPM and RD.

For each setup (a dataset's recipe plus a trained model) and each cell (calibrator x source x bits):
``qtool ptq`` (library call) with ``ptq.search.proxy=true``, then ``qtool eval`` of the quantized
model on the recipe's test split. Per cell: image AUROC, pixel AUROC, AUPRO, calibration time
(calibrate + the search stages a calibrator needs) and the proxy (image / pixel AUROC of synthetic
anomalies vs normals on the search set, made from normal calibration images only). Per setup: the
fp32 row, and whether the proxy predicts the real metric: Spearman rank correlation across cells.

Setups: ``--model DATASET:MODEL=PATH`` (a trained checkpoint or its ONNX; repeatable), DATASET one
of mtd (recipes/mtd_stfpm.yaml's data) or multiclass (recipes/multiclass.yaml). Cells already run
are read back from ``--work`` (resumable). ``--tiny``: a smoke run on tiny synthetic data (trains
its own 1-epoch models; writes under ``--work``, never bench/results unless ``--out`` says so).

Run: .venv/bin/python bench/map_aware.py --model mtd:stfpm=bench/work/mtd-stfpm/last.pt \
         --model mtd:rd=... --model multiclass:stfpm=... --model multiclass:rd=...
         [--mixed-precision 0.005 --mp-calibration mse/train]   (one mixed-precision cell per width < 8)
Writes bench/results/map_aware.{json,md} (``--out`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

from qtool.artifacts import package_versions, versions_line, write_json
from qtool.commands.common import fail_cleanly
from qtool.recipe import (
    CalibDataConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    PtqConfig,
    Recipe,
    SearchConfig,
    SynthConfig,
    TrainConfig,
    build_recipe,
    load_recipe,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"mtd": ROOT / "recipes" / "mtd_stfpm.yaml", "multiclass": ROOT / "recipes" / "multiclass.yaml"}
CALIBRATORS = ("minmax", "percentile", "entropy", "mse", "map-aware")
STANDARD = tuple(c for c in CALIBRATORS if c != "map-aware")
SOURCES = ("train", "random-normal", "mix")
KEYS = ("image_auroc", "pixel_auroc", "aupro")


def calibration_seconds(stages: dict[str, float]) -> float:
    """Calibrate, plus the search set and search when the calibrator ran one (the proxy is measurement only)."""
    searched = "search" in stages
    return round(stages["calibrate"] + stages.get("search", 0.0) + (stages.get("search_set", 0.0) if searched
                                                                       else 0.0), 3)


def run_cell(model: Path, recipe: Recipe, overrides: list[str], work: Path) -> dict:
    """PTQ + evaluation of one cell, cached as ``work/cell.json``."""
    from qtool.ptq import run_ptq
    from qtool.runs import run_eval

    cached = work / "cell.json"
    if cached.exists():
        return json.loads(cached.read_text())
    r = build_recipe(recipe.model_dump(mode="json"), [*overrides, "ptq.search.proxy=true"])
    t0 = time.perf_counter()
    report = run_ptq(model, r, work / "ptq")
    ptq_seconds = time.perf_counter() - t0
    metrics = run_eval(Path(report["output"]), r)["metrics"]["mean"]
    row = {**{k: metrics.get(k) for k in KEYS}, "calib_seconds": calibration_seconds(report["stage_seconds"]),
           "ptq_seconds": round(ptq_seconds, 2), "proxy": report["proxy"]["quantized"],
           "proxy_fp32": report["proxy"]["fp32"], "search_set": report["search_set"]["what"],
           "calibration": {k: v for k, v in report["calibration"].items() if k != "files"}}
    if "search" in report:  # a searching calibrator's summary: its base rule and how far the budget let it go
        row["search"] = {k: report["search"].get(k) for k in ("objective", "base", "graphs_run", "max_graphs",
                                                              "tensors", "tensors_changed_from_base", "stopped_by")}
        check = report["search"].get("final_check")
        row["search"]["final_check"] = check and check["kept"]  # None: not run (no bias correction or no change)
    if "mixed_precision" in report:
        mp = report["mixed_precision"]
        lat = mp.get("latency") or {}
        row["mixed_precision"] = {"budget": mp["budget"], "criterion": mp["criterion"],
                                  "value": [mp["all_quantized"]["value"], mp["final"]["value"]],
                                  "float_layers": [f["layer"] for f in mp["fallback"]],
                                  "layers": mp["layers"], "layers_scanned": mp["layers_scanned"],
                                  "precision_kept": mp["precision_kept"],
                                  "all_quantized_ms": lat.get("all_quantized_ms"), "final_ms": lat.get("final_ms"),
                                  "fp32_ms": lat.get("fp32_ms"), "stand_in": lat.get("stand_in"),
                                  "float_macs_share": (mp.get("macs") or {}).get("float_share"),
                                  "seconds": report["stage_seconds"].get("mixed_precision")}
    write_json(cached, row)
    return row


def spearman(rows: list[dict], proxy_key: str, real_key: str) -> float | None:
    """Rank correlation between the proxy and the real test metric across cells (None if undefined)."""
    from qtool.proxy import rank_correlation

    pairs = [(r["proxy"][proxy_key], r[real_key]) for r in rows if r.get(real_key) is not None]
    rho = rank_correlation(pairs)  # None under 3 pairs or for constant inputs
    return None if rho is None else round(rho, 4)


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """``LABEL=CALIB:KEY=VALUE,KEY=VALUE`` -> (label, calibrator, recipe overrides).

    A variant is a calibrator with options, run as its own column (cell folders ``LABEL-SOURCE-Nbit``). A
    KEY is a ``ptq.calib_options`` key, or a recipe path starting ``ptq.`` (``ptq.weight_range=mse``); a VALUE
    may be a YAML list (``ptq.search.check_kinds=[crack,hole,stain]``).
    """
    label, _, rest = text.partition("=")
    calib, _, opts = rest.partition(":")
    pairs = [o for o in re.split(r",(?![^\[]*\])", opts) if o]  # a comma inside [..] is a YAML list's
    if (not label or not calib or label in CALIBRATORS or "/" in label
            or any("=" not in o or o.startswith("=") for o in pairs)):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected LABEL=CALIB:KEY=VALUE[,KEY=VALUE], "
                                         f"LABEL not one of {', '.join(CALIBRATORS)}")
    return label, calib, [o if o.startswith("ptq.") else f"ptq.calib_options.{o}" for o in pairs]


def cell_overrides(calib: str, source: str, bits: int, args: argparse.Namespace, *extra: str) -> list[str]:
    """Recipe overrides of one cell: calibrator, source, width, ``extra``, the command line's, the search budget.

    ``calib``: a calibrator name or a ``--variant`` label (its calibrator and options).
    """
    calib, options = next(((c, o) for label, c, o in args.variants if label == calib), (calib, []))
    out = [f"ptq.calib={calib}", f"ptq.calib_data.source={source}", f"ptq.activation_bits={bits}",
           f"ptq.weight_bits={bits}", *extra, *args.overrides]
    if calib == "map-aware":
        out.append(f"ptq.calib_options.time_budget_s={args.map_aware_budget}")
        if args.map_aware_graphs is not None:
            out.append(f"ptq.calib_options.max_graphs={args.map_aware_graphs}")
    return out + options  # last: a variant's own options win over the grid-wide ones (e.g. its max_graphs)


def check_variant(label: str, args: argparse.Namespace) -> None:
    """Build the calibrator of variant ``label`` from its recipe overrides; a bad name, option or value raises."""
    from calibrators import get_calibrator

    ptq = build_recipe(Recipe().model_dump(mode="json"), cell_overrides(label, "train", 8, args)).ptq
    get_calibrator(ptq.calib, num_bits=ptq.activation_bits, **ptq.calib_options)


def setup_folder(name: str) -> str:
    """The folder under ``--work`` of a setup named ``DATASET:MODEL``."""
    return name.replace(":", "-")


def bench_setup(name: str, model: Path, recipe: Recipe, args: argparse.Namespace) -> dict:
    """fp32 row, every cell, and the proxy's rank correlations for one setup."""
    from qtool.runs import run_eval, run_export

    work = Path(args.work) / setup_folder(name)
    work.mkdir(parents=True, exist_ok=True)
    if model.suffix == ".pt":  # export once, not once per cell
        onnx_path = work / "fp32.onnx"
        if not onnx_path.exists():
            run_export(model, onnx_path, recipe)
        model = onnx_path
    fp32 = run_eval(model, recipe)["metrics"]["mean"]
    cells, mixed = [], []
    for bits in args.bits:
        for calib in [*args.calibrators, *(label for label, _, _ in args.variants)]:
            for source in args.sources:
                key = f"{calib}-{source}-{bits}bit"
                row = {"calibrator": calib, "source": source, "bits": bits,
                       **run_cell(model, recipe, cell_overrides(calib, source, bits, args), work / key)}
                cells.append(row)
                print(name, key, {k: row[k] for k in (*KEYS, "calib_seconds")}, flush=True)
        if args.mixed_precision is not None and bits < 8:  # the fewest float layers that keep the proxy in budget
            calib, source = args.mp_calibration.split("/")
            key = f"{calib}-{source}-{bits}bit-mp{args.mixed_precision:g}"
            overrides = cell_overrides(calib, source, bits, args, f"ptq.mixed_precision={args.mixed_precision}",
                                       f"ptq.search.time_budget_s={args.mp_scan_budget}")
            row = {"calibrator": calib, "source": source, "bits": bits,
                   **run_cell(model, recipe, overrides, work / key)}
            mixed.append(row)
            print(name, key, {k: row[k] for k in (*KEYS, "calib_seconds")}, row["mixed_precision"], flush=True)
    return {"setup": name, "model": str(model), "fp32": {k: fp32.get(k) for k in KEYS}, "cells": cells,
            "mixed_precision": mixed,
            "proxy_rank_correlation": {"image_auroc": spearman(cells, "image_auroc", "image_auroc"),
                                       "pixel_auroc": spearman(cells, "pixel_auroc", "pixel_auroc")}}


def tiny_setups(work: Path) -> list[tuple[str, Path, Recipe]]:
    """Train 1-epoch STFPM and RD on tiny synthetic data (random-init teachers): a smoke run."""
    from qtool.runs import run_train

    data = DataConfig(format="synth", root=str(work / "data"), image_size=64, holdout_fraction=0.25,
                      synth=SynthConfig(categories=["grid"], n_train=8, n_test_good=3, n_test_defect=3, size=64))
    ptq = PtqConfig(calib_data=CalibDataConfig(num_samples=4, batch_size=4), search=SearchConfig(normals=4))
    out = []
    for name, options in (("stfpm", {}), ("rd", {"embed_channels": 64})):
        recipe = Recipe(name=f"tiny-{name}", data=data, ptq=ptq, eval=EvalConfig(threads=1),
                        model=ModelConfig(name=name, weights="none", levels=[1, 2], options=options),
                        train=TrainConfig(epochs=1, batch_size=4, optimizer="adam", lr=1e-3, threads=1))
        ckpt = work / f"train-{name}" / "model.pt"
        if not ckpt.exists():
            ckpt = Path(run_train(recipe, work / f"train-{name}", export=False)["models"][0]["checkpoint"])
        out.append((f"tiny:{name}", ckpt, recipe))
    return out


def given_setups(models: list[str]) -> list[tuple[str, Path, Recipe]]:
    """``DATASET:MODEL=PATH`` items -> (setup name, model path, the dataset's recipe)."""
    out = []
    for item in models:
        name, _, path = item.partition("=")
        dataset = name.split(":", 1)[0]
        if dataset not in RECIPES or not path:
            sys.exit(f"error: --model {item!r}: expected DATASET:MODEL=PATH with DATASET in {', '.join(RECIPES)}")
        out.append((name, Path(path), load_recipe(RECIPES[dataset])))
    return out


def write_markdown(path: Path, meta: dict, setups: list[dict]) -> None:
    """One table per setup (fp32 first), the proxy's rank correlations, command, machine and versions."""
    lines = ["# Map-aware calibration vs standard calibrators x calibration source", "", f"`{meta['command']}`", "",
             f"machine: {meta['machine']}, {meta['cpus']} CPUs; proxy: AUROC of synthetic anomalies made from "
             "normal calibration images (never the test split); calib s = calibrate + search stages", ""]
    for s in setups:
        lines += [f"## {s['setup']}", "", "| calibrator | source | bits | image AUROC | pixel AUROC | AUPRO | "
                  "calib s | proxy image | proxy pixel | proxy distortion | "
                  "search: base, graphs run, stopped by, final check |",
                  "|---" * 11 + "|",
                  "| fp32 | - | 32 | " + " | ".join(_fmt(s["fp32"][k]) for k in KEYS) + " | - | "
                  + " | ".join(_fmt(s["cells"][0]["proxy_fp32"][k]) if s["cells"] else "-"
                               for k in ("image_auroc", "pixel_auroc")) + " | 0 | - |"]
        for c in s["cells"]:
            search = c.get("search")
            lines.append(f"| {c['calibrator']} | {c['source']} | {c['bits']} | "
                         + " | ".join(_fmt(c[k]) for k in KEYS)
                         + f" | {c['calib_seconds']} | {_fmt(c['proxy']['image_auroc'])} | "
                         f"{_fmt(c['proxy']['pixel_auroc'])} | {_fmt(c['proxy'].get('loss', '-'))} | "
                         + (f"{search['base']}, {search['graphs_run']}, {search['stopped_by'] or 'done'}, "
                            f"{search.get('final_check') or '-'} |"
                            if search else "- |"))
        if s.get("mixed_precision"):
            lines += ["", "Mixed precision (layers kept float until the proxy drop is within the budget; latency: "
                      "ONNX Runtime CPU, search-set batch, all-quantized vs final model; *: timed on the 8-bit "
                      "stand-in, the same layers float and the rest at 8 bits, since widths under 8 have no integer "
                      "kernels here; float MACs: the float layers' share of the multiply-accumulates):", "",
                      "| calibration | bits | budget | float layers | image AUROC | pixel AUROC | AUPRO | "
                      "float MACs | fp32 ms | all-int ms | final ms | scan s |", "|---" * 12 + "|"]
            for c in s["mixed_precision"]:
                mp = c["mixed_precision"]
                star = "*" if mp.get("stand_in") else ""
                lines.append(f"| {c['calibrator']}/{c['source']} | {c['bits']} | {mp['budget']} | "
                             f"{len(mp['float_layers'])} of {mp['layers']} | " + " | ".join(_fmt(c[k]) for k in KEYS)
                             + f" | {_fmt(mp.get('float_macs_share'))} | {_fmt(mp.get('fp32_ms'))} | "
                             f"{_fmt(mp['all_quantized_ms'])}{star} | {_fmt(mp['final_ms'])}{star} | {mp['seconds']} |")
        lines += versus_standard_lines(s["cells"])
        corr = s["proxy_rank_correlation"]
        lines += ["", f"Spearman (proxy vs test, across cells): image {corr['image_auroc']}, "
                  f"pixel {corr['pixel_auroc']}", ""]
    lines += [versions_line(meta["versions"], skip_missing=True)]
    path.write_text("\n".join(lines) + "\n")


def versus_standard(cells: list[dict], default: str = "entropy") -> list[dict]:
    """Per (bits, source) with a map-aware cell: map-aware minus the best standard cell there, and minus ``default``.

    The best is picked per metric on the test split itself (hindsight), so it is a bar no rule that
    does not see the test labels can be sure to clear; ``default`` is the recipes' blind pick.
    """
    rows = []
    for ma in (c for c in cells if c["calibrator"] == "map-aware"):
        std = {c["calibrator"]: c for c in cells
               if c["calibrator"] in STANDARD and (c["bits"], c["source"]) == (ma["bits"], ma["source"])}
        if not std:
            continue
        best = {k: max(std, key=lambda n, k=k: std[n][k]) for k in KEYS}
        rows.append({"bits": ma["bits"], "source": ma["source"], "map_aware": {k: ma[k] for k in KEYS},
                     "best": {k: [best[k], std[best[k]][k]] for k in KEYS},
                     "minus_best": {k: ma[k] - std[best[k]][k] for k in KEYS},
                     "minus_default": {k: ma[k] - std[default][k] for k in KEYS} if default in std else None})
    return rows


def at_or_above(rows: list[dict]) -> tuple[int, int, int]:
    """Of :func:`versus_standard`'s rows: cell-metrics at or above the best, at or above the default, and in all."""
    at_best = sum(v >= 0 for r in rows for v in r["minus_best"].values())
    at_default = sum(v >= 0 for r in rows if r["minus_default"] for v in r["minus_default"].values())
    return at_best, at_default, len(rows) * len(KEYS)


def versus_standard_lines(cells: list[dict], default: str = "entropy") -> list[str]:
    """Markdown of :func:`versus_standard`, with how many cell-metrics map-aware is at or above each bar."""
    rows = versus_standard(cells, default)
    if not rows:
        return []
    def signed(d: dict | None) -> str:
        return " / ".join(f"{d[k]:+.4f}" for k in KEYS) if d else "-"

    lines = ["", f"Map-aware against the standard calibrators of the same source and width (image / pixel / AUPRO; "
             f"best = the highest on the test split, per metric, in hindsight; {default} = the recipes' default):", "",
             f"| bits | source | map-aware | best standard | map-aware - best | map-aware - {default} |",
             "|---" * 6 + "|"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['source']} | " + " / ".join(_fmt(r["map_aware"][k]) for k in KEYS) + " | "
                     + ", ".join(f"{r['best'][k][0]} {_fmt(r['best'][k][1])}" for k in KEYS)
                     + f" | {signed(r['minus_best'])} | {signed(r['minus_default'])} |")
    at_best, at_default, n = at_or_above(rows)
    lines += ["", f"At or above the best standard calibrator in {at_best} of {n} cell-metrics; "
              f"at or above {default} in {at_default} of {n}."]
    return lines


def _fmt(x: float | None) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every setup's cells, write the JSON and Markdown results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", dest="models", action="append", default=[], metavar="DATASET:MODEL=PATH")
    ap.add_argument("--tiny", action="store_true", help="smoke run on tiny synthetic data")
    ap.add_argument("--calibrators", type=lambda s: [c for c in s.split(",") if c], default=list(CALIBRATORS),
                    help="standard calibrator columns (comma-separated; empty: only the --variant columns)")
    ap.add_argument("--variant", dest="variants", action="append", default=[], type=parse_variant,
                    metavar="LABEL=CALIB:KEY=VALUE,...",
                    help="also run CALIB with these calib_options as a column named LABEL (repeatable)")
    ap.add_argument("--sources", type=lambda s: s.split(","), default=list(SOURCES))
    ap.add_argument("--bits", type=lambda s: [int(b) for b in s.split(",")], default=[8, 6, 4])
    ap.add_argument("--map-aware-budget", type=float, default=1800.0,
                    help="seconds of map-aware search per cell (each candidate graph runs on the search set)")
    ap.add_argument("--map-aware-graphs", type=int, default=None, metavar="N",
                    help="quantized graphs map-aware may run per cell: a budget that gives the same cells on any "
                         "machine (the seconds stay a cap)")
    ap.add_argument("--mixed-precision", type=float, default=None, metavar="BUDGET",
                    help="also, at each width under 8 bits, one mixed-precision cell with this budget "
                         "(of ptq.mixed_precision_criterion; --set it to change the criterion)")
    ap.add_argument("--mp-calibration", default="entropy/train", metavar="CALIB/SOURCE",
                    help="calibrator and source of the mixed-precision cells")
    ap.add_argument("--mp-scan-budget", type=float, default=600.0, help="seconds of sensitivity scan per cell")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="recipe override for every row: fp32, export and cells")
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "map_aware"))
    ap.add_argument("--out", default=None, help="results path without suffix (default bench/results/map_aware; "
                    "with --tiny, WORK/results)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    build_recipe(Recipe().model_dump(mode="json"), args.overrides)  # a malformed --set fails before any setup is built
    for label, _, _ in args.variants:  # so does a variant's unknown calibrator, option or value
        check_variant(label, args)
    setups = tiny_setups(work) if args.tiny else given_setups(args.models)
    if not setups:
        sys.exit("error: give --model DATASET:MODEL=PATH (repeatable) or --tiny")
    # --set reaches the fp32 row and the export too (one input size across the table); the cells re-apply it last
    setups = [(name, path, build_recipe(r.model_dump(mode="json"), args.overrides)) for name, path, r in setups]
    results = [bench_setup(name, path, recipe, args) for name, path, recipe in setups]
    out = Path(args.out) if args.out else (work / "results" if args.tiny else ROOT / "bench" / "results" / "map_aware")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python bench/map_aware.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "versions": package_versions()}
    write_json(out.with_suffix(".json"), {"meta": meta, "setups": results})
    write_markdown(out.with_suffix(".md"), meta, results)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    fail_cleanly(main)()  # a bad recipe, override, image or model: one line, non-zero exit, nothing written
