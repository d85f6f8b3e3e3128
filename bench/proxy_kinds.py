"""Which synthetic anomalies make a proxy that predicts the real test metrics? Re-scores a map-aware grid.

Every cell model of a ``bench/map_aware.py`` grid (and its fp32 model) is run once on one search
set: ``--normals`` images of the ptq normal pool (held-out, then training normals; never the test
split) plus, for each kind set, one synthetic anomaly per normal. Per kind set and setup: the
proxy (image / pixel AUROC of the anomalies vs the normals) of every cell, and how it tracks the
cell's test metric, already in the grid's results file:

- Spearman rank correlation across all cells, and within each width (where widths no longer
  dominate the ranking);
- regret of choosing by the proxy: per (width, source), the test metric of the best calibrator
  minus that of the calibrator with the highest proxy (0 = the proxy picks the test's best);
- map-aware's rule choice, simulated: per (width, source), the standard calibrator (minmax,
  percentile, entropy, mse) that ``calibrators.map_aware.by_separation`` chooses from its proxy
  scores, and its shortfall on each test metric against the test's best standard calibrator.

``--rescore PREVIOUS.json`` recomputes the tables from an earlier run's proxies without running models.

Run: .venv/bin/python bench/proxy_kinds.py --results bench/results/map_aware_mtd.json \
         --work bench/work/map_aware_mtd --kinds generic=patch,scratch,noise --kinds mtd-like=crack,hole,stain
Writes ``--out`` .json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from calibrators.objectives import by_separation
from qtool.artifacts import bench_meta, versions_line, write_results
from qtool.calib_data import normal_pool
from qtool.data import ImageTransform, load_splits
from qtool.errors import QtoolError
from qtool.evaluate import OnnxPredictor
from qtool.proxy import rank_correlation, separation
from qtool.recipe import load_recipe
from qtool.search import RUN_LEVEL, search_set_from_arrays

sys.path.insert(0, str(Path(__file__).resolve().parent))
from map_aware import KEYS, RECIPES, setup_folder  # noqa: E402

PROXY_KEYS = ("image_auroc", "pixel_auroc")


def parse_kinds(items: list[str]) -> dict[str, list[str]]:
    """``NAME=k1,k2`` items -> {name: kinds}."""
    out = {}
    for item in items:
        name, _, kinds = item.partition("=")
        if not name or not kinds:
            sys.exit(f"error: --kinds {item!r}: expected NAME=KIND,KIND")
        out[name] = kinds.split(",")
    return out


def search_images(dataset: str, normals: int, kind_sets: dict[str, list[str]], seed: int
                  ) -> tuple[np.ndarray, dict[str, tuple[slice, np.ndarray, np.ndarray]], int]:
    """The normals, then each kind set's anomalies; per kind set (anomalies' slice, masks, labels); normals' count.

    A kind set's masks and labels are those of its own search set (normals first), built as ptq builds it.
    """
    if dataset not in RECIPES:
        sys.exit(f"error: setup dataset {dataset!r} has no recipe here; expected one of {', '.join(RECIPES)}")
    recipe = load_recipe(RECIPES[dataset])
    pool = normal_pool(load_splits(recipe.data), normals)
    transform = ImageTransform(recipe.data)
    return kind_set_images(np.stack([transform.image(s.path) for s in pool]), kind_sets, seed)


def kind_set_images(base: np.ndarray, kind_sets: dict[str, list[str]], seed: int
                    ) -> tuple[np.ndarray, dict[str, tuple[slice, np.ndarray, np.ndarray]], int]:
    """``base`` normals, then each kind set's anomalies made from them (``seed``); the layout :func:`proxies` reads."""
    n = len(base)
    images, layout = [base], {}
    for name, kinds in kind_sets.items():
        search = search_set_from_arrays(base, kinds, seed)
        start = n * len(images)
        images.append(search.images[n:])
        layout[name] = (slice(start, start + n), search.masks, search.labels)
    return np.concatenate(images), layout, n


def proxies(model: Path, images: np.ndarray, layout: dict, n: int, threads: int = 2) -> dict[str, dict[str, float]]:
    """Per kind set: the proxy separation of ``model`` (run as the search runs it: Q/DQ in float)."""
    return separations(*OnnxPredictor(model, threads, RUN_LEVEL)(images), layout, n)


