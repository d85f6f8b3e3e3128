r"""Map distillation of the quantization ranges as a column of a ``bench/map_aware.py`` pool.

``qtool qat`` with ``qat.loss=map``, ``qat.learn=ranges``: same model, same resolved recipe as a base cell,
judged afterwards by ``bench/map_aware_bootstrap.py --every`` against that pool's calibrator columns.

For each ``--model SETUP=CHECKPOINT`` the base cell ``WORK/SETUP/BASE-SOURCE-Nbit`` (its ``ptq/recipe.yaml``, the
recipe its PTQ run resolved) is rerun as a QAT run with ``--set`` overrides (qat.*, ptq.search.*) into
``WORK/SETUP/LABEL-SOURCE-Nbit/qat``, evaluated on the test split, and cached as that folder's ``cell.json``.
The table lists base and new cell (image / pixel AUROC, AUPRO), the learning curve (map loss on the search set
and on the check set per epoch), the learning time and the anomaly-map SQNR of each against fp32.

Run: .venv/bin/python bench/map_distillation.py --model mtd-rd=bench/work/rd40-seed1/rd/model.pt \\
         --work bench/work/pool_s1_rd --base mse-bc-in8 --label mapd-in8 --bits 4 --source train \\
         --set qat.loss=map --set qat.learn=ranges ... --out bench/results/map_distillation_mtd_rd
Writes PATH.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from map_aware import KEYS

from qtool.artifacts import bench_meta, versions_line, write_json, write_results
from qtool.commands.common import fail_cleanly
from qtool.recipe import load_recipe


def run_cell(model: Path, base: Path, overrides: list[str], cell: Path, threads: int) -> dict:
    """QAT run of ``model`` with ``base``'s resolved recipe plus ``overrides``, evaluated; cached as ``cell.json``."""
    from qtool.qat.run import run_qat
    from qtool.runs import run_eval

    cached = cell / "cell.json"
    if cached.exists():
        return json.loads(cached.read_text())
    recipe = load_recipe(base / "ptq" / "recipe.yaml", [*overrides, f"eval.threads={threads}",
                                                        f"train.threads={threads}"])
    t0 = time.perf_counter()
    report = run_qat(model, recipe, cell / "qat")
    seconds = time.perf_counter() - t0
    metrics = run_eval(Path(report["output"]), recipe)["metrics"]["mean"]
    row = {**{k: metrics.get(k) for k in KEYS}, "qat_seconds": round(seconds, 2),
           "train_seconds": round(report["stage_seconds"]["train"], 2), "sqnr_db": report["sqnr_db"],
           "history": [{k: v for k, v in h.items() if k in ("epoch", "train_loss", "holdout_loss", "seconds", "kept")}
                       for h in report["history"]],
           "qat": report["qat"], "learn": report["learn"], "kept_epoch": report["kept_epoch"], "init": report["init"],
           "trained_parameters": report["trained_parameters"],
           "objective": {k: v for k, v in report["objective"].items() if k not in ("images", "holdout")},
           "train_images": report["train_images"]}
    write_json(cached, row)
    return row


def base_row(base: Path) -> dict:
    """The base cell's metrics (its ``cell.json``) and its PTQ report's SQNR."""
    row = json.loads((base / "cell.json").read_text())
    report = json.loads((base / "ptq" / "report.json").read_text())
    return {**{k: row.get(k) for k in KEYS}, "sqnr_db": report.get("sqnr_db"),
            "calib_seconds": row.get("calib_seconds")}


def write_markdown(path: Path, meta: dict, setups: list[dict]) -> None:
    """The table of base and map-distilled cells, and each learning curve."""
    lines = ["# Map distillation of the ranges against the base calibrator", "", f"`{meta['command']}`", "",
             f"machine: {meta['machine']}; base column `{meta['base']}`, new column `{meta['label']}`, "
             f"{meta['bits']} bits, source {meta['source']}; overrides: `{' '.join(meta['overrides'])}`", "",
             "| setup | column | image AUROC | pixel AUROC | AUPRO | map SQNR dB | seconds |",
             "|---|---|---|---|---|---|---|"]
    for s in setups:
        for name, row, secs in ((meta["base"], s["base"], s["base"].get("calib_seconds")),
                                (meta["label"], s["cell"], s["cell"]["qat_seconds"])):
            sq = (row.get("sqnr_db") or {}).get("anomaly_map")
            lines.append(f"| {s['setup']} | {name} | {row['image_auroc']:.4f} | {row['pixel_auroc']:.4f} | "
                         f"{row['aupro']:.4f} | {sq:.1f} | {secs} |")
    nan = float("nan")
    lines += ["", "Learning curves (map distillation loss: search set while training, check set after each epoch; "
              "* the state exported):",
              ""]
    for s in setups:
        curve = ", ".join(f"{h['epoch']}{'*' if h.get('kept') else ''}: {h.get('train_loss', nan):.3f} / "
                          f"{h.get('holdout_loss', nan):.3f}" for h in s["cell"]["history"])
        lines.append(f"- {s['setup']} ({s['cell']['train_images']} images, {s['cell']['trained_parameters']} "
                     f"biases, {s['cell']['train_seconds']} s): {curve}")
    lines += ["", versions_line(meta["versions"])]
    path.write_text("\n".join(lines) + "\n")


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every setup's cell, write the results."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="SETUP=CHECKPOINT (SETUP: a folder under --work)")
    ap.add_argument("--work", required=True, help="the --work folder of a bench/map_aware.py run")
    ap.add_argument("--base", required=True, help="the column whose cell recipe is the start (e.g. mse-bc-in8)")
    ap.add_argument("--label", required=True, help="the new column's name (e.g. mapd-in8)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--source", default="train")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init-from-base", action="store_true",
                    help="start from the base cell's PTQ graph (qat.init_from = its ptq folder: ranges and biases)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override (qat.*, ptq.*)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    setups = []
    for item in args.model:
        setup, _, model = item.partition("=")
        base = Path(args.work) / setup / f"{args.base}-{args.source}-{args.bits}bit"
        if not model or not (base / "ptq" / "recipe.yaml").is_file() or not (base / "cell.json").is_file():
            sys.exit(f"error: --model {item!r}: need SETUP=CHECKPOINT and a finished base cell {base}")
        cell = Path(args.work) / setup / f"{args.label}-{args.source}-{args.bits}bit"
        overrides = [*args.overrides, f"qat.init_from={base / 'ptq'}"] if args.init_from_base else args.overrides
        row = run_cell(Path(model), base, overrides, cell, args.threads)
        setups.append({"setup": setup, "model": model, "base": base_row(base), "cell": row})
        print(setup, {k: row[k] for k in (*KEYS, "qat_seconds")}, flush=True)
    meta = bench_meta("bench/map_distillation.py", argv, base=args.base, label=args.label, bits=args.bits,
                      source=args.source, overrides=args.overrides,
                      init_from_base=args.init_from_base)
    write_results(Path(args.out), {"meta": meta, "setups": setups}, lambda path: write_markdown(path, meta, setups))


if __name__ == "__main__":
    main()
