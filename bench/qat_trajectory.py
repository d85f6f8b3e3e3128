r"""Along one QAT run, does the check set see what the test split sees? Every state of the run, evaluated.

A run with ``qat.snapshots`` has the QDQ ONNX of its start and of every epoch (``qat/snapshots/epoch_NNN.onnx``):
each state a ``qat.keep`` rule could export. For each ``--cell NAME=CELL_DIR@METRIC`` (a ``bench/map_distillation.py``
cell folder; NAME ``CELL/RUN`` groups the runs of one cell; METRIC the test metric the cell is judged short on),
every state is scored on

- the test split: image AUROC, pixel AUROC, AUPRO (``qtool eval``, as the cell itself was);
- the run's check set (its 32 normals and the synthetic anomalies of the run's kinds and seed, rebuilt from the
  run report's file list) and each ``--kinds`` set made from the same normals: proxy image and pixel AUROC of the
  ONNX model (run as the search runs it: Q/DQ in float). Never the test split;
- the map order: the mean over the run's check normals of the Spearman correlation between the state's map pixels
  and the fp32 model's (``qat/fp32.onnx``), i.e. how well the order of the many normal values is kept.

Per run it gives the Spearman correlation over the states between each test metric and each predictor (the
check-set map loss, negated; the run's own proxies from its history; each kind set's ONNX proxies), the state
with the highest METRIC (the oracle, which only the test split can see) against the best ``--standard`` column's
single cell, and the state ``guarded`` keeps with each kind set's proxies as its guard (the loss stays the run's).
``:EARLIER_DIR`` after METRIC checks that the run retraced an earlier run of the same recipe and seed (the same
check-set losses) and that the kept state's test metrics equal that run's. Each state's scores are cached as
``CELL_DIR/trajectory/epoch_NNN.json``, so a second call runs nothing again.

Run (W=bench/work/pool_s1_stfpm/mtd-stfpm): .venv/bin/python bench/qat_trajectory.py \\
         --cell "s1 MTD STFPM 6 bits/seed 0=$W/mapdt-in8-train-6bit@image_auroc:$W/mapdg-in8-train-6bit" \\
         --kinds mtd-like=crack,hole,stain --out bench/results/qat_trajectory
Writes PATH.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from keep_choices import _run, same_curve
from map_aware import KEYS, SOURCES
from proxy_kinds import kind_set_images, parse_kinds, separations

from qtool.artifacts import bench_meta, versions_line, write_json, write_results
from qtool.commands.common import fail_cleanly
from qtool.data import ImageTransform
from qtool.evaluate import OnnxPredictor
from qtool.modelio import open_model
from qtool.proxy import SEPARATION_KEYS, rank_correlation
from qtool.qat.keep import KEEP_RULES, replay
from qtool.recipe import load_recipe
from qtool.runs import run_eval
from qtool.search import RUN_LEVEL

STANDARD = "minmax-in8,percentile-in8,entropy-in8,mse-bc-in8,mawc-in8"
RUN_KINDS = "run"  # the kind set of the run's own check set
_CELL = re.compile(r"^(?P<name>[^=]+)=(?P<dir>[^@]+)@(?P<metric>[a-z_]+)(?::(?P<earlier>.+))?$")
_FOLDER = re.compile(rf"-(?P<source>{'|'.join(SOURCES)})-(?P<bits>\d+)bit$")


def parse_cell(text: str) -> dict:
    """``CELL/RUN=CELL_DIR@METRIC[:EARLIER_DIR]`` -> its parts (``argparse`` error on a bad form or metric)."""
    m = _CELL.match(text)
    if not m or m["metric"] not in KEYS or "/" not in m["name"]:
        raise argparse.ArgumentTypeError(f"--cell {text!r}: expected CELL/RUN=CELL_DIR@METRIC[:EARLIER_DIR], "
                                         f"METRIC one of {', '.join(KEYS)}")
    folder = Path(m["dir"])
    if not _FOLDER.search(folder.name):
        raise argparse.ArgumentTypeError(f"--cell {text!r}: {folder.name} is not a LABEL-SOURCE-Nbit cell folder")
    cell, _, run = m["name"].partition("/")
    return {"cell": cell, "run": run, "dir": folder, "metric": m["metric"],
            "earlier": Path(m["earlier"]) if m["earlier"] else None}


def _epoch(snapshot: Path) -> int:
    return int(snapshot.stem.split("_")[1])


def score_state(snapshot: Path, recipe, check: tuple, reference: np.ndarray, threads: int) -> dict:
    """Test metrics, per-kind-set check proxies and map order of one snapshot (cached beside the run as JSON).

    ``check``: :func:`check_images`' (images, layout, normals); ``reference``: the fp32 model's maps of the normals.
    One pass over the check images gives the proxies and the map order.
    """
    cached = snapshot.parents[2] / "trajectory" / f"{snapshot.stem}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    t0 = time.perf_counter()
    metrics = run_eval(snapshot, recipe)["metrics"]["mean"]
    t1 = time.perf_counter()
    images, layout, n = check
    maps, scores = OnnxPredictor(snapshot, threads, RUN_LEVEL)(images)
    row = {"epoch": _epoch(snapshot), **{k: metrics[k] for k in KEYS},
           "proxies": separations(maps, scores, layout, n), "map_order": map_order(maps[:n], reference),
           "eval_seconds": round(t1 - t0, 2), "proxy_seconds": round(time.perf_counter() - t1, 2)}
    write_json(cached, row)
    return row


def map_order(maps: np.ndarray, reference: np.ndarray) -> float:
    """Mean over the images of the Spearman correlation between ``maps``' pixels and the ``reference`` maps'.

    How well the order of the many (normal, low) map values is kept: what pixel AUROC ranks, and what a loss on
    squared errors, dominated by the largest values, may not keep.
    """
    from scipy.stats import spearmanr

    return float(np.mean([spearmanr(m.ravel(), r.ravel()).statistic for m, r in zip(maps, reference, strict=True)]))


def check_normals(model: Path, report: dict, recipe) -> np.ndarray:
    """A QAT run's check normals (its report's file list), preprocessed as ``model`` (ONNX) expects."""
    transform = ImageTransform(open_model(model).apply_transform(recipe.data))
    return np.stack([transform.image(Path(f)) for f in report["objective"]["holdout"]["files"]])


def check_images(cell_dir: Path, report: dict, recipe, kind_sets: dict[str, list[str]]) -> tuple:
    """The run's check normals, with the run's own kinds' anomalies first, then each of ``kind_sets``'."""
    holdout = report["objective"]["holdout"]
    normals = check_normals(cell_dir / "qat" / "snapshots" / "epoch_000.onnx", report, recipe)
    return kind_set_images(normals, {RUN_KINDS: holdout["kinds"], **kind_sets}, holdout["seed"])


def standard_best(cell_dir: Path, columns: list[str], metric: str) -> dict:
    """The best of the standard columns' single cells (same setup, source, width) on ``metric``."""
    m = _FOLDER.search(cell_dir.name)
    rows = {}
    for col in columns:
        path = cell_dir.parent / f"{col}-{m['source']}-{m['bits']}bit" / "cell.json"
        if not path.is_file():
            sys.exit(f"error: no standard cell {path}")
        rows[col] = json.loads(path.read_text())[metric]
    best = max(rows, key=rows.get)
    return {"column": best, "value": rows[best], "all": rows}


