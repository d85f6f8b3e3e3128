"""Which base-rule choice would serve map-aware best? Replayed from a grid's own reports, no model run.

Map-aware's first stage scores every whole rule on the search set: image / pixel AUROC of synthetic
anomalies vs normals, and map distortion against fp32. Its calibration-source rules minmax,
entropy, mse and percentile-99.99 give exactly the ranges of the standalone calibrators, whose
cells the same grid ran on the test split with the same proxy on the same search set (read from
those cells when their proxy has the distortion, else from the map-aware cell's
``search.rule_losses``; so a grid of the standard cells alone can be replayed). So for
each (width, source) of a ``bench/map_aware.py`` run, and each candidate choice rule, this replays
which of those four the rule would choose from the proxy scores, and looks up that calibrator's
test metrics: regret = the test's best standard calibrator (chosen with hindsight) minus the
chosen one, per metric. Only the base choice is replayed, not the tensor descent that follows it.

Choice rules: ``separation`` and ``distortion`` (the map-aware objectives' own whole-rule choice,
:data:`calibrators.map_aware.OBJECTIVES`), ``fixed-RULE`` for each standard rule (no search;
``fixed-entropy`` is the recipes' default, ``fixed-mse`` the base of map-aware's ``anchored``
objective with ``initial=mse``), and ``distortion-within-D`` (the lowest distortion among rules
within D of the best proxy pixel AUROC and within the image tolerance of the best proxy image AUROC).

With ``--kinds crack,hole,stain`` the proxy is not read but measured again: each standard cell's
quantized graph (and the grid's fp32 graph, the reference of the distortion) runs on a search set of
the same normal images and seed as the grid's, with synthetic anomalies of the given kinds instead
(Q/DQ simulated in float, as the search runs them). This asks whether another proxy would have chosen
better, with the test metrics unchanged.

Run: .venv/bin/python bench/map_aware_rule_choice.py --work bench/work/map_aware_k3 --setup mtd-rd
(or ``--grid WORK/SETUP``, repeatable, for setups of several runs). With more than one setup the tables
end with the choice rules' regret pooled over every cell of every setup. Writes ``--out`` .json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from calibrators.objectives import OBJECTIVES, image_eligible
from calibrators.percentile import PercentileCalibrator
from qtool.artifacts import bench_meta, versions_line, write_results
from qtool.errors import QtoolError

if TYPE_CHECKING:
    from qtool.proxy import MapDistortion
    from qtool.search import SearchSet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from map_aware import KEYS  # noqa: E402

#: map-aware rule label -> the standalone calibrator whose cell holds its exact ranges (percentile at its default)
STANDARD = {"minmax": "minmax", "entropy": "entropy", "mse": "mse",
            f"percentile-{PercentileCalibrator.OPTIONS['percentile']:g}": "percentile"}
Scores = dict[str, dict[str, float]]


def within(tolerance: float) -> Callable[[Scores], str]:
    """The lowest distortion among image-eligible rules within ``tolerance`` of their best pixel AUROC."""
    def choose(scores: Scores) -> str:
        eligible = image_eligible(scores)
        best_pixel = max(scores[k]["pixel_auroc"] for k in eligible)
        return min((k for k in eligible if scores[k]["pixel_auroc"] >= best_pixel - tolerance),
                   key=lambda k: scores[k]["loss"])
    return choose


CHOICES: dict[str, Callable[[Scores], str]] = {
    "separation": OBJECTIVES.get("separation").choose,
    "distortion": OBJECTIVES.get("distortion").choose,
    **{f"fixed-{rule}": (lambda scores, rule=rule: rule) for rule in STANDARD},
    **{f"distortion-within-{d:g}": within(d) for d in (0.001, 0.002, 0.005, 0.01)},
}


def read_json(path: Path) -> dict:
    """A grid file, or a one-line exit naming it (missing, unreadable, not JSON)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"error: {path}: {e.__class__.__name__}: {e}".splitlines()[0])


def proxy_scores(setup: Path, cell: str, cells: dict[str, dict]) -> tuple[dict[str, dict[str, float]], str]:
    """Each standard rule's search-set scores in ``cell``, and where they came from.

    The standard cells' own proxy when it carries the map distortion (``loss``; grids run since the
    proxy records it), else the map-aware cell's whole-rule scores (``search.rule_losses``).
    """
    if all("loss" in (cells[r].get("proxy") or {}) for r in STANDARD):
        return {r: cells[r]["proxy"] for r in STANDARD}, "standard cells' proxy"
    report = setup / f"map-aware-{cell}" / "ptq" / "report.json"
    if not report.exists():
        sys.exit(f"error: {setup / (STANDARD['minmax'] + '-' + cell)}: its proxy has no distortion and "
                 f"{report} is missing: re-run the cell with the current bench/map_aware.py")
    losses = (read_json(report).get("search") or {}).get("rule_losses", {})
    if not all(r in losses and "pixel_auroc" in losses[r] for r in STANDARD):
        sys.exit(f"error: {report}: search.rule_losses lacks a standard rule's separation")
    return {r: losses[r] for r in STANDARD}, "map-aware's rule_losses"


