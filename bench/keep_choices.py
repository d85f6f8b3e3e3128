r"""Which state each ``qat.keep`` rule exports, per QAT run: a guarded run beside the same-seed run of another rule.

A QAT run's trajectory does not depend on its keep rule (the rule only chooses what is exported), so a run kept
``guarded`` and the same recipe and seed kept ``best`` trained the same states. For each ``--cell
NAME=GUARDED_DIR:OTHER_DIR`` (``bench/map_distillation.py`` cell folders) this checks that both learning curves are
the same, replays every keep rule on the guarded run's history (its rows carry the check-set proxy AUROCs), and
lists each rule's epoch, the proxies of the start and of the kept states, both runs' test metrics and times.

Run (W=bench/work/pool_s1_rd/mtd-rd): .venv/bin/python bench/keep_choices.py \\
         --cell "s1 MTD RD 6 seed 0=$W/mapdg-in8-train-6bit:$W/mapdw-in8-train-6bit" --out OUT
Writes PATH.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from map_aware import KEYS

from qtool.artifacts import bench_meta, versions_line, write_results
from qtool.qat.keep import KEEP_RULES, replay


def parse_cell(text: str) -> tuple[str, Path, Path]:
    """``NAME=GUARDED_DIR:OTHER_DIR`` -> (name, guarded cell folder, other cell folder)."""
    name, _, dirs = text.partition("=")
    guarded, _, other = dirs.partition(":")
    if not name or not guarded or not other:
        raise argparse.ArgumentTypeError(f"--cell {text!r}: expected NAME=GUARDED_DIR:OTHER_DIR")
    return name, Path(guarded), Path(other)


def _run(cell: Path) -> tuple[dict, dict]:
    """A cell folder's ``cell.json`` and its QAT ``report.json`` (a one-line error and exit 1 when one is missing)."""
    files = cell / "cell.json", cell / "qat" / "report.json"
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        sys.exit(f"error: {missing[0]}: not a finished bench/map_distillation.py cell")
    return tuple(json.loads(f.read_text()) for f in files)


def same_curve(a: list[dict], b: list[dict]) -> bool:
    """Whether two runs' histories have the same check-set loss at every epoch (to 1e-9): the same trajectory."""
    return [round(h["holdout_loss"], 9) for h in a] == [round(h["holdout_loss"], 9) for h in b]


def compare(name: str, guarded_dir: Path, other_dir: Path) -> dict:
    """One run's row: each rule's epoch and proxies on the guarded run, both runs' metrics, same-curve check."""
    g_cell, g_report = _run(guarded_dir)
    o_cell, o_report = _run(other_dir)
    history = g_report["history"]
    if "proxy_pixel_auroc" not in history[0]:
        sys.exit(f"error: {guarded_dir}: its history has no check-set proxy AUROCs (not a guarded run)")
    same = same_curve(history, o_report["history"])
    choices = {rule: replay(KEEP_RULES.get(rule), history) for rule in KEEP_RULES.names()}

    def proxies(row: dict) -> dict:
        return {"epoch": row["epoch"], "holdout_loss": row["holdout_loss"],
                "image": row["proxy_image_auroc"], "pixel": row["proxy_pixel_auroc"]}

    return {"name": name, "guarded": str(guarded_dir), "other": str(other_dir), "same_curve": same,
            "kept": {"guarded_run": g_report["kept_epoch"], "other_run": o_report["kept_epoch"],
                     "other_rule": o_report["qat"]["keep"]},
            "start": proxies(history[0]), "choices": {r: proxies(row) for r, row in choices.items()},
            "metrics": {"guarded": {k: g_cell[k] for k in KEYS}, "other": {k: o_cell[k] for k in KEYS}},
            "seconds": {"guarded": g_cell["qat_seconds"], "other": o_cell["qat_seconds"],
                        "holdout_pass": sum(h.get("holdout_seconds", 0.0) for h in history)}}


def write_markdown(path: Path, meta: dict, rows: list[dict]) -> None:
    """The per-run table of kept epochs, proxies and test metrics."""
    lines = ["# Which state each qat.keep rule exports, per run", "", f"`{meta['command']}`", "",
             f"machine: {meta['machine']}. Epochs kept: guarded (this run), and the other run's own rule; proxies "
             "(check set: image / pixel AUROC) at the start and at each rule's choice replayed on the guarded run's "
             "history; test metrics (image / pixel AUROC / AUPRO) of both exports; same curve: both runs' check-set "
             "losses equal to 1e-9 (the same trajectory).", "",
             "| run | same curve | guarded epoch | other epoch (rule) | start proxies | guarded proxies | "
             "best's proxies | guarded test | other test | seconds guarded / other |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def px(p: dict) -> str:
        return f"{p['image']:.3f} / {p['pixel']:.3f}"

    def mt(m: dict) -> str:
        return " / ".join(f"{m[k]:.4f}" for k in KEYS)

    for r in rows:
        c = r["choices"]
        lines.append(f"| {r['name']} | {'yes' if r['same_curve'] else 'NO'} | {r['kept']['guarded_run']} | "
                     f"{r['kept']['other_run']} ({r['kept']['other_rule']}) | {px(r['start'])} | "
                     f"{px(c['guarded'])} | {px(c['best'])} (epoch {c['best']['epoch']}) | "
                     f"{mt(r['metrics']['guarded'])} | {mt(r['metrics']['other'])} | "
                     f"{r['seconds']['guarded']:.0f} / {r['seconds']['other']:.0f} |")
    differ = [r["name"] for r in rows if r["choices"]["guarded"]["epoch"] != r["choices"]["best"]["epoch"]]
    lines += ["", f"Runs where guarded and best keep different epochs: {len(differ)} of {len(rows)}"
              + (f" ({', '.join(differ)})" if differ else "") + ".", "", versions_line(meta["versions"])]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, compare every cell's runs, write the results."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", type=parse_cell, action="append", required=True,
                    help="NAME=GUARDED_DIR:OTHER_DIR (cell folders of the same recipe and seed)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = [compare(*cell) for cell in args.cell]
    meta = bench_meta("bench/keep_choices.py", argv)
    write_results(Path(args.out), {"meta": meta, "runs": rows}, lambda path: write_markdown(path, meta, rows))


if __name__ == "__main__":
    main()
