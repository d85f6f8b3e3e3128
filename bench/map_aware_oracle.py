"""Headroom diagnostic for map-aware at low widths: its search given real defects instead of synthetic ones.

An oracle, never a product path: each setup's test split is cut into halves A and B (stratified by
category x label, ``numpy.random.default_rng(seed)``); map-aware's search set is replaced by ``--normals``
normals and ``--defects`` defective images of half A with their real masks, and every column is judged on
half B only (images the search never saw) against the anchor column's graph (paired bootstrap,
``bench/paired_bootstrap.compare``). If even this search finds no range choice significantly better than
the anchor on B, a better proxy alone cannot make map-aware better there. Rule fixed before the first run:
``bench/results/map_aware_oracle_decision_rule.txt``.

Setups: ``--setup NAME=DIR``, DIR a setup folder of a ``bench/map_aware.py`` run (``fp32.onnx`` and the cell
folders). The oracle cells run with the anchor cell's saved recipe plus each ``--variant``'s options (same
syntax as ``bench/map_aware.py``), in ``--work``/NAME/LABEL (resumable); ``--show`` adds existing columns
of DIR (judged too, as context) and fp32 is shown on B.

Run: .venv/bin/python bench/map_aware_oracle.py --setup mtd-rd=bench/work/ma_s1_rd/mtd-rd --bits 4 \
         --variant or-dist=map-aware:objective=distortion,... --show maw-ev --work bench/work/oracle \
         --out bench/results/map_aware_oracle_mtd_rd
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from map_aware import cell_overrides, parse_variant
from paired_bootstrap import compare, run_models

import qtool.ptq_search
from qtool.artifacts import bench_meta, versions_line, write_json, write_results
from qtool.commands.common import fail_cleanly
from qtool.data import ImageTransform, Splits, load_splits
from qtool.modelio import open_model
from qtool.recipe import build_recipe, load_recipe
from qtool.search import SearchSet


def halves(test: list, seed: int) -> tuple[list, list]:
    """Half A and half B of the test samples: per (category, label) stratum, a permutation's first floor(n/2) -> A."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for key in sorted({(s.category, s.label) for s in test}):
        stratum = [s for s in test if (s.category, s.label) == key]
        order = rng.permutation(len(stratum))
        cut = len(stratum) // 2
        a += [stratum[i] for i in order[:cut]]
        b += [stratum[i] for i in order[cut:]]
    return a, b


def pick(half_a: list, normals: int, defects: int, seed: int) -> list:
    """``normals`` normal and ``defects`` defective samples of half A (seeded); a one-line exit if it holds fewer."""
    rng = np.random.default_rng(seed)
    picked = []
    for label, count in ((0, normals), (1, defects)):
        pool = [s for s in half_a if s.label == label]
        if len(pool) < count:
            raise SystemExit(f"error: half A holds {len(pool)} images of label {label}, fewer than {count}")
        picked += [pool[i] for i in sorted(rng.choice(len(pool), count, replace=False))]
    return picked


def oracle_set(half_a: list, transform: ImageTransform, normals: int, defects: int, seed: int) -> SearchSet:
    """``normals`` normal and ``defects`` defective images of half A with their real masks (a search set)."""
    picked = pick(half_a, normals, defects, seed)
    return SearchSet(images=np.stack([transform.image(s.path) for s in picked]).astype(np.float32),
                     masks=np.stack([transform.mask(s) for s in picked]).astype(np.float32),
                     labels=np.array([s.label for s in picked], np.int64),
                     description={"what": "ORACLE: test half A, real defects (diagnostic only)",
                                  "normals": normals, "anomalies": defects, "files": [str(s.path) for s in picked]})