def predictors(history: list[dict], states: list[dict], kind_sets: list[str]) -> dict[str, list[float]]:
    """Per predictor, its value at each state (higher: predicted better)."""
    out = {"check loss (negated)": [-h["holdout_loss"] for h in history],
           "map order vs fp32 (check normals)": [s["map_order"] for s in states],
           "run proxy image (torch)": [h["proxy_image_auroc"] for h in history],
           "run proxy pixel (torch)": [h["proxy_pixel_auroc"] for h in history]}
    for kind in kind_sets:
        for key, short in (("image_auroc", "image"), ("pixel_auroc", "pixel")):
            out[f"{kind} proxy {short} (ONNX)"] = [s["proxies"][kind][key] for s in states]
    return out


def guarded_with(history: list[dict], states: list[dict], kind: str) -> int:
    """The epoch ``guarded`` keeps when its guard is ``kind``'s ONNX proxies (the loss is the run's)."""
    rows = [{**h, **{f"proxy_{k}": s["proxies"][kind][k] for k in SEPARATION_KEYS}}
            for h, s in zip(history, states, strict=True)]
    return replay(KEEP_RULES.get("guarded"), rows)["epoch"]


def analyse(spec: dict, columns: list[str], kind_sets: dict[str, list[str]], threads: int) -> dict:
    """Score every state of one run and compare predictors, picks and the oracle."""
    cell_dir, metric = spec["dir"], spec["metric"]
    cell, report = _run(cell_dir)
    history = report["history"]
    snapshots = sorted((cell_dir / "qat" / "snapshots").glob("epoch_*.onnx"))
    if [_epoch(p) for p in snapshots] != [h["epoch"] for h in history]:
        sys.exit(f"error: {cell_dir}: snapshots {[p.name for p in snapshots]} do not match the history's epochs "
                 "(a run without qat.snapshots?)")
    recipe = load_recipe(cell_dir / "qat" / "recipe.yaml", [f"eval.threads={threads}"])
    check = check_images(cell_dir, report, recipe, kind_sets)
    reference = OnnxPredictor(cell_dir / "qat" / "fp32.onnx", threads, RUN_LEVEL)(check[0][: check[2]])[0]
    states = [score_state(p, recipe, check, reference, threads) for p in snapshots]
    kinds = [RUN_KINDS, *kind_sets]
    preds = predictors(history, states, kinds)
    spearman = {name: {k: rank_correlation(list(zip(values, [s[k] for s in states], strict=True))) for k in KEYS}
                for name, values in preds.items()}
    kept = report["kept_epoch"]
    oracle = max(states, key=lambda s: (s[metric], -s["epoch"]))
    torch_vs_onnx = max(max(abs(h[f"proxy_{k}"] - s["proxies"][RUN_KINDS][k]) for k in SEPARATION_KEYS)
                        for h, s in zip(history, states, strict=True))
    out = {"cell": spec["cell"], "run": spec["run"], "dir": str(cell_dir), "metric": metric, "kept_epoch": kept,
           "history": history, "states": states, "spearman": spearman, "standard": standard_best(cell_dir, columns,
                                                                                                  metric),
           "oracle": {"epoch": oracle["epoch"], "value": oracle[metric]},
           "picks": {"guarded (run)": kept, "best": replay(KEEP_RULES.get("best"), history)["epoch"],
                     **{f"guarded ({k}, ONNX)": guarded_with(history, states, k) for k in kinds}},
           "kept_equals_cell": all(abs(states[kept][k] - cell[k]) < 1e-6 for k in KEYS),
           "torch_vs_onnx_run_proxy_max_diff": torch_vs_onnx}
    if spec["earlier"] is not None:
        e_cell, e_report = _run(spec["earlier"])
        out["earlier"] = {"dir": str(spec["earlier"]), "same_curve": same_curve(history, e_report["history"]),
                          "same_kept_epoch": e_report["kept_epoch"] == kept,
                          "kept_metrics_equal": all(abs(states[kept][k] - e_cell[k]) < 1e-6 for k in KEYS)}
    return out


