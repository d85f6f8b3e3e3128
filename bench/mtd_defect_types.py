"""Where do a model's pixel errors come from? Per defect type, and the sources of false positives (MTD by default).

MTD's pooled pixel metrics mix five defect types of very different size (Blowhole and Crack cover
under 1 % of a tile, Uneven about a quarter) with the defect-free test tiles. For each ONNX model
this reports, on the test split:

- per defect type, image AUROC, pixel AUROC and AUPRO of that type's tiles with every defect-free tile
  (``good``; one recipe category, the defect type as the reader records it);
- at the pooled thresholds where the false-positive rate over all normal test pixels is 0.01, 0.05,
  0.1 and 0.3: which tiles the false-positive pixels lie on (defect-free tiles, or the normal part of
  each type's defective tiles), and each type's mean region overlap (the PRO of AUPRO, per type).

A model whose false positives sit on defective tiles raises its map over the whole tile when a
defect is present: good for the image score, costly for the pooled AUPRO.

Run: .venv/bin/python bench/mtd_defect_types.py --onnx stfpm=bench/work/a/stfpm/bench.onnx \
    --onnx rd=bench/work/b/rd/bench.onnx [--recipe recipes/mtd_stfpm.yaml] --out bench/results/mtd_defect_types
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from qtool.artifacts import bench_meta, sha256_file, versions_line, write_results
from qtool.data import ImageTransform
from qtool.data.datasets import load_splits
from qtool.errors import QtoolError
from qtool.evaluate import OnnxPredictor, predict
from qtool.metrics import aupro, defect_regions, image_auroc, pixel_auroc

ROOT = Path(__file__).resolve().parents[1]
FREE = "good"
FPRS = (0.01, 0.05, 0.1, 0.3)


def per_type(types: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray) -> dict[str, dict]:
    """Image AUROC, pixel AUROC and AUPRO of each defect type's tiles together with every defect-free tile."""
    out = {}
    for t in sorted(set(types.tolist()) - {FREE}):
        sel = (types == t) | (types == FREE)
        labels = (types[sel] != FREE).astype(int)
        out[t] = {"n": int((types == t).sum()), "image_auroc": image_auroc(labels, scores[sel]),
                  "pixel_auroc": pixel_auroc(masks[sel], maps[sel]), "aupro": aupro(masks[sel], maps[sel])}
    return out


def fp_sources(types: np.ndarray, masks: np.ndarray, maps: np.ndarray, fprs=FPRS) -> list[dict]:
    """At each pooled FPR: the share of false-positive pixels on each tile type and each type's mean region overlap.

    The threshold is the (1 - fpr) quantile of every normal test pixel's map value (all tiles).
    """
    defect = masks > 0
    normal = maps[~defect]
    labels = [defect_regions(mask > 0) for mask in masks]
    rows = []
    for fpr in fprs:
        th = float(np.quantile(normal, 1.0 - fpr))
        above = maps >= th
        fp = {t: int((above[types == t] & ~defect[types == t]).sum()) for t in sorted(set(types.tolist()))}
        total = max(1, sum(fp.values()))
        overlap: dict[str, list[float]] = {}
        for i, (labeled, sizes) in enumerate(labels):
            if len(sizes) > 1:  # the share of each region above the threshold
                hit = np.bincount(labeled[above[i]], minlength=len(sizes))
                overlap.setdefault(str(types[i]), []).extend((hit[1:] / sizes[1:]).tolist())
        rows.append({"fpr": fpr, "threshold": th, "fp_share": {t: v / total for t, v in fp.items()},
                     "region_overlap": {t: float(np.mean(v)) for t, v in sorted(overlap.items())},
                     "regions": {t: len(v) for t, v in sorted(overlap.items())}})
    return rows


def bench(name: str, onnx: Path, splits, transform, threads: int) -> dict:
    """Test maps of one model, its pooled metrics, per-type metrics and false-positive sources."""
    types = np.array([s.defect for s in splits.test])
    maps, scores, masks, _ = predict(OnnxPredictor(onnx, threads=threads), splits.test, transform, 16)
    labels = (types != FREE).astype(int)
    pooled = {"image_auroc": image_auroc(labels, scores), "pixel_auroc": pixel_auroc(masks, maps),
              "aupro": aupro(masks, maps)}
    print(name, pooled, flush=True)
    return {"model": name, "onnx": str(onnx), "sha256": sha256_file(onnx), "pooled": pooled,
            "per_type": per_type(types, scores, masks, maps), "fp_sources": fp_sources(types, masks, maps)}


def write_markdown(path: Path, meta: dict, results: list[dict]) -> None:
    """Per-type table of all models, then each model's false-positive sources."""
    types = sorted(results[0]["per_type"])
    lines = ["# MTD errors by defect type (fp32 or quantized ONNX, test split)", "", f"`{meta['command']}`", "",
             f"machine: {meta['machine']}; test: {meta['n_test']} tiles; per type: that type's tiles with all "
             "defect-free tiles", "", "## Pooled and per defect type (image AUROC / pixel AUROC / AUPRO)", "",
             "| model | pooled | " + " | ".join(f"{t} (n={results[0]['per_type'][t]['n']})" for t in types) + " |",
             "|---|---|" + "---|" * len(types)]
    fmt = "{image_auroc:.3f} / {pixel_auroc:.3f} / {aupro:.3f}"
    for r in results:
        lines.append(f"| {r['model']} | {fmt.format(**r['pooled'])} | "
                     + " | ".join(fmt.format(**r["per_type"][t]) for t in types) + " |")
    tiles = [FREE, *types]
    for r in results:
        lines += ["", f"## {r['model']}: where the false positives lie, and region overlap per type", "",
                  f"`{r['onnx']}`", "",
                  "| pooled FPR | FP share: " + " | ".join(tiles) + " | overlap: " + " | ".join(types) + " |",
                  "|---|" + "---|" * (len(tiles) + len(types))]
        for row in r["fp_sources"]:
            lines.append(f"| {row['fpr']:g} | " + " | ".join(f"{row['fp_share'].get(t, 0.0):.2f}" for t in tiles)
                         + " | " + " | ".join(f"{row['region_overlap'].get(t, float('nan')):.2f}" for t in types)
                         + " |")
    lines += ["", versions_line(meta["versions"])]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, evaluate every model, write the results."""
    from qtool.recipe import load_recipe

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", action="append", required=True, metavar="NAME=PATH", help="a model (repeatable)")
    ap.add_argument("--recipe", default=str(ROOT / "recipes/mtd_stfpm.yaml"), help="data section and split")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/mtd_defect_types"))
    args = ap.parse_args(argv)
    models = []
    for spec in args.onnx:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_file():
            ap.exit(1, f"error: --onnx {spec!r}: expected NAME=PATH of an existing ONNX file\n")
        models.append((name, Path(path)))
    try:
        recipe = load_recipe(Path(args.recipe))
        splits = load_splits(recipe.data)
        transform = ImageTransform(recipe.data)
        results = [bench(name, path, splits, transform, args.threads) for name, path in models]
    except QtoolError as e:
        ap.exit(1, f"error: {e}\n")
    meta = bench_meta("bench/mtd_defect_types.py", argv, n_test=len(splits.test))
    write_results(Path(args.out), {"meta": meta, "results": results}, lambda p: write_markdown(p, meta, results))


if __name__ == "__main__":
    main()
