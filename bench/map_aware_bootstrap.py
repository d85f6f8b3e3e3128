"""Per cell, a paired bootstrap: is map-aware calibration significantly below the best standard one.

Reads the quantized models of a ``bench/map_aware.py`` run (``--work``; every cell must have run).
For each setup, width and calibration source it runs the map-aware model and the standard
calibrators' models on the test split. Then, with ``bench/paired_bootstrap.py``'s paired, stratified
bootstrap (map-aware is the anchor A), it compares map-aware with the standard calibrator that is
best on the full test split, per metric (image and pixel AUROC; AUPRO too with ``--aupro``). With
``--results`` (the run's results JSON) only the standard calibrators that are best on some metric
there are run: the same test split and files, so the same values, at a fraction of the time
(emulated sub-8-bit models run at 3 to 4x fp32's time on ONNX Runtime CPU).

Picking the best of four on the test split favours the standard side (winner's curse), so the
comparison is conservative for map-aware. Verdict per cell and metric: "below" when the 95 %
interval of best - map-aware lies above 0, "above" when it lies below 0, otherwise "tie".
Cell groups already compared are read back from ``--cache`` (resumable).

``--every``: the same judgement for every calibrator in turn (map-aware and each standard one, all
run): each against the best of the other four on the full test split, on the same bootstrap rounds.
It asks whether any fixed calibrator meets "at least as good as the best of the others in every
cell"; the summary counts each calibrator's verdicts.

``--columns`` (with ``--every``): the columns judged, each against the best of the others (default map-aware and
the standard calibrators; ``--variants`` are added), e.g. variant columns only (every calibrator bias-corrected).

``--pair BASE,VARIANT[,VARIANT...]``: one comparison per cell, metric and variant, each variant column (e.g. a
``bench/map_aware.py --variant mse-bc=mse:ptq.bias_correction=true``) against the base column only, no pick
of a best: "above" when the variant's interval lies wholly above the base's. The base may be ``fp32``
(``--pair fp32,entropy,mse``: each column against the float model, on the same rounds).

``--against LABEL,...`` (with ``--every``): each column is judged against the best of these columns other than
itself, not of all the others; e.g. QAT runs, each alone and pooled, against the calibrators only.

``--pool NAME=LABEL+LABEL[+...]``: the column NAME stands for several runs of one method in each cell (e.g. QAT
runs that differ only in their training order), usable in ``--columns`` and ``--pair``. Its value is the mean over
its runs, and each round redraws its runs with replacement as well as the test images (``paired_bootstrap.py``'s
two-level bootstrap), so a verdict on it covers the run-to-run spread, not one run's luck. With few runs that
spread is underestimated (by the factor (R - 1) / R in variance); the rows give every run's own value.

Run: .venv/bin/python bench/map_aware_bootstrap.py --work bench/work/map_aware_mtd \
         --setup mtd-stfpm --setup mtd-rd [--bits 8,6,4] [--sources train,random-normal,mix] [--every]
Writes PATH.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from map_aware import STANDARD, setup_folder
from paired_bootstrap import METRICS, WITH_AUPRO, compare, run_models

from qtool.artifacts import bench_meta, versions_line, write_json, write_results
from qtool.commands.common import fail_cleanly
from qtool.data import ImageTransform
from qtool.data.datasets import load_splits
from qtool.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
FP32 = "fp32"  # a column name: the setup's float model


def best_standard(results: dict, setup: str, source: str, bits: int) -> list[str]:
    """The standard calibrators best on image or pixel AUROC in a map_aware.py results JSON."""
    entry = next((s for s in results["setups"] if setup_folder(s["setup"]) == setup), None)
    if entry is None:
        sys.exit(f"error: setup {setup} is not in the results file")
    cells = [c for c in entry["cells"] if c["bits"] == bits and c["source"] == source and c["calibrator"] in STANDARD]
    if not cells:
        sys.exit(f"error: no standard calibrator cells for {setup} {source} {bits} bits in the results file")
    names = [max(cells, key=lambda c: c[m])["calibrator"] for m in ("image_auroc", "pixel_auroc")]
    return list(dict.fromkeys(names))


def cell_models(work: Path, setup: str, source: str, bits: int, names: list[str]) -> dict[str, str]:
    """Each of ``names`` (calibrators, variants; the anchor first): name -> quantized ONNX of that cell.

    A cell's model is its PTQ run's (``ptq/model.onnx``) or, for a ``bench/map_distillation.py`` column, its QAT
    run's (``qat/model.onnx``). The name ``fp32`` is the setup's float model (``fp32.onnx``, the export every cell
    quantized), e.g. ``--pair fp32,COLUMN`` judges a column against fp32.
    """
    models = {}
    for calib in names:
        if calib == FP32:
            path = work / setup / "fp32.onnx"
            if not path.is_file():
                sys.exit(f"error: {path} is missing; run bench/map_aware.py for that setup first")
            models[calib] = str(path)
            continue
        cell = work / setup / f"{calib}-{source}-{bits}bit"
        path = next((p for p in (cell / "ptq" / "model.onnx", cell / "qat" / "model.onnx") if p.is_file()),
                    cell / "ptq" / "model.onnx")
        if not path.is_file():
            sys.exit(f"error: {cell} has no ptq/model.onnx or qat/model.onnx; run bench/map_aware.py (a calibrator "
                     "column) or bench/map_distillation.py (a QAT column) for that cell first")
        models[calib] = str(path)
    return models


def parse_pool(text: str) -> tuple[str, list[str]]:
    """``NAME=LABEL+LABEL[+...]`` -> (NAME, [LABEL, ...]); a malformed spec is an argparse error (one line)."""
    name, _, labels = text.partition("=")
    runs = labels.split("+")
    if not name or not all(runs) or len(set(runs)) != len(runs) or name in runs:
        raise argparse.ArgumentTypeError(f"--pool takes NAME=LABEL+LABEL[+...] (distinct labels, NAME not among "
                                         f"them), not {text!r}")
    return name, runs


def pooled_models(work: Path, setup: str, source: str, bits: int, names: list[str],
                  pools: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each of ``names`` -> its cell's ONNX files: one for a column, one per run for a ``--pool`` name."""
    paths = cell_models(work, setup, source, bits, list(dict.fromkeys(
        label for n in names for label in pools.get(n, [n]))))
    return {n: [paths[label] for label in pools.get(n, [n])] for n in names}