def separations(maps: np.ndarray, scores: np.ndarray, layout: dict, n: int) -> dict[str, dict[str, float]]:
    """Per kind set: the separation of the maps and scores of :func:`kind_set_images`' images."""
    out = {}
    for name, (part, masks, labels) in layout.items():
        m = np.concatenate([maps[:n], maps[part]])
        s = np.concatenate([scores[:n], scores[part]])
        out[name] = separation(m, s, masks, labels)
    return out


def tracking(cells: list[dict], kind: str) -> dict:
    """Spearman (all cells, per width) and the mean regret of picking by the proxy, per test metric."""
    out: dict = {}
    widths = sorted({c["bits"] for c in cells})
    for key in PROXY_KEYS:
        pairs = [(c["proxies"][kind][key], c[key]) for c in cells]
        per_width = {str(b): rank_correlation([(c["proxies"][kind][key], c[key]) for c in cells if c["bits"] == b])
                     for b in widths}
        regrets = []
        for b in widths:
            for source in sorted({c["source"] for c in cells}):
                group = [c for c in cells if c["bits"] == b and c["source"] == source]
                if group:
                    pick = max(group, key=lambda c: (c["proxies"][kind][key], -group.index(c)))
                    regrets.append(max(c[key] for c in group) - pick[key])
        out[key] = {"spearman_all": rank_correlation(pairs), "spearman_per_width": per_width,
                    "mean_regret": float(np.mean(regrets)) if regrets else None, "groups": len(regrets)}
    return out


STANDARD = ("minmax", "percentile", "entropy", "mse")


def rule_choice(cells: list[dict], kind: str) -> dict:
    """Per (width, source): the standard calibrator ``by_separation`` picks by proxy, and its test shortfall."""
    groups, short = [], {k: [] for k in KEYS}
    for b in sorted({c["bits"] for c in cells}, reverse=True):
        for source in dict.fromkeys(c["source"] for c in cells):
            group = {c["calibrator"]: c for c in cells if c["bits"] == b and c["source"] == source
                     and c["calibrator"] in STANDARD}
            if not group:
                continue
            pick = by_separation({k: {**c["proxies"][kind], "loss": 0.0} for k, c in group.items()})
            gap = {k: max(c[k] for c in group.values()) - group[pick][k] for k in KEYS}
            for k in KEYS:
                short[k].append(gap[k])
            groups.append({"bits": b, "source": source, "pick": pick, "shortfall": gap})
    return {"groups": groups, "mean_shortfall": {k: float(np.mean(v)) for k, v in short.items()},
            "picks_the_best": {k: sum(g <= 1e-12 for g in v) for k, v in short.items()}}


