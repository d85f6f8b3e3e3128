r"""How much of a quantized model's image-score error is ranking error: fidelity to fp32 on the check set.

Map distillation's score term is a relative squared error, ``sum (q - r)^2 / sum r^2`` over the image scores
``r`` of the fp32 model. When the scores sit on a large common offset (their spread small against their mean),
that term is small even when the errors reorder images; ``sum (q - r)^2 / sum (r - mean r)^2`` (centred) is
what ranking sees. Per cell column, on the check set a QAT run of ``bench/map_distillation.py`` validates on
(``ptq.search``: the normal pool after the search set's normals, with synthetic anomalies; never the test
split): both forms for the scores and for the maps, the Spearman rank correlation of its scores with fp32's,
and the separation of the synthetic anomalies (image AUROC on the check set) of fp32 and of the column.

Run: .venv/bin/python bench/score_spread.py --work bench/work/pool_s1_rd --setup mtd-rd --bits 6 \
         --columns mse-bc-in8,mapdw-in8 --out bench/results/score_spread_mtd_rd_6bit
Writes PATH.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from map_aware_bootstrap import cell_models
from paired_bootstrap import model_outputs

from qtool.artifacts import bench_meta, versions_line, write_results
from qtool.commands.common import fail_cleanly
from qtool.data import ImageTransform, load_splits
from qtool.fidelity import map_fidelity
from qtool.metrics import image_auroc
from qtool.recipe import load_recipe
from qtool.search import build_check_set


def errors(q: np.ndarray, r: np.ndarray) -> dict[str, float]:
    """Relative squared error of ``q`` against ``r``: over ``sum r^2`` (raw) and over ``sum (r - mean r)^2``."""
    q, r = q.astype(np.float64), r.astype(np.float64)
    err = float(((q - r) ** 2).sum())
    return {"raw": err / float((r**2).sum()), "centred": err / float(((r - r.mean()) ** 2).sum())}


def cell_row(name: str, maps: np.ndarray, scores: np.ndarray, ref: tuple[np.ndarray, np.ndarray],
             labels: np.ndarray) -> dict:
    """One column's fidelity to fp32 and its own separation on the check set."""
    return {"column": name, "score": errors(scores, ref[1]), "map": errors(maps, ref[0]),
            "spearman": map_fidelity(ref[0], maps, ref[1], scores)["score_spearman"],
            "check_image_auroc": float(image_auroc(labels, scores))}


def test_set(splits, transform) -> SimpleNamespace:
    """The test split's images and labels (for ``--images test``)."""
    return SimpleNamespace(images=np.stack([transform.image(s.path) for s in splits.test]),
                           labels=np.array([s.label for s in splits.test]))


def write_markdown(path: Path, meta: dict, cells: list[dict]) -> None:
    """One table: per setup, width and column, the raw and centred errors, Spearman and separation."""
    where = {"check": "on the check set (never the test split)",
             "test": "on the test split (a diagnosis after the fact; nothing is chosen from it)"}[meta["images"]]
    lines = [f"# Image-score error as ranking error, {where}", "",
             f"`{meta['command']}`", "",
             "Relative squared error against fp32: raw = over sum r^2 (map distillation's form), centred = over "
             "sum (r - mean r)^2 (what a ranking sees). spread = std / mean of fp32's scores.", "",
             "| setup | bits | images | fp32 score spread | column | score raw | score centred | map raw | "
             f"map centred | Spearman vs fp32 | {meta['images']} image AUROC (fp32) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        for r in c["rows"]:
            lines.append(f"| {c['setup']} | {c['bits']} | {c['images']} | {c['spread']:.3f} | {r['column']} | "
                         f"{r['score']['raw']:.2e} | {r['score']['centred']:.3f} | {r['map']['raw']:.2e} | "
                         f"{r['map']['centred']:.3f} | {r['spearman']:.3f} | {r['check_image_auroc']:.3f} "
                         f"({c['fp32_check_image_auroc']:.3f}) |")
    lines += ["", versions_line(meta["versions"])]
    path.write_text("\n".join(lines) + "\n")


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    """Parse arguments, measure every setup and width, write the results."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="the --work folder of a bench/map_aware.py run")
    ap.add_argument("--setup", required=True)
    ap.add_argument("--bits", type=lambda v: [int(b) for b in v.split(",")], default=[4, 6, 8])
    ap.add_argument("--source", default="train")
    ap.add_argument("--columns", type=lambda v: v.split(","), required=True)
    ap.add_argument("--images", choices=["check", "test"], default="check",
                    help="check: the check set (default); test: the test split (a diagnosis after the fact: its "
                         "labels give the last column, the test image AUROC)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    work = Path(args.work)
    cells = []
    for bits in args.bits:
        models = cell_models(work, args.setup, args.source, bits, args.columns)
        qat_recipe = Path(models[args.columns[-1]]).parent / "recipe.yaml"
        recipe = load_recipe(qat_recipe if qat_recipe.is_file() else Path(models[args.columns[0]]).parent
                             / "recipe.yaml")
        splits, transform = load_splits(recipe.data), ImageTransform(recipe.data)
        check = (build_check_set(splits, transform, recipe.ptq.search) if args.images == "check"
                 else test_set(splits, transform))
        ref = model_outputs(work / args.setup / "fp32.onnx", check.images)
        rows = [cell_row(n, *model_outputs(Path(p), check.images), ref, check.labels) for n, p in models.items()]
        cells.append({"setup": args.setup, "bits": bits, "images": len(check.images), "rows": rows,
                      "spread": float(ref[1].astype(np.float64).std() / abs(ref[1].astype(np.float64).mean())),
                      "fp32_check_image_auroc": float(image_auroc(check.labels, ref[1]))})
        print(args.setup, bits, [(r["column"], round(r["score"]["centred"], 3), round(r["spearman"], 3))
                                 for r in rows], flush=True)
    meta = bench_meta("bench/score_spread.py", argv, setup=args.setup, columns=args.columns, images=args.images)
    write_results(Path(args.out), {"meta": meta, "cells": cells}, lambda path: write_markdown(path, meta, cells))


if __name__ == "__main__":
    main()