def verdicts(rows: list[dict], anchor: str = "map-aware") -> list[dict]:
    """Per metric: ``anchor`` against the best of the other calibrators (on the full test split)."""
    out = []
    for metric in dict.fromkeys(r["metric"] for r in rows):  # image and pixel AUROC, and AUPRO when bootstrapped
        best = max((r for r in rows if r["metric"] == metric and r["a"] == anchor), key=lambda r: r["difference"])
        lo, hi = best["ci95"]
        verdict = "below" if lo > 0 else "above" if hi < 0 else "tie"
        out.append({"anchor": anchor, "metric": metric, "anchor_value": best["a_value"], "best": best["b"],
                    "best_value": best["b_value"], "best_minus_anchor": best["difference"], "ci95": best["ci95"],
                    "verdict": verdict, "anchor_runs": best["a_seeds"]})
    return out


def verdict_counts(cells: list[dict], anchor: str, bits: int | None = None) -> dict[str, int]:
    """How many of ``anchor``'s cell metrics (at ``bits``, or every width) are below, tied with, above the best."""
    mine = [x for c in cells if bits in (None, c["bits"]) for x in c["verdicts"] if x["anchor"] == anchor]
    return {v: sum(x["verdict"] == v for x in mine) for v in ("below", "tie", "above")}


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, compare every cell group, write the results."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="the --work folder of a bench/map_aware.py run")
    ap.add_argument("--setup", action="append", required=True, help="e.g. mtd-stfpm (a folder under --work)")
    ap.add_argument("--bits", type=lambda v: [int(b) for b in v.split(",")], default=[8, 6, 4])
    ap.add_argument("--sources", type=lambda v: v.split(","), default=["train", "random-normal", "mix"])
    ap.add_argument("--recipe", default=str(ROOT / "recipes/mtd_stfpm.yaml"), help="data section and split")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="recipe override, as given to bench/map_aware.py (e.g. data.image_size=128)")
    ap.add_argument("--results", default=None, help="the run's results JSON: run only the best standard ones")
    ap.add_argument("--every", action="store_true",
                    help="judge every calibrator against the best of the others (runs all; ignores --results)")
    ap.add_argument("--variants", type=lambda v: [x for x in v.split(",") if x], default=[], metavar="LABEL,...",
                    help="with --every: also judge these bench/map_aware.py --variant columns (and judge against them)")
    ap.add_argument("--columns", type=lambda v: [x for x in v.split(",") if x], default=None, metavar="LABEL,...",
                    help="with --every: the columns (default: map-aware and the standard calibrators; "
                         "--variants are added)")
    ap.add_argument("--pair", type=lambda v: v.split(","), default=None, metavar="BASE,VARIANT[,VARIANT...]",
                    help="judge each VARIANT column against the BASE column only (e.g. mse,mse-bc; fp32,mse,entropy)")
    ap.add_argument("--against", type=lambda v: [x for x in v.split(",") if x], default=None, metavar="LABEL,...",
                    help="with --every: judge each column against the best of these (default: all the others)")
    ap.add_argument("--pool", dest="pools", type=parse_pool, action="append", default=[],
                    metavar="NAME=LABEL+LABEL[+...]",
                    help="a column made of several runs (their mean; each round redraws the runs too)")
    ap.add_argument("--aupro", action="store_true", help="bootstrap AUPRO too (binned; see bench/paired_bootstrap.py)")
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--bins", type=int, default=1 << 14)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(ROOT / "bench/work/map_aware_bootstrap"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.variants and not args.every:
        sys.exit("error: --variants needs --every (a variant is judged against the best of all the others)")
    if args.pair is not None and (args.every or len(args.pair) < 2 or not all(args.pair)
                                  or len(set(args.pair)) != len(args.pair)):
        sys.exit("error: --pair takes BASE,VARIANT[,VARIANT...] (distinct column names) and excludes --every")
    if args.columns is not None and (not args.every or len(args.columns) < 2):
        sys.exit("error: --columns takes two or more column names and needs --every")
    columns = [*(args.columns or ["map-aware", *STANDARD]), *args.variants]
    if args.against is not None and (not args.every or len(args.against) < 2 or not set(args.against) <= set(columns)):
        sys.exit("error: --against takes two or more of the judged columns and needs --every")
    pools = dict(args.pools)
    if len(pools) != len(args.pools):
        sys.exit("error: --pool names a column twice")
    mode = "pair" if args.pair else "every" if args.every else "best"
    recipe = load_recipe(Path(args.recipe), args.overrides)
    splits, transform = load_splits(recipe.data), ImageTransform(recipe.data)
    results = None if mode != "best" or not args.results else json.loads(Path(args.results).read_text())
    anchors = {"every": columns, "best": ["map-aware"], "pair": (args.pair or [])[1:]}[mode]
    suffix = {"every": "-every" + (f"={'+'.join(args.columns)}" if args.columns else "")
                       + "".join(f"+{v}" for v in args.variants), "best": "",
              "pair": "-pair+" + "+".join(args.pair or [])}[mode] + ("+aupro" if args.aupro else "") \
        + "".join(f"+pool={n}={'+'.join(r)}" for n, r in pools.items())  # --against reuses the rows
    cells = []
    for setup in args.setup:
        for bits in args.bits:
            for source in args.sources:
                hit = Path(args.cache) / f"{setup}-{source}-{bits}bit{suffix}.json"
                if hit.is_file():
                    rows = json.loads(hit.read_text())["rows"]
                else:
                    names = {"every": anchors, "pair": anchors + (args.pair or [])[:1],
                             "best": ["map-aware", *(best_standard(results, setup, source, bits) if results
                                                     else STANDARD)]}[mode]
                    models = pooled_models(Path(args.work), setup, source, bits, names, pools)
                    files = list(dict.fromkeys(p for paths in models.values() for p in paths))
                    outputs, masks, labels, groups = run_models(files, splits, transform)
                    rows = compare(outputs, models, masks, labels, args.rounds,
                                   args.bins, args.seed, groups, anchors=anchors,
                                   metrics=WITH_AUPRO if args.aupro else METRICS)
                    write_json(hit, {"models": models, "rounds": args.rounds, "seed": args.seed, "rows": rows})
                judged = ([r for r in rows if r["b"] == args.pair[0]] if mode == "pair"  # base only
                          else [r for r in rows if r["b"] in args.against] if args.against else rows)
                cell = {"setup": setup, "bits": bits, "source": source, "rows": rows,
                        "verdicts": [v for a in anchors for v in verdicts(judged, a)]}
                cells.append(cell)
                print(setup, bits, source, [(v["anchor"], v["metric"], v["best"], round(v["best_minus_anchor"], 4),
                                             v["verdict"]) for v in cell["verdicts"]], flush=True)
    meta = bench_meta("bench/map_aware_bootstrap.py", argv, rounds=args.rounds, bins=args.bins, seed=args.seed,
                      n_test=len(splits.test), every=args.every, pair=args.pair,
                      columns=columns if args.every else None, pools=pools or None, against=args.against)
    counts = {a: verdict_counts(cells, a) for a in anchors}
    write_results(Path(args.out), {"meta": meta, "counts": counts, "cells": cells},
                  lambda path: write_markdown(path, meta, cells, counts, mode, anchors))