class Rescorer:
    """Each standard cell's proxy measured again on a search set of other anomaly kinds (same normals, same seed).

    The grid's ``ptq/report.json`` names the fp32 graph and the search set's normal files and seed;
    the cell's ``ptq/recipe.yaml`` gives the preprocessing. fp32 references are cached per search set.
    """

    def __init__(self, kinds: list[str], threads: int = 2) -> None:
        self.kinds, self.threads, self.references = kinds, threads, {}

    def search_set(self, ptq: Path) -> tuple[SearchSet, MapDistortion]:
        """The re-made search set of a cell's ``ptq`` folder and the distortion against its fp32 graph (cached)."""
        from qtool.data import ImageTransform
        from qtool.proxy import MapDistortion
        from qtool.recipe import load_recipe
        from qtool.search import search_set_from_arrays

        report = read_json(ptq / "report.json")
        what = report.get("search_set") or {}
        if not what.get("files") or "seed" not in what or not report.get("model"):
            sys.exit(f"error: {ptq / 'report.json'}: no fp32 model, or no search_set files and seed, to re-score from")
        key = (report["model"], tuple(what["files"]), what["seed"])
        if key not in self.references:
            transform = ImageTransform(load_recipe(ptq / "recipe.yaml").data)
            normals = np.stack([transform.image(Path(f)) for f in what["files"]])
            search = search_set_from_arrays(normals, self.kinds, what["seed"], what["files"])
            ref = self.outputs(Path(report["model"]), search)
            self.references[key] = (search, MapDistortion(*ref, search.masks, search.labels))
        return self.references[key]

    def outputs(self, model: Path, search: SearchSet) -> tuple[np.ndarray, np.ndarray]:
        """``model``'s maps and scores on ``search``'s images (Q/DQ simulated in float); exits if it is missing."""
        from qtool.evaluate import OnnxPredictor
        from qtool.search import RUN_LEVEL

        if not model.is_file():
            sys.exit(f"error: {model} is missing: the grid's graphs are needed to re-score its proxy")
        return OnnxPredictor(model, self.threads, RUN_LEVEL)(search.images)

    def __call__(self, setup: Path, cell: str) -> tuple[dict[str, dict[str, float]], str]:
        """Each standard rule's search-set scores in ``cell``, measured on the re-made search set."""
        from qtool.proxy import separation

        scores = {}
        for rule, calib in STANDARD.items():
            ptq = setup / f"{calib}-{cell}" / "ptq"
            search, distortion = self.search_set(ptq)
            outputs = self.outputs(ptq / "model.onnx", search)
            scores[rule] = {**separation(*outputs, search.masks, search.labels), **distortion(*outputs)}
        return scores, f"re-scored on {len(search.images) // 2} normals + anomalies of kinds {', '.join(self.kinds)}"


def replay(setup: Path, rescore: Rescorer | None = None) -> list[dict]:
    """One row per (width, source) cell of ``setup``: proxy scores, each choice's pick and its test metrics.

    ``rescore``: measure the proxy again (:class:`Rescorer`) instead of reading the grid's.
    """
    rows = []
    for first in sorted(setup.glob(f"{STANDARD['minmax']}-*bit/cell.json")):
        cell = first.parts[-2].removeprefix(f"{STANDARD['minmax']}-")
        cells = {}
        for rule, calib in STANDARD.items():
            path = setup / f"{calib}-{cell}" / "cell.json"
            if not path.exists():
                sys.exit(f"error: {path} is missing: run the grid's standard cells first")
            cells[rule] = read_json(path)
            if not all(k in cells[rule] for k in KEYS):
                sys.exit(f"error: {path}: no {', '.join(KEYS)}")
        scores, source = rescore(setup, cell) if rescore else proxy_scores(setup, cell, cells)
        test = {rule: {k: c[k] for k in KEYS} for rule, c in cells.items()}
        best = {k: max(t[k] for t in test.values()) for k in KEYS}
        picks = {name: choose(scores) for name, choose in CHOICES.items()}
        rows.append({"cell": cell, "proxy_from": source, "proxy": scores, "test": test, "best": best, "picks": picks,
                     "regret": {name: {k: best[k] - test[p][k] for k in KEYS} for name, p in picks.items()}})
    if not rows:
        sys.exit(f"error: no standard cells under {setup}")
    return rows