def write_markdown(path: Path, meta: dict, setups: list[dict], kind_sets: dict[str, list[str]]) -> None:
    """Per setup: the tracking table (one row per kind set and metric)."""
    def f(x):
        return "-" if x is None else f"{x:.3f}"
    lines = ["# Which synthetic anomalies make a proxy that predicts the test metrics", "",
             f"`{meta['command']}`", "", f"machine: {meta['machine']}; search set: {meta['search_set']}", ""]
    for s in setups:
        widths = list(next(iter(s["tracking"].values()))["image_auroc"]["spearman_per_width"])
        lines += [f"## {s['setup']} ({len(s['cells'])} cells)", "",
                  "| kinds | metric | fp32 proxy | Spearman, all cells | "
                  + " | ".join(f"Spearman, {w} bits" for w in widths) + " | mean regret of picking by proxy |",
                  "|---|---|---|---|" + "---|" * len(widths) + "---|"]
        for kind in kind_sets:
            for key in PROXY_KEYS:
                t = s["tracking"][kind][key]
                lines.append(f"| {kind} ({','.join(kind_sets[kind])}) | {key} | {f(s['fp32_proxies'][kind][key])} | "
                             f"{f(t['spearman_all'])} | " + " | ".join(f(t["spearman_per_width"][w]) for w in widths)
                             + f" | {f(t['mean_regret'])} over {t['groups']} |")
        lines += ["", "Map-aware's rule choice simulated (by_separation on the proxy, among minmax, percentile, "
                  "entropy, mse): shortfall against the test's best standard calibrator, per (width, source):", "",
                  "| kinds | " + " | ".join(f"mean shortfall, {k}" for k in KEYS) + " | "
                  + " | ".join(f"picks the best, {k}" for k in KEYS) + " | picks (8, 6, 4 bits) |",
                  "|---|" + "---|" * (2 * len(KEYS) + 1)]
        for kind in kind_sets:
            r = s["rule_choice"][kind]
            lines.append(f"| {kind} | " + " | ".join(f"{r['mean_shortfall'][k]:.4f}" for k in KEYS) + " | "
                         + " | ".join(f"{r['picks_the_best'][k]} of {len(r['groups'])}" for k in KEYS) + " | "
                         + " ".join(g["pick"] for g in r["groups"]) + " |")
        lines.append("")
    lines.append(versions_line(meta["versions"]))
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, score every cell on every kind set, write the results."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", help="a bench/map_aware.py results .json (required unless --rescore)")
    ap.add_argument("--work", help="its --work folder (cell models; required unless --rescore)")
    ap.add_argument("--kinds", action="append", required=True, help="NAME=KIND,KIND (repeatable)")
    ap.add_argument("--normals", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rescore", default=None, help="an earlier output .json: recompute its tables, run nothing")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    kind_sets = parse_kinds(args.kinds)
    if args.rescore:
        try:
            previous = json.loads(Path(args.rescore).read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"error: cannot read --rescore {args.rescore}: {e}")
        cells = [c for s in previous["setups"] for c in s["cells"]]
        missing = sorted({k for k in kind_sets for c in cells if k not in c["proxies"]})
        if missing:
            sys.exit(f"error: --rescore {args.rescore} has no proxies for kind set {missing[0]!r}")
        setups = [{**s, "tracking": {k: tracking(s["cells"], k) for k in kind_sets},
                   "rule_choice": {k: rule_choice(s["cells"], k) for k in kind_sets}} for s in previous["setups"]]
        meta = {**previous["meta"], "rescored_by": bench_meta("bench/proxy_kinds.py", argv)["command"]}
        write_results(Path(args.out), {"meta": meta, "setups": setups},
                      lambda p: write_markdown(p, meta, setups, kind_sets))
        return
    if not args.results or not args.work:
        sys.exit("error: give --results and --work (or --rescore)")
    try:
        grid = json.loads(Path(args.results).read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot read --results {args.results}: {e}")
    setups = []
    try:
        for setup in grid["setups"]:
            dataset = setup["setup"].split(":", 1)[0]
            images, layout, n = search_images(dataset, args.normals, kind_sets, args.seed)
            folder = Path(args.work) / setup_folder(setup["setup"])
            fp32 = proxies(folder / "fp32.onnx", images, layout, n)
            cells = []
            for c in setup["cells"]:
                model = folder / f"{c['calibrator']}-{c['source']}-{c['bits']}bit" / "ptq" / "model.onnx"
                if not model.exists():
                    sys.exit(f"error: no cell model {model}")
                cells.append({**{k: c[k] for k in ("calibrator", "source", "bits", *KEYS)},
                              "proxies": proxies(model, images, layout, n)})
                print(setup["setup"], model.parent.parent.name, cells[-1]["proxies"], flush=True)
            setups.append({"setup": setup["setup"], "normals": n, "fp32_proxies": fp32, "cells": cells,
                           "tracking": {k: tracking(cells, k) for k in kind_sets},
                           "rule_choice": {k: rule_choice(cells, k) for k in kind_sets}})
    except QtoolError as e:
        sys.exit(f"error: {e}")
    meta = bench_meta("bench/proxy_kinds.py", argv, kind_sets=kind_sets,
                      search_set=f"{args.normals} normals of the ptq normal pool (held-out, then training; never the "
                                 f"test split) + one synthetic anomaly each per kind set, seed {args.seed}")
    write_results(Path(args.out), {"meta": meta, "setups": setups},
                  lambda p: write_markdown(p, meta, setups, kind_sets))


if __name__ == "__main__":
    main()