def decisions(runs: list[dict], kind_sets: list[str]) -> dict:
    """The rule's (D1) reachability per cell, (D2) each kind set's guard against the run's, (D3) median Spearman."""
    cells = list(dict.fromkeys(r["cell"] for r in runs))
    reach = {c: all(r["oracle"]["value"] >= r["standard"]["value"] for r in runs if r["cell"] == c) for c in cells}
    guards = {}
    for kind in kind_sets:
        diffs = []
        for r in runs:
            value = {s["epoch"]: s[r["metric"]] for s in r["states"]}
            diffs.append(value[r["picks"][f"guarded ({kind}, ONNX)"]] - value[r["picks"]["guarded (run)"]])
        guards[kind] = {"better": sum(d > 1e-12 for d in diffs), "worse": sum(d < -1e-12 for d in diffs),
                        "runs": len(diffs), "diffs": diffs}
    medians = {}
    for name in runs[0]["spearman"]:
        per_cell = []
        for c in cells:
            rhos = [r["spearman"][name][r["metric"]] for r in runs if r["cell"] == c]
            rhos = [x for x in rhos if x is not None]
            if rhos:
                per_cell.append(statistics.median(rhos))
        medians[name] = statistics.median(per_cell) if per_cell else None
    return {"reachable": reach, "guards": guards, "median_spearman_on_metric": medians}