def run_oracle_cell(fp32: Path, recipe, overrides: list[str], work: Path, args: argparse.Namespace) -> Path:
    """PTQ of one oracle cell with the search set swapped for half A's images; the model path (cached)."""
    from qtool.ptq import run_ptq

    out = work / "model.onnx"
    if out.exists():
        return out

    def build(splits: Splits, transform: ImageTransform, _cfg) -> SearchSet:
        return oracle_set(halves(splits.test, args.seed)[0], transform, args.normals, args.defects, args.seed)

    qtool.ptq_search.build_search_set = build
    report = run_ptq(fp32, build_recipe(recipe.model_dump(mode="json"), overrides), work / "ptq")
    write_json(work / "search.json", {k: report["search"].get(k) for k in ("objective", "base", "graphs_run",
                                                                            "tensors_changed_from_base")})
    Path(report["output"]).rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the oracle cells, judge every column on half B, write the results."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--anchor", default="mse-bc", help="the column every other is judged against")
    ap.add_argument("--variant", dest="variants", action="append", type=parse_variant, default=[])
    ap.add_argument("--show", type=lambda v: [x for x in v.split(",") if x], default=[], metavar="LABEL,...")
    ap.add_argument("--normals", type=int, default=32)
    ap.add_argument("--defects", type=int, default=32)
    ap.add_argument("--map-aware-graphs", type=int, default=40)
    ap.add_argument("--map-aware-budget", type=float, default=1800)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override of the oracle cells")
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--bins", type=int, default=1 << 14)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cells = []
    for item in args.setup:
        name, _, folder = item.partition("=")
        setup = Path(folder)
        anchor_dir = setup / f"{args.anchor}-train-{args.bits}bit" / "ptq"
        recipe = load_recipe(anchor_dir / "recipe.yaml")
        data_cfg = open_model(setup / "fp32.onnx").apply_transform(recipe.data)  # as run_ptq and run_eval
        half_a, half_b = halves(load_splits(data_cfg).test, args.seed)
        pick(half_a, args.normals, args.defects, args.seed)  # too few images: exit before any cell writes
        models = {args.anchor: anchor_dir / "model.onnx",
                  **{c: setup / f"{c}-train-{args.bits}bit" / "ptq" / "model.onnx" for c in args.show}}
        for label, _, _ in args.variants:
            overrides, work = cell_overrides(label, "train", args.bits, args), Path(args.work) / name / label
            models[label] = run_oracle_cell(setup / "fp32.onnx", recipe, overrides, work, args)
            print(name, label, "ready", flush=True)
        models["fp32"] = setup / "fp32.onnx"
        outputs, masks, labels, groups = run_models([str(p) for p in models.values()],
                                                    SimpleNamespace(test=half_b), ImageTransform(data_cfg))
        named = {n: [str(p)] for n, p in models.items()}
        rows = compare(outputs, named, masks, labels, args.rounds, args.bins, args.seed, groups, anchors=[args.anchor])
        cell = {"setup": name, "bits": args.bits, "n_half_b": len(half_b), "n_defective_b": int(labels.sum()),
                "models": {n: str(p) for n, p in models.items()}, "rows": rows,
                "search": {label: json.loads((Path(args.work) / name / label / "search.json").read_text())
                           for label, _, _ in args.variants}}
        cells.append(cell)
        print(name, [(r["b"], r["metric"], round(r["difference"], 4), [round(x, 4) for x in r["ci95"]])
                     for r in rows], flush=True)
    meta = bench_meta("bench/map_aware_oracle.py", argv, rounds=args.rounds, seed=args.seed,
                      normals=args.normals, defects=args.defects)
    write_results(Path(args.out), {"meta": meta, "cells": cells}, lambda path: write_markdown(path, meta, cells))


def write_markdown(path: Path, meta: dict, cells: list[dict]) -> None:
    """Per setup: every column against the anchor on half B (difference, 95 % interval, verdict)."""
    lines = ["# Oracle-search headroom at low width: columns against the anchor on test half B", "",
             f"`{meta['command']}`", "",
             "ORACLE (diagnostic, not a calibrator): the oracle columns' search set is real defective and normal "
             "images of test half A; all columns are judged on half B. above / below: the 95 % interval of "
             "column - anchor lies above / below 0.", "",
             "| setup | half B (defective) | column | metric | anchor | column | column - anchor | 95 % interval "
             "| verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        for r in c["rows"]:
            lo, hi = r["ci95"]
            verdict = "above" if lo > 0 else "below" if hi < 0 else "tie"
            lines.append(f"| {c['setup']} | {c['n_half_b']} ({c['n_defective_b']}) | {r['b']} | {r['metric']} | "
                         f"{r['a_value']:.4f} | {r['b_value']:.4f} | {r['difference']:+.4f} | [{lo:+.4f}, {hi:+.4f}] "
                         f"| {verdict} |")
    lines += ["", "Oracle searches (base rule, graphs run, tensors changed from the base):", ""]
    for c in cells:
        for label, s in c["search"].items():
            lines.append(f"- {c['setup']} {label}: {s}")
    lines += ["", f"machine: {meta['machine']}; {meta['rounds']} rounds, seed {meta['seed']}; oracle set "
              f"{meta['normals']} normals + {meta['defects']} defective images of half A", "",
              versions_line(meta["versions"])]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    fail_cleanly(main)()  # a bad recipe, override, image or model: one line, non-zero exit
