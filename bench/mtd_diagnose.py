"""Why an MTD model scores what it scores: per-defect image AUROC and the acquisition-group confound.

For one model (checkpoint or ONNX) on the recipe's MTD test split: image AUROC of each defect type
against the test normals, and Spearman's rho between the image score and the acquisition group
(``exp<k>`` in MTD file names) over the normals alone and over all test images. A rho near 0 on
normals means the score does not follow the exposure group (anomalib's STFPM did).

Run: .venv/bin/python bench/mtd_diagnose.py --model bench/work/mtd-stfpm/model.pt [--model other.pt]
Writes bench/results/mtd_diagnose.{json,md}.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from qtool.artifacts import package_versions, sha256_file, write_json
from qtool.metrics import image_auroc
from qtool.recipe import load_recipe
from qtool.runs import run_eval

ROOT = Path(__file__).resolve().parents[1]


def group_of(path: str) -> int:
    """The acquisition group k of an MTD file name ``exp<k>_...`` (-1 if absent)."""
    m = re.match(r"exp(\d+)", Path(path).name)
    return int(m.group(1)) if m else -1


def defect_of(path: str) -> str:
    """The MTD folder of a file: ``MT_Free`` -> ``good``, ``MT_Crack`` -> ``Crack``."""
    folder = Path(path).parents[1].name
    return "good" if folder == "MT_Free" else folder.removeprefix("MT_")


def diagnose(model: Path, recipe) -> dict:
    """Per-defect AUROC and score-vs-group correlations of one model."""
    res = run_eval(model, recipe)
    scores, labels, files = np.array(res["scores"]), np.array(res["labels"]), res["files"]
    defects = np.array([defect_of(f) for f in files])
    groups = np.array([group_of(f) for f in files])
    normal = labels == 0
    per_defect = {d: round(image_auroc(np.r_[np.zeros(normal.sum()), np.ones((defects == d).sum())],
                                       np.r_[scores[normal], scores[defects == d]]), 4)
                  for d in sorted(set(defects) - {"good"})}
    rho_normal = spearmanr(scores[normal], groups[normal]).statistic
    rho_all = spearmanr(scores, groups).statistic
    by_group = {int(g): round(float(np.median(scores[normal & (groups == g)])), 5)
                for g in sorted(set(groups[normal]))}
    return {"model": str(model), "sha256": sha256_file(model), "image_auroc": res["metrics"]["mean"]["image_auroc"],
            "pixel_auroc": res["metrics"]["mean"]["pixel_auroc"], "per_defect_image_auroc": per_defect,
            "rho_score_group_normals": round(float(rho_normal), 3), "rho_score_group_all": round(float(rho_all), 3),
            "median_normal_score_by_group": by_group, "n_test": len(files)}


def main(argv: list[str] | None = None) -> None:
    """Diagnose each model; write JSON and Markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "mtd_stfpm.yaml"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mtd_diagnose"))
    args = ap.parse_args(argv)
    recipe = load_recipe(args.recipe)
    rows = [diagnose(Path(m), recipe) for m in args.model]
    command = "python bench/mtd_diagnose.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    out = Path(args.out)
    write_json(out.with_suffix(".json"), {"command": command, "versions": package_versions(), "rows": rows})
    defects = sorted({d for r in rows for d in r["per_defect_image_auroc"]})
    lines = ["# MTD diagnosis: per-defect image AUROC, score vs acquisition group", "", f"`{command}`", "",
             "| model | image AUROC | pixel AUROC | " + " | ".join(defects) + " | rho(score, group) normals | "
             "rho all |", "|---" * (len(defects) + 5) + "|"]
    for r in rows:
        lines.append(f"| {Path(r['model']).parent.name}/{Path(r['model']).name} | {r['image_auroc']:.4f} | "
                     f"{r['pixel_auroc']:.4f} | " + " | ".join(f"{r['per_defect_image_auroc'][d]:.3f}"
                                                            for d in defects)
                     + f" | {r['rho_score_group_normals']} | {r['rho_score_group_all']} |")
    lines += ["", "median normal score by group: " + "; ".join(
        f"{Path(r['model']).parent.name}: {r['median_normal_score_by_group']}" for r in rows)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
