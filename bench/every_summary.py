"""Add up ``bench/map_aware_bootstrap.py --every`` results into one grid table: below / tie / above per column.

Each ``--group LABEL=WHAT:FILE[,FILE]`` names a row (files: ``*_every.json``); ``--focus COLUMN`` lists that
column's every significant verdict (below or above) with its values and interval. Nothing is recomputed: the
verdicts are those the bootstrap files hold (each column against the best of the others, same source and width).
``--pair`` results add up the same way (each variant against the pair's base, e.g. fp32); one summary takes files
of one baseline only (all ``--every``, or all ``--pair`` with the same base).

    python bench/every_summary.py --focus mawc-in8 --group "G1=4 and 6 bits:a_every.json,b_every.json" --out OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from map_aware_bootstrap import verdict_counts

from qtool.artifacts import bench_meta, write_results

VERDICTS = ("below", "tie", "above")


def parse_group(text: str) -> tuple[str, str, list[Path]]:
    """``LABEL=WHAT:FILE,FILE`` -> (label, what, files)."""
    label, _, rest = text.partition("=")
    what, _, files = rest.rpartition(":")
    paths = [Path(f) for f in files.split(",") if f]
    if not label or not what or not paths:
        raise argparse.ArgumentTypeError(f"--group {text!r}: expected LABEL=WHAT:FILE[,FILE]")
    return label, what, paths


def load_cells(paths: list[Path], metrics: list[str] | None = None) -> list[dict]:
    """The cells of ``paths`` (each a ``--every`` result), with the file each came from.

    ``metrics``: keep only these metrics' verdicts (default: every metric the files hold).

    Raises:
        FileNotFoundError / ValueError: a file is missing or is not an ``--every`` or ``--pair`` result.
    """
    cells = []
    for path in paths:
        data = json.loads(path.read_text())
        meta = data.get("meta", {})
        if not (meta.get("every") or meta.get("pair")):
            raise ValueError(f"{path}: not a map_aware_bootstrap.py --every or --pair result")
        against = (f"the pair's base {meta['pair'][0]}" if not meta.get("every")
                   else f"the best of {', '.join(meta['against'])}" if meta.get("against")
                   else "the best of the others")
        cells += [{**c, "file": path.name, "against": against, "verdicts": [v for v in c["verdicts"]
                                                        if metrics is None or v["metric"] in metrics]}
                  for c in data["cells"]]
    return cells


def tally(cells: list[dict]) -> dict[str, dict[str, int]]:
    """Counts of below / tie / above per column over ``cells``' verdicts (columns in order of appearance)."""
    columns = dict.fromkeys(v["anchor"] for cell in cells for v in cell["verdicts"])
    return {column: verdict_counts(cells, column) for column in columns}


def significant(cells: list[dict], column: str) -> list[dict]:
    """``column``'s below and above cell-metrics, with the cell they belong to."""
    return [{"setup": c["setup"], "bits": c["bits"], "source": c["source"], "file": c["file"], **v}
            for c in cells for v in c["verdicts"] if v["anchor"] == column and v["verdict"] != "tie"]