#: Table wording per mode: title, anchor column, best column, who "best" is among.
WORDING = {
    "best": ("Map-aware against the best standard calibrator", "map-aware", "best standard",
            "standard calibrator (minmax, percentile, entropy, mse; same source and width) with the highest value "
            "on the full test split, which favours it (with --results, only the best ones were run)"),
    "pair": ("A variant against its base column", "variant", "base",
             "base column of the pair ({names}; same source and width)"),
    "every": ("Each calibrator against the best of the others", "calibrator", "best of the others",
           "other calibrator (of {names}; same source and width) with the highest value on the full test split, "
           "which favours it"),
}


def write_markdown(path: Path, meta: dict, cells: list[dict], counts: dict[str, dict[str, int]], mode: str,
                   names: list[str]) -> None:
    """The verdict counts and every cell metric's comparison (``names``: the anchors, each judged in turn)."""
    per_anchor = mode != "best"  # counts per anchor and the anchor's name in each row
    title, anchor, best, who = WORDING[mode]
    if mode == "pair":
        names = meta["pair"]
    names = meta.get("against") or names
    who = who.format(names=", ".join(sorted(names, key=lambda n: n == "map-aware")))
    lines = [f"# {title}, per cell: paired bootstrap on test", "", f"`{meta['command']}`", "",
             f"machine: {meta['machine']}; {meta['n_test']} test images; {meta['rounds']} stratified rounds, "
             f"seed {meta['seed']}. Best = the {who}. below / above: the 95 % interval of best - {anchor} lies "
             "above / below 0; tie otherwise.", ""]
    for name, runs in (meta.get("pools") or {}).items():
        lines += [f"Pooled column {name}: the mean of the runs {', '.join(runs)}; each round redraws them with "
                  "replacement as well as the images (the rows give each run's own value).", ""]
    if per_anchor:
        lines += ["| calibrator | below | tie | above | cell metrics |", "|---|---|---|---|---|"]
        lines += [f"| {a} | {c['below']} | {c['tie']} | {c['above']} | {sum(c.values())} |" for a, c in counts.items()]
        widths = sorted({c["bits"] for c in cells}, reverse=True)
        lines += ["", "Per width, below / tie / above:", "",
                  "| calibrator | " + " | ".join(f"{b} bits" for b in widths) + " |", "|---|" + "---|" * len(widths)]
        for a in counts:
            per = [verdict_counts(cells, a, b) for b in widths]
            lines.append(f"| {a} | " + " | ".join(f"{c['below']} / {c['tie']} / {c['above']}" for c in per) + " |")
    else:
        c = counts["map-aware"]
        lines.append(f"Verdicts over {sum(c.values())} cell metrics: map-aware below {c['below']}, tie {c['tie']}, "
                     f"above {c['above']}.")
    lines += ["", f"| setup | bits | source | metric | {anchor} | {best} | best - {anchor} | 95 % interval | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        for v in c["verdicts"]:
            name = f"{v['anchor']} " if per_anchor else ""
            runs = v.get("anchor_runs") or []
            each = f" (runs {', '.join(f'{x:.4f}' for x in runs)})" if len(runs) > 1 else ""
            lines.append(f"| {c['setup']} | {c['bits']} | {c['source']} | {v['metric']} | "
                         f"{name}{v['anchor_value']:.4f}{each} | {v['best']} {v['best_value']:.4f} | "
                         f"{v['best_minus_anchor']:+.4f} | [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}] | "
                         f"{v['verdict']} |")
    lines += ["", versions_line(meta["versions"])]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    fail_cleanly(main)()  # a bad recipe, override, image or model: one line, non-zero exit, nothing written
