r"""Whether two columns of ``bench/map_aware.py`` pools gave the same test metrics and learning curve, cell by cell.

For a change meant to be output-neutral (e.g. QAT's int32-bias floor, which should only move dead channels): each
``--cell WORK/SETUP:BITS`` compares ``BASE-SOURCE-Nbit/cell.json`` with ``VARIANT-SOURCE-Nbit/cell.json`` (image AUROC,
pixel AUROC, AUPRO; and, for QAT columns, the holdout loss per epoch). A cell is **equal** when every metric differs
by at most ``--tol`` and the curves are identical. Nothing is recomputed.

Run: .venv/bin/python bench/cells_equal.py --base mapdw-in8 --variant mapdw-fixx-in8 \\
         --cell bench/work/pool_s1_rd/mtd-rd:6 ... --out bench/results/qat_int32_floor_x_equal
Writes PATH.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qtool.artifacts import bench_meta, versions_line, write_results

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def compare(setup_dir: Path, bits: int, base: str, variant: str, source: str, tol: float) -> dict:
    """One cell: both columns' metrics, the largest difference, whether the curves match, and the verdict."""
    cells = []
    for column in (base, variant):
        path = setup_dir / f"{column}-{source}-{bits}bit" / "cell.json"
        if not path.is_file():
            raise FileNotFoundError(f"no {path}")
        cells.append(json.loads(path.read_text()))
    diff = max(abs(cells[0][k] - cells[1][k]) for k in METRICS)
    curves = [[h.get("holdout_loss") for h in c.get("history", [])] for c in cells]
    return {"cell": str(setup_dir), "bits": bits, "base": {k: cells[0][k] for k in METRICS},
            "variant": {k: cells[1][k] for k in METRICS}, "max_diff": diff, "same_curve": curves[0] == curves[1],
            "equal": diff <= tol and curves[0] == curves[1]}


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, compare every cell (all read before anything is written), write the table."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--variant", required=True)
    ap.add_argument("--cell", action="append", required=True, help="WORK/SETUP:BITS (repeat)")
    ap.add_argument("--source", default="train")
    ap.add_argument("--tol", type=float, default=1e-9)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = []
    for spec in args.cell:
        folder, _, bits = spec.rpartition(":")
        if not folder or not bits.isdigit():
            sys.exit(f"error: --cell {spec!r}: expected WORK/SETUP:BITS")
        try:
            rows.append(compare(Path(folder), int(bits), args.base, args.variant, args.source, args.tol))
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"error: --cell {spec}: {e}")
    meta = bench_meta("bench/cells_equal.py", argv, cells=len(rows))
    write_results(Path(args.out), {"meta": meta, "rows": rows}, lambda p: write_markdown(p, meta, rows, args))


def write_markdown(path: Path, meta: dict, rows: list[dict], args: argparse.Namespace) -> None:
    """One line per cell: both columns' metrics, the largest difference, the curves, the verdict."""
    equal = sum(r["equal"] for r in rows)
    lines = [f"# {args.variant} against {args.base}: equal test metrics and learning curve per cell", "",
             f"`{meta['command']}`", "", f"machine: {meta['machine']}; source {args.source}; tolerance {args.tol:g}; "
             f"**{equal} of {len(rows)} cells equal**.", "",
             f"| cell | bits | {args.base} (image / pixel / AUPRO) | {args.variant} | max diff | same curve | equal |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        base, variant = (" / ".join(f"{r[c][k]:.6f}" for k in METRICS) for c in ("base", "variant"))
        lines.append(f"| {r['cell']} | {r['bits']} | {base} | {variant} | {r['max_diff']:.2g} | "
                     f"{'yes' if r['same_curve'] else 'no'} | {'yes' if r['equal'] else 'no'} |")
    lines += ["", versions_line(meta["versions"])]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