def margins(cells: list[dict], column: str) -> list[dict]:
    """Per metric, ``column``'s point estimates, whatever their verdicts.

    Each entry: cells, mean best - column, how many cells have it above 0 (the column under the best), and the
    mean width of the 95 % intervals.
    """
    out = []
    for metric in dict.fromkeys(v["metric"] for c in cells for v in c["verdicts"]):
        mine = [v for c in cells for v in c["verdicts"] if v["anchor"] == column and v["metric"] == metric]
        if mine:
            out.append({"metric": metric, "cells": len(mine),
                        "mean_best_minus": sum(v["best_minus_anchor"] for v in mine) / len(mine),
                        "under_best": sum(v["best_minus_anchor"] > 0 for v in mine),
                        "mean_ci_width": sum(v["ci95"][1] - v["ci95"][0] for v in mine) / len(mine)})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", dest="groups", action="append", required=True, type=parse_group)
    ap.add_argument("--focus", required=True, help="the column whose significant verdicts are listed")
    ap.add_argument("--title", default="Grid: below / tie / above per column")
    ap.add_argument("--metrics", type=lambda v: [m for m in v.split(",") if m], default=None,
                    help="only these metrics' verdicts (e.g. aupro; default: all the files hold)")
    ap.add_argument("--out", required=True, help="output path without suffix (.json and .md are written)")
    args = ap.parse_args(argv)
    rows, every = [], []
    for label, what, paths in args.groups:
        try:
            cells = load_cells(paths, args.metrics)
        except (OSError, ValueError, KeyError) as e:  # a missing, truncated or foreign file: one line, nothing written
            ap.error(f"--group {label}: {e}")
        every += cells
        rows.append({"group": label, "what": what, "files": [p.name for p in paths], "counts": tally(cells)})
    baselines = sorted({c["against"] for c in every})
    if len(baselines) > 1:
        ap.error(f"the files judge against different baselines ({'; '.join(baselines)}); one summary takes one")
    columns = list(tally(every))
    if args.focus not in columns:
        ap.error(f"--focus {args.focus!r} is not a column of these files ({', '.join(columns)})")
    total = tally(every)
    focus = significant(every, args.focus)
    metrics = list(dict.fromkeys(v["metric"] for c in every for v in c["verdicts"]))
    meta = bench_meta("bench/every_summary.py", argv, focus=args.focus, metrics=metrics, against=baselines[0])
    margin = margins(every, args.focus)
    write_results(Path(args.out), {"meta": meta, "groups": rows, "total": total, "focus": focus, "margins": margin},
                  lambda path: write_markdown(path, args.title, meta, rows, total, focus, columns, args.focus, margin))


def write_markdown(path: Path, title: str, meta: dict, rows: list[dict], total: dict, focus: list[dict],
                   columns: list[str], column: str, margin: list[dict]) -> None:
    """The table (a row per group and the total), the focus column's significant verdicts and its margins."""
    def cell(counts: dict[str, int] | None) -> str:
        return " / ".join(str((counts or {}).get(v, 0)) for v in VERDICTS)

    lines = [f"# {title}", "", f"`{meta['command']}`", "",
             f"Added up from the bootstrap files named per row (each column against {meta['against']}, same "
             f"source and width; {', '.join(meta['metrics'])}); below / above: the 95 % interval of best - column lies "
             "above / below 0.", "",
             "| group | what | files | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for r in rows:
        lines.append(f"| {r['group']} | {r['what']} | {', '.join(r['files'])} | "
                     + " | ".join(cell(r["counts"].get(c)) for c in columns) + " |")
    n = sum(total[columns[0]].values())
    lines.append(f"| all | {n} cell-metrics | | " + " | ".join(f"**{cell(total[c])}**" for c in columns) + " |")
    lines += ["", f"{column}'s significant verdicts:", ""]
    if focus:
        lines += ["| setup | bits | source | metric | verdict | value | best | best value | best - it [95 %] | file |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {f['setup']} | {f['bits']} | {f['source']} | {f['metric']} | {f['verdict']} | "
                  f"{f['anchor_value']:.4f} | {f['best']} | {f['best_value']:.4f} | {f['best_minus_anchor']:+.4f} "
                  f"[{f['ci95'][0]:+.4f}, {f['ci95'][1]:+.4f}] | {f['file']} |" for f in focus]
    else:
        lines.append("none: a tie in every cell-metric.")
    lines += ["", f"{column}'s point estimates, every cell (significant or not):", "",
              "| metric | cells | mean best - it | cells under the best | mean 95 % interval width |",
              "|---|---|---|---|---|"]
    lines += [f"| {m['metric']} | {m['cells']} | {m['mean_best_minus']:+.4f} | {m['under_best']} | "
              f"{m['mean_ci_width']:.4f} |" for m in margin]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
