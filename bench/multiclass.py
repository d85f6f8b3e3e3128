"""Unified vs one-class, and DCAM vs no DCAM (the seed papers' claims), measured on a multi-class set.

The set is recipes/multiclass.yaml: MTD + brick, grass, gravel with synthesized defects.

Three trainings from the same recipe and seed (resumable; work under bench/work/multiclass):
unified STFPM, one STFPM per category, unified STFPM + DCAM. Each is evaluated per category on the
same test split (one-class: each category by its own model). Writes bench/results/multiclass.{json,md}.

Run: .venv/bin/python bench/multiclass.py [--epochs N] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from qtool.artifacts import package_versions, write_json
from qtool.recipe import load_recipe
from qtool.runs import run_eval, run_train

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "unified": ["train.mode=unified"],
    "one-class": ["train.mode=one-class"],
    "unified+dcam": ["train.mode=unified", "model.dcam.enabled=true"],
}
KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


def evaluate_variant(summary: dict, recipe) -> dict:
    """Per-category metrics; a one-class model is evaluated on its own category only."""
    per_cat: dict[str, dict] = {}
    for m in summary["models"]:
        r = recipe if m["category"] == "all" else _only_category(recipe, m["category"])
        res = run_eval(Path(m["onnx"]), r)
        per_cat.update({c: {k: v.get(k) for k in KEYS} for c, v in res["metrics"]["per_category"].items()})
    return per_cat


def _only_category(recipe, category):
    """Restrict the multi-dataset recipe to one category (the MTD part or one texture)."""
    data = recipe.data
    if category == "mtd":
        return recipe.model_copy(update={"data": data.model_copy(update={"include": []})})
    inc = [i.model_copy(update={"categories": [category]}) for i in data.include]
    return recipe.model_copy(update={"data": inc[0].model_copy(update={
        k: getattr(data, k) for k in ("image_size", "resize", "normalize", "scale_ref")})})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/multiclass.yaml")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    base = list(args.overrides) + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    rows = {}
    for name in args.variants.split(","):
        over = base + VARIANTS[name]
        recipe = load_recipe(args.recipe, over)
        t0 = time.perf_counter()
        summary = run_train(recipe, HERE / "work" / "multiclass" / name)
        train_s = sum(m["train_seconds"] for m in summary["models"])
        per_cat = evaluate_variant(summary, recipe)
        mean = {k: round(sum(v[k] for v in per_cat.values() if v[k] is not None) /
                         max(1, sum(v[k] is not None for v in per_cat.values())), 4) for k in KEYS}
        rows[name] = {"per_category": per_cat, "mean": mean, "train_seconds": round(train_s, 1),
                      "models": len(summary["models"]), "wall_seconds": round(time.perf_counter() - t0, 1)}
        print(name, json.dumps(rows[name]["mean"]), flush=True)
    cmd = "python bench/multiclass.py " + " ".join(
        [f"--recipe {args.recipe}"] + ([f"--epochs {args.epochs}"] if args.epochs else [])
        + [f"--set {o}" for o in args.overrides])
    meta = {"command": cmd, "machine": platform.processor() or platform.machine(), "versions": package_versions()}
    write_json(HERE / "results" / "multiclass.json", {"meta": meta, "rows": rows})
    cats = sorted({c for r in rows.values() for c in r["per_category"]})
    lines = ["# Unified vs one-class, DCAM vs none (STFPM, Lite0 teacher)", "", f"`{cmd}`", "",
             "| variant | models | train s | " + " | ".join(f"{c} img/pix AUROC" for c in cats)
             + " | mean image AUROC | mean pixel AUROC | mean AUPRO |", "|---" * (len(cats) + 6) + "|"]
    for name, r in rows.items():
        cells = [f"{r['per_category'][c]['image_auroc']:.3f} / {r['per_category'][c]['pixel_auroc']:.3f}"
                 if c in r["per_category"] else "-" for c in cats]
        lines.append(f"| {name} | {r['models']} | {r['train_seconds']} | " + " | ".join(cells)
                     + f" | {r['mean']['image_auroc']} | {r['mean']['pixel_auroc']} | {r['mean']['aupro']} |")
    (HERE / "results" / "multiclass.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