def regret_rows(rows: list[dict]) -> list[str]:
    """Per choice rule: mean regret per metric over ``rows`` and how often it picks the hindsight best."""
    out = ["| choice rule | mean regret, image AUROC | pixel AUROC | AUPRO | picks the best (image / pixel / AUPRO) |",
           "|---|---|---|---|---|"]
    for choice in CHOICES:
        mean = {k: sum(r["regret"][choice][k] for r in rows) / len(rows) for k in KEYS}
        hits = "/".join(str(sum(r["regret"][choice][k] <= 0 for r in rows)) for k in KEYS)
        out.append(f"| {choice} | {mean['image_auroc']:.4f} | {mean['pixel_auroc']:.4f} | "
                   f"{mean['aupro']:.4f} | {hits} of {len(rows)} |")
    chance = {k: sum(r["best"][k] - sum(t[k] for t in r["test"].values()) / len(r["test"]) for r in rows) / len(rows)
              for k in KEYS}
    out.append(f"| (a rule drawn at random: expected) | {chance['image_auroc']:.4f} | {chance['pixel_auroc']:.4f} | "
               f"{chance['aupro']:.4f} | - |")
    return out


def markdown(path: Path, payload: dict) -> None:
    """The replay tables."""
    lines = ["# Map-aware's base-rule choice, replayed from the grid's reports", "", f"`{payload['meta']['command']}`",
             "", "Regret = the test's best standard calibrator (hindsight) minus the one the choice rule picks from "
             "the search-set proxy; only the base choice, not the tensor descent after it.", ""]
    for name, rows in payload["setups"].items():
        sources = sorted({r["proxy_from"] for r in rows})
        lines += [f"## {name} ({len(rows)} cells)", "", f"proxy: {'; '.join(sources)}", "", *regret_rows(rows)]
        lines += ["", "| cell | proxy pixel AUROC / distortion: minmax, entropy, mse, percentile | separation picks | "
                  "distortion picks |", "|---|---|---|---|"]
        for r in rows:
            proxy = ", ".join(f"{r['proxy'][k]['pixel_auroc']:.4f} / {r['proxy'][k]['loss']:.3f}" for k in STANDARD)
            lines.append(f"| {r['cell']} | {proxy} | {r['picks']['separation']} | {r['picks']['distortion']} |")
        lines.append("")
    if len(payload["setups"]) > 1:
        pooled = [r for rows in payload["setups"].values() for r in rows]
        lines += [f"## pooled: every cell of the {len(payload['setups'])} setups above ({len(pooled)} cells)", "",
                  *regret_rows(pooled), ""]
        by_width: dict[str, list[dict]] = {}
        for r in pooled:  # cell names end in the width: "train-8bit"
            by_width.setdefault(r["cell"].rsplit("-", 1)[1], []).append(r)
        for width, group in sorted(by_width.items(), key=lambda kv: -int(kv[0].removesuffix("bit"))):
            lines += [f"### pooled, {width} cells only ({len(group)})", "", *regret_rows(group), ""]
    lines.append(versions_line(payload["meta"]["versions"]))
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, replay every setup, write the results."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", help="the --work folder of a bench/map_aware.py run")
    ap.add_argument("--setup", action="append", default=[], help="e.g. mtd-rd (a folder under --work)")
    ap.add_argument("--grid", action="append", default=[], type=Path,
                    help="a setup folder of any run (WORK/SETUP); repeatable, pooled with --setup's")
    ap.add_argument("--kinds", help="re-score the proxy with synthetic anomalies of these kinds (comma-separated)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads when re-scoring")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if bool(args.setup) != bool(args.work):
        sys.exit("error: --setup and --work go together (--grid takes WORK/SETUP alone)")
    folders = {name: Path(args.work) / name for name in args.setup}
    folders.update({str(g): g for g in args.grid})
    if not folders:
        sys.exit("error: no setup: give --work with --setup, or --grid")
    rescore = None
    if args.kinds is not None:
        from qtool.data.synth_anomalies import ANOMALY_KINDS

        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        unknown = [k for k in kinds if k not in ANOMALY_KINDS]
        if not kinds or unknown:
            sys.exit(f"error: --kinds {args.kinds!r}: expected names among {', '.join(ANOMALY_KINDS)}")
        rescore = Rescorer(kinds, args.threads)
    setups = {}
    for name, folder in folders.items():
        if not folder.is_dir():
            sys.exit(f"error: no setup folder {folder}")
        try:
            setups[name] = replay(folder, rescore)
        except QtoolError as e:  # re-scoring: an unreadable image or graph of the grid
            sys.exit(f"error: {folder}: {e}".splitlines()[0])
    payload = {"meta": bench_meta("bench/map_aware_rule_choice.py", argv), "setups": setups}
    write_results(Path(args.out), payload, lambda p: markdown(p, payload))


if __name__ == "__main__":
    main()
