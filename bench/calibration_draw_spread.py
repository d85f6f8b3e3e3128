r"""Test AUROC across equivalent calibrations, beside the differences that single-calibration comparisons find.

Reads the ``cell.json`` files ``bench/map_aware.py`` wrote: per model (``--model TAG=FOLDER``, the folder holding the
cells), the draws (``--draws``: cell folder names that differ only in which normal images calibrated them) and the
comparisons (``--compare A:B``: two cell folders whose difference B - A a single-calibration comparison reports).
Writes, per model and metric (image AUROC, pixel AUROC, AUPRO), each draw's value, the draws' range and standard
deviation, and each comparison's difference, marked ``within`` when its size is below the range of the draws.

Run: .venv/bin/python bench/calibration_draw_spread.py --model mtd_rd=bench/work/pool_s1_rd/mtd-rd \
         --draws mse-bc-n48-train-4bit,mse-bc-train-4bit,mse-bc-n80-train-4bit \
         --compare mse-bc-train-4bit:mse-bc-gptq-train-4bit --out bench/results/calibration_draw_spread
Writes PATH.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from qtool.artifacts import bench_meta, versions_line, write_results
from qtool.commands.common import fail_cleanly
from qtool.errors import DataError

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def _cell(folder: Path, name: str) -> dict:
    path = folder / name / "cell.json"
    if not path.is_file():
        raise DataError(f"no cell {path}")
    return json.loads(path.read_text())


@fail_cleanly
def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, metavar="TAG=FOLDER")
    ap.add_argument("--draws", required=True)
    ap.add_argument("--compare", action="append", default=[], metavar="A:B")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    draws = args.draws.split(",")
    pairs = [tuple(c.split(":", 1)) for c in args.compare]
    models = {}
    for entry in args.model:
        tag, folder = entry.split("=", 1)
        cells = {d: _cell(Path(folder), d) for d in draws}
        out = {}
        for m in METRICS:
            values = [cells[d][m] for d in draws]
            spread = max(values) - min(values)
            diffs = {}
            for a, b in pairs:
                d = _cell(Path(folder), b)[m] - _cell(Path(folder), a)[m]
                diffs[f"{b} - {a}"] = {"difference": d, "within": abs(d) < spread}
            out[m] = {"draws": dict(zip(draws, values)), "range": spread, "sd": float(np.std(values, ddof=1)),
                      "comparisons": diffs}
        models[tag] = out
    meta = bench_meta("bench/calibration_draw_spread.py", argv)
    within = sum(c["within"] for mod in models.values() for m in mod.values() for c in m["comparisons"].values())
    total = sum(len(m["comparisons"]) for mod in models.values() for m in mod.values())
    payload = {"meta": meta, "models": models, "within": within, "comparisons": total}

    def markdown(path: Path) -> None:
        lines = ["# Test AUROC across equivalent calibrations (the calibration-draw spread)", "",
                 f"`{meta['command']}`", "", f"machine: {meta['machine']}; draws: {', '.join(draws)}", "",
                 "| model | metric | draws | range | SD | comparisons (B - A; * within the range) |",
                 "|---|---|---|---|---|---|"]
        for tag, out in models.items():
            for m, r in out.items():
                comps = "; ".join(f"{k}: {c['difference']:+.4f}{'*' if c['within'] else ''}"
                                  for k, c in r["comparisons"].items())
                lines.append(f"| {tag} | {m} | {' / '.join(f'{v:.4f}' for v in r['draws'].values())} | "
                             f"{r['range']:.4f} | {r['sd']:.4f} | {comps or '-'} |")
        lines += ["", f"{within} of {total} comparison differences lie within the range of the draws.", "",
                  versions_line(meta["versions"]), ""]
        path.write_text("\n".join(lines))

    write_results(Path(args.out), payload, markdown)
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main(sys.argv[1:])