def write_markdown(path: Path, meta: dict, runs: list[dict], dec: dict) -> None:
    """Per run its states table and Spearman table; then the decisions."""
    def f(x, d=3):
        return "-" if x is None else f"{x:.{d}f}"

    kinds = list(runs[0]["states"][0]["proxies"])
    lines = ["# Along a QAT run: every state's test metrics beside its check-set predictors", "",
             f"`{meta['command']}`", "", f"machine: {meta['machine']}. Kind sets: "
             + "; ".join(f"{k} ({', '.join(v)})" for k, v in meta["kind_sets"].items())
             + f"; `{RUN_KINDS}`: the run's own check set. The check set is the run's 32 check normals and the "
             "synthetic anomalies made from them; never the test split.", ""]
    for r in runs:
        st = r["standard"]
        lines += [f"## {r['cell']}, {r['run']} (judged on {r['metric']})", "", f"`{r['dir']}`; kept epoch "
                  f"{r['kept_epoch']}; best standard column {st['column']} {st['value']:.4f}; oracle epoch "
                  f"{r['oracle']['epoch']} {r['oracle']['value']:.4f}; kept state's test metrics equal the cell's: "
                  f"{'yes' if r['kept_equals_cell'] else 'NO'}; run proxies torch vs ONNX, largest difference "
                  f"{r['torch_vs_onnx_run_proxy_max_diff']:.4f}"
                  + (f"; retraces {r['earlier']['dir']}: curve {'yes' if r['earlier']['same_curve'] else 'NO'}, "
                     f"kept epoch {'yes' if r['earlier']['same_kept_epoch'] else 'NO'}, kept metrics "
                     f"{'yes' if r['earlier']['kept_metrics_equal'] else 'NO'}" if "earlier" in r else "") + ".", "",
                  "| epoch | check loss | map order | run proxies (torch) | "
                  + " | ".join(f"{k} proxies (ONNX)" for k in kinds)
                  + " | test image | test pixel | test AUPRO | eval s |", "|---|---|---|---|" + "---|" * len(kinds)
                  + "---|---|---|---|"]
        for h, s in zip(r["history"], r["states"], strict=True):
            mark = ("*" if s["epoch"] == r["kept_epoch"] else "") + ("o" if s["epoch"] == r["oracle"]["epoch"] else "")
            lines.append(f"| {s['epoch']}{mark} | {h['holdout_loss']:.4f} | {s['map_order']:.4f} | "
                         f"{h['proxy_image_auroc']:.3f} / "
                         f"{h['proxy_pixel_auroc']:.3f} | "
                         + " | ".join(f"{s['proxies'][k]['image_auroc']:.3f} / {s['proxies'][k]['pixel_auroc']:.3f}"
                                      for k in kinds)
                         + f" | {s['image_auroc']:.4f} | {s['pixel_auroc']:.4f} | {s['aupro']:.4f} | "
                           f"{s['eval_seconds'] + s['proxy_seconds']:.0f} |")
        lines += ["", "(* kept, o oracle on the judged metric.) Picks: "
                  + ", ".join(f"{k} epoch {v}" for k, v in r["picks"].items()) + ".", "",
                  "| predictor | " + " | ".join(f"Spearman with test {k}" for k in KEYS) + " |",
                  "|---|" + "---|" * len(KEYS)]
        for name, rho in r["spearman"].items():
            lines.append(f"| {name} | " + " | ".join(f(rho[k]) for k in KEYS) + " |")
        lines.append("")
    lines += ["## Decisions (bench/results/qat_trajectory_rule.txt)", "",
              "(D1) reachable by epoch choice (some state >= the best standard column's cell, in every run of the "
              "cell): " + "; ".join(f"{c}: {'yes' if v else 'no'}" for c, v in dec["reachable"].items()) + ".", ""]
    for kind, g in dec["guards"].items():
        lines.append(f"(D2) guarded with the {kind} proxies vs the run's guard, on the judged metric: better in "
                     f"{g['better']}, worse in {g['worse']} of {g['runs']} runs (differences "
                     + ", ".join(f"{d:+.4f}" for d in g["diffs"]) + ").")
    lines += ["", "(D3) median (over cells of the median over a cell's runs) Spearman with the judged metric: "
              + "; ".join(f"{k} {f(v)}" for k, v in dec["median_spearman_on_metric"].items()) + ".", "",
              versions_line(meta["versions"])]
    path.write_text("\n".join(lines) + "\n")


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    """Parse arguments, score every run's states, write the results."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", type=parse_cell, action="append", required=True,
                    help="CELL/RUN=CELL_DIR@METRIC[:EARLIER_DIR] (a map_distillation cell run with qat.snapshots)")
    ap.add_argument("--kinds", action="append", default=[], help="NAME=KIND,KIND: another check set's kinds")
    ap.add_argument("--standard", default=STANDARD, help="comma-separated standard columns (same setup folder)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    kind_sets = parse_kinds(args.kinds)
    if RUN_KINDS in kind_sets:
        ap.error(f"--kinds: the name {RUN_KINDS!r} is the run's own check set")
    runs = []
    for spec in args.cell:
        runs.append(analyse(spec, args.standard.split(","), kind_sets, args.threads))
        print(spec["cell"], spec["run"], runs[-1]["picks"], runs[-1]["oracle"], flush=True)
    dec = decisions(runs, list(kind_sets))
    meta = bench_meta("bench/qat_trajectory.py", argv, kind_sets=kind_sets, standard=args.standard)
    write_results(Path(args.out), {"meta": meta, "runs": runs, "decisions": dec},
                  lambda path: write_markdown(path, meta, runs, dec))


if __name__ == "__main__":
    main()
