"""Two ``bench/map_aware.py`` runs of the same model side by side: whether a setting change helped map-aware.

For each setup present in both results JSONs (matched by setup name, e.g. ``mtd:stfpm``), on the
(width, source) cells where both runs have a map-aware cell, it prints per run map-aware's mean margin
against the hindsight-best standard calibrator of the same width and source (image / pixel AUROC /
AUPRO, mean over the cells), how many cell-metrics are at or above the best and at or above entropy,
the map-aware calibration seconds, and the proxy-to-test Spearman (over each run's whole grid, as the
run reported it). The standard cells the two runs share must agree (same model, same test split): the
script checks that their test values match to within :data:`TOLERANCE` and stops otherwise, so a
comparison of different models cannot pass as one of settings.

Run: .venv/bin/python bench/map_aware_compare.py A.json B.json --label A=search32 --label B=search128 \
         [--out bench/results/NAME]
Writes NAME.{md,json} with ``--out``; prints the markdown either way.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from map_aware import KEYS, at_or_above, versus_standard

from qtool.artifacts import write_json

DEFAULT = "entropy"
#: Largest test-metric difference allowed between the runs' shared standard cells. Not 0: ONNX Runtime's
#: float sums depend on the thread count (1e-5 typical, 0.003 seen on an emulated 4-bit AUPRO); a
#: different model or split moves them by 0.01 and more at 8 bits. At 4 bits a thread-count change alone
#: moved STFPM's cells by up to 0.015 (the calibration statistics shift, and with 16 levels a range step
#: is large): ``--tolerance`` raises it for such runs.
TOLERANCE = 0.005


def standard_values(cells: list[dict]) -> dict[tuple, tuple]:
    """(calibrator, source, bits) -> test values of every standard (not map-aware) cell."""
    return {(c["calibrator"], c["source"], c["bits"]): tuple(c[k] for k in KEYS)
            for c in cells if c["calibrator"] != "map-aware"}


def map_aware_cells(cells: list[dict]) -> set[tuple[int, str]]:
    """(bits, source) of every map-aware cell."""
    return {(c["bits"], c["source"]) for c in cells if c["calibrator"] == "map-aware"}


def summary(setup: dict, keep: set[tuple[int, str]]) -> dict:
    """Map-aware against the standard calibrators in one run of one setup, on the (bits, source) in ``keep``."""
    cells = [c for c in setup["cells"] if (c["bits"], c["source"]) in keep]
    rows = versus_standard(cells, DEFAULT)
    ma = [c for c in cells if c["calibrator"] == "map-aware"]
    at_best, at_default, cell_metrics = at_or_above(rows)
    return {
        "cells": len(rows),
        "mean_minus_best": {k: sum(r["minus_best"][k] for r in rows) / len(rows) for k in KEYS} if rows else None,
        "at_or_above_best": at_best,
        "at_or_above_default": at_default,
        "cell_metrics": cell_metrics,
        "spearman": setup["proxy_rank_correlation"],
        "map_aware_seconds": [min(c["calib_seconds"] for c in ma), max(c["calib_seconds"] for c in ma)] if ma else None,
    }


def overrides(command: str) -> list[str]:
    """The ``--set`` items of a run's command line: what differs between two runs of one model."""
    words = shlex.split(command)
    out = [w.split("=", 1)[1] for w in words if w.startswith("--set=")]
    return out + [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--set"]


def compare(a: dict, b: dict, tolerance: float = TOLERANCE) -> dict[str, dict]:
    """Per setup in both runs: the two summaries; exits if their standard cells differ by more than ``tolerance``."""
    by_name = {s["setup"]: s for s in b["setups"]}
    out = {}
    for sa in a["setups"]:
        sb = by_name.get(sa["setup"])
        if sb is None:
            continue
        va, vb = standard_values(sa["cells"]), standard_values(sb["cells"])
        shared = va.keys() & vb.keys()
        gap = max((abs(x - y) for k in shared for x, y in zip(va[k], vb[k])), default=0.0)
        if not shared or gap > tolerance:
            sys.exit(f"error: {sa['setup']}: the two runs' standard cells differ (by up to {gap:.4f} over "
                     f"{len(shared)} cells): not the same model and test split")
        both = map_aware_cells(sa["cells"]) & map_aware_cells(sb["cells"])
        out[sa["setup"]] = {"a": {**summary(sa, both), "set": overrides(a["meta"]["command"])},
                            "b": {**summary(sb, both), "set": overrides(b["meta"]["command"])},
                            "standard_cells_checked": len(shared), "standard_cells_max_gap": gap,
                            "compared": [f"{bits} bits {source}" for bits, source in sorted(both, reverse=True)]}
    if not out:
        sys.exit("error: no setup is in both results files")
    return out


def markdown(result: dict[str, dict], labels: dict[str, str], command: str) -> str:
    """One table per setup: a row per run."""
    lines = ["# Map-aware: two runs of the same models compared", "", f"`{command}`", "",
             "Mean margin = map-aware minus the best standard calibrator of the same width and source (hindsight, "
             "per metric), averaged over the map-aware cells; image / pixel AUROC / AUPRO.", ""]
    for setup, r in result.items():
        lines += [f"## {setup} ({r['standard_cells_checked']} standard cells in both runs, test values within "
                  f"{r['standard_cells_max_gap']:.1e})", "",
                  "Cells compared (map-aware in both runs): " + ", ".join(r["compared"]), "",
                  "| run | --set | mean margin vs best | at/above best | at/above entropy | "
                  "Spearman image / pixel | map-aware calib s |", "|---" * 7 + "|"]
        for key in ("a", "b"):
            s = r[key]
            margin = " / ".join(f"{s['mean_minus_best'][k]:+.4f}" for k in KEYS) if s["mean_minus_best"] else "-"
            lo_hi = s["map_aware_seconds"]
            secs = f"{lo_hi[0]:.0f} to {lo_hi[1]:.0f}" if lo_hi else "-"
            lines.append(f"| {labels[key]} | {', '.join(s['set']) or '-'} | {margin} | "
                         f"{s['at_or_above_best']} of {s['cell_metrics']} | {s['at_or_above_default']} of "
                         f"{s['cell_metrics']} | {s['spearman']['image_auroc']} / {s['spearman']['pixel_auroc']} | "
                         f"{secs} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Read the two results JSONs, compare, print the Markdown and write ``--out`` .md / .json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--label", action="append", default=[], metavar="A=TEXT|B=TEXT")
    ap.add_argument("--out", type=Path, default=None, help="results path without suffix")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE,
                    help="largest difference allowed between the runs' shared standard cells")
    args = ap.parse_args(argv)
    labels = {"a": str(args.a), "b": str(args.b)}
    for item in args.label:
        key, sep, text = item.partition("=")
        if key.lower() not in labels or not sep:
            sys.exit(f"error: --label {item!r}: expected A=TEXT or B=TEXT")
        labels[key.lower()] = text
    runs = []
    for path in (args.a, args.b):
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            sys.exit(f"error: {path}: not a readable results JSON ({e})")
        if not isinstance(runs[-1], dict) or "setups" not in runs[-1]:
            sys.exit(f"error: {path}: not a bench/map_aware.py results JSON (no 'setups')")
    result = compare(*runs, args.tolerance)
    command = "python bench/map_aware_compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(result, labels, command)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out.with_suffix(".json"), {"command": command, "labels": labels, "setups": result})
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
