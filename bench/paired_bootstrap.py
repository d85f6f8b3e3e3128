"""Paired, stratified bootstrap over test images: is one model's test AUROC really above another's.

The first ``--onnx`` is the anchor A; every other model B is compared with it. All are run once on
the recipe's test split (ONNX Runtime CPU; the images are read once). Each bootstrap round draws the
normal and the defective test images with replacement (separately, and per category, so both classes
stay present in each) and scores both models on the same draw: image AUROC, and pixel AUROC from per-image
histograms of defect and normal pixels (``--bins`` equal bins per model over its map range; pairs in
one bin count one half, as ``qtool.metrics.pixel_auroc`` above its exact limit). Reported per
metric and B: both values on the full test split, the difference B - A, its 95 % percentile
interval, and the share of rounds in which B >= A. AUPRO too with ``metrics`` including ``aupro``
(``--aupro`` in ``bench/map_aware_bootstrap.py``): each image's part of the PRO curve on ``--bins``
binned thresholds (:func:`qtool.metrics.pro_tables`) is computed once, so a round's AUPRO is a weighted
sum (binned; the full-split value in the rows is the exact one).

Several training seeds per model: repeat a name (``--onnx stfpm=seed0.onnx --onnx stfpm=seed1.onnx``).
A model's value is then the mean over its seeds, and each round also redraws every model's seeds
with replacement (a two-level bootstrap: test images and training runs), so the interval covers
the seed-to-seed spread as well as the test sample. The rows also give each seed's full-split value.

Run: .venv/bin/python bench/paired_bootstrap.py --onnx stfpm=bench/work/models-s8/stfpm/bench.onnx \
         --onnx rd=bench/work/models-s8/rd/bench.onnx [--recipe recipes/mtd_stfpm.yaml] [--rounds 1000]
     (a name given more than once: that model's seeds)
Writes PATH.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from qtool.artifacts import bench_meta, sha256_file, versions_line, write_results
from qtool.commands.common import fail_cleanly
from qtool.data import ImageTransform
from qtool.data.datasets import load_splits
from qtool.evaluate import OnnxPredictor
from qtool.metrics import (
    aupro,
    aupro_from_tables,
    auroc_from_counts,
    image_auroc,
    pixel_auroc,
    pixel_histograms,
    pro_tables,
)
from qtool.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("image_auroc", "pixel_auroc")
WITH_AUPRO = (*METRICS, "aupro")


def categories(labels: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Each test image's category; without ``groups``, one category for all."""
    return np.zeros(len(labels), int) if groups is None else groups


def draws(labels: np.ndarray, rounds: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """(rounds, N) multiplicities of a stratified bootstrap: normals and anomalies of each category apart."""
    rng = np.random.default_rng(seed)
    groups = categories(labels, groups)
    w = np.zeros((rounds, len(labels)), np.float64)
    for g in np.unique(groups):
        for cls in (0, 1):
            idx = np.flatnonzero((labels == cls) & (groups == g))
            for r in range(rounds):
                np.add.at(w[r], rng.choice(idx, size=idx.size, replace=True), 1.0)
    return w


def weighted_image_auroc(labels: np.ndarray, scores: np.ndarray, w: np.ndarray) -> float:
    """Image AUROC with each image counted ``w`` times."""
    from sklearn.metrics import roc_auc_score

    keep = w > 0
    return float(roc_auc_score(labels[keep], scores[keep], sample_weight=w[keep]))


def _round_aupros(tables, w: np.ndarray) -> list[float]:
    """Binned AUPRO of each round of image weights ``w`` (R, N) from one category's :func:`pro_tables`."""
    out = []
    for i in range(0, len(w), 100):
        wr = w[i : i + 100]
        fp, ov = wr @ tables.false_positives, wr @ tables.overlap
        nok, nreg = wr @ tables.normals, wr @ tables.regions
        out += [aupro_from_tables(fp[j], ov[j], nok[j], nreg[j]) for j in range(len(wr))]
    return out


def bootstrap(outputs: dict[str, tuple[np.ndarray, np.ndarray]], masks: np.ndarray, labels: np.ndarray,
              rounds: int, bins: int, seed: int, groups: np.ndarray | None = None,
              metrics: tuple[str, ...] = METRICS) -> dict[str, dict[str, np.ndarray]]:
    """Per ONNX file, per metric: the ``rounds`` bootstrap values (the same image draws for every file).

    With ``groups`` (each test image's category) a value is the mean over categories of the
    per-category AUROC (and AUPRO, when ``metrics`` has it), as ``qtool eval`` reports it; one category:
    the plain value.
    """
    groups = categories(labels, groups)
    w = draws(labels, rounds, seed, groups)
    m = masks.astype(bool)
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, (maps, scores) in outputs.items():
        img, pix, pro = [], [], []
        for g in np.unique(groups):
            sel = groups == g
            lo, hi = float(maps.min()), float(maps.max())
            pos, neg = pixel_histograms(m[sel], maps[sel], bins, lo, hi)
            wg, per = w[:, sel], []
            for i in range(0, rounds, 100):  # (100, N) @ (N, bins) at a time: bounded memory
                p, n = wg[i : i + 100] @ pos, wg[i : i + 100] @ neg
                per += [auroc_from_counts(p[j], n[j]) for j in range(len(p))]
            pix.append(per)
            img.append([weighted_image_auroc(labels[sel], scores[sel], wr) for wr in wg])
            if "aupro" in metrics:
                pro.append(_round_aupros(pro_tables(m[sel], maps[sel], bins, lo, hi), wg))
        out[name] = {"image_auroc": np.mean(img, axis=0), "pixel_auroc": np.mean(pix, axis=0),
                     **({"aupro": np.mean(pro, axis=0)} if "aupro" in metrics else {})}
    return out


def model_outputs(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(maps as float32, scores) of the ONNX model ``path`` on ``images``, 8 at a time."""
    predictor = OnnxPredictor(Path(path))
    runs = [predictor(images[i : i + 8]) for i in range(0, len(images), 8)]
    return np.concatenate([m for m, _ in runs]).astype(np.float32), np.concatenate([s for _, s in runs])


def run_models(paths: list[str], splits, transform) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]],
                                                              np.ndarray, np.ndarray, np.ndarray]:
    """Each ONNX file on the test split: ({path: (maps, scores)}, masks, labels, categories); images read once."""
    images = np.stack([transform.image(s.path) for s in splits.test])
    masks = np.stack([transform.mask(s) for s in splits.test]).astype(np.uint8)
    outputs = {path: model_outputs(Path(path), images) for path in paths}
    return (outputs, masks, np.array([s.label for s in splits.test]),
            np.array([s.category for s in splits.test]))


def seed_means(boot: dict[str, dict[str, np.ndarray]], models: dict[str, list[str]], rounds: int,
               seed: int, metrics: tuple[str, ...] = METRICS) -> dict[str, dict[str, np.ndarray]]:
    """Per model, per metric: each round's mean over its seeds, redrawn with replacement (one seed: itself)."""
    rng = np.random.default_rng(seed + 1)  # apart from the image draws
    out = {}
    for name, paths in models.items():
        pick = rng.integers(0, len(paths), size=(rounds, len(paths))) if len(paths) > 1 else np.zeros((rounds, 1), int)
        out[name] = {m: np.take_along_axis(np.stack([boot[p][m] for p in paths], axis=1), pick, axis=1).mean(axis=1)
                     for m in metrics}
    return out


def compare(outputs: dict[str, tuple[np.ndarray, np.ndarray]], models: dict[str, list[str]], masks: np.ndarray,
            labels: np.ndarray, rounds: int, bins: int, seed: int, groups: np.ndarray | None = None,
            anchors: list[str] | None = None, metrics: tuple[str, ...] = METRICS) -> list[dict]:
    """Rows of every model B against the anchor A, per metric (see the module).

    ``anchors``: the models that are each an anchor in turn, against every other model, on the same
    bootstrap rounds (default: the first model only). ``metrics``: :data:`METRICS` or :data:`WITH_AUPRO`.
    """
    groups = categories(labels, groups)
    cats = [groups == g for g in np.unique(groups)]
    full = {p: {k: float(np.mean(v)) for k, v in by_category(m, s, masks, labels, cats, metrics).items()}
            for p, (m, s) in outputs.items()}
    boot = seed_means(bootstrap(outputs, masks, labels, rounds, bins, seed, groups, metrics), models, rounds, seed,
                      metrics)
    pairs = [(a, b) for a in (anchors or list(models)[:1]) for b in models if b != a]
    rows = []
    for a, b in pairs:
        for metric in metrics:
            d = boot[b][metric] - boot[a][metric]
            lo, hi = np.percentile(d, [2.5, 97.5])
            values = {n: [full[p][metric] for p in models[n]] for n in (a, b)}
            a_value, b_value = (float(np.mean(values[n])) for n in (a, b))
            rows.append({"metric": metric, "a": a, "b": b, "a_value": a_value, "b_value": b_value,
                         "a_seeds": values[a], "b_seeds": values[b],
                         "difference": b_value - a_value, "ci95": [float(lo), float(hi)],
                         "share_b_at_least_a": float(np.mean(d >= 0))})
    return rows


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the models, bootstrap, write the results."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", action="append", required=True, metavar="NAME=PATH",
                    help="the anchor A, then one or more models B")
    ap.add_argument("--recipe", default=str(ROOT / "recipes/mtd_stfpm.yaml"), help="data section and split")
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--bins", type=int, default=1 << 14)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    models: dict[str, list[str]] = {}
    for o in args.onnx:
        name, sep, path = o.partition("=")
        if not sep or not name or not path:
            sys.exit(f"error: --onnx {o!r}: expected NAME=PATH")
        if path in models.get(name, []):
            sys.exit(f"error: --onnx {o!r} given twice")
        models.setdefault(name, []).append(path)
    if len(models) < 2:
        sys.exit("error: give at least two --onnx NAME=PATH with distinct names (the anchor A, then B)")
    recipe = load_recipe(Path(args.recipe))
    paths = [p for ps in models.values() for p in ps]
    outputs, masks, labels, groups = run_models(paths, load_splits(recipe.data), ImageTransform(recipe.data))
    rows = compare(outputs, models, masks, labels, args.rounds, args.bins, args.seed, groups)
    per_category = category_values(outputs, models, masks, labels, groups)
    meta = bench_meta("bench/paired_bootstrap.py", argv, rounds=args.rounds, bins=args.bins, seed=args.seed,
                      n_test=len(labels), n_defective=int(labels.sum()))
    payload = {"meta": meta, "models": {n: [{"onnx": p, "sha256": sha256_file(Path(p))} for p in ps]
                                        for n, ps in models.items()}, "rows": rows, "per_category": per_category}

    def markdown(path: Path) -> None:
        lines = [f"# Paired bootstrap against {next(iter(models))} on the test split", "", f"`{meta['command']}`", "",
                 f"machine: {meta['machine']}; {len(labels)} test images ({int(labels.sum())} defective); "
                 f"{args.rounds} stratified rounds, seed {args.seed}; pixel AUROC over {args.bins} bins per model", "",
                 *table(rows), "", "Per category (full test split; the values above are their means):", "",
                 *category_table(per_category), "", versions_line(meta["versions"])]
        path.write_text("\n".join(lines) + "\n")

    write_results(Path(args.out), payload, markdown)
    for r in rows:
        print(r)


def by_category(maps: np.ndarray, scores: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                cats: list[np.ndarray], metrics: tuple[str, ...] = METRICS) -> dict[str, list[float]]:
    """Each metric of one model on the full test split, one value per category (``cats``: boolean selections)."""
    return {"image_auroc": [image_auroc(labels[c], scores[c]) for c in cats],
            "pixel_auroc": [pixel_auroc(masks[c], maps[c]) for c in cats],
            **({"aupro": [aupro(masks[c], maps[c]) for c in cats]} if "aupro" in metrics else {})}


def category_values(outputs: dict[str, tuple[np.ndarray, np.ndarray]], models: dict[str, list[str]],
                    masks: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict[str, dict[str, dict]]:
    """Per category: its image counts and, per model, each metric on the full test split (mean over seeds)."""
    groups = categories(labels, groups)
    names = np.unique(groups)
    cats = [groups == g for g in names]
    values = {p: by_category(m, s, masks, labels, cats) for p, (m, s) in outputs.items()}
    return {str(g): {"images": int(c.sum()), "defective": int(labels[c].sum()),
                     **{name: {k: float(np.mean([values[p][k][i] for p in paths])) for k in METRICS}
                        for name, paths in models.items()}}
            for i, (g, c) in enumerate(zip(names, cats))}


def category_table(per_category: dict[str, dict[str, dict]]) -> list[str]:
    """Markdown lines: one row per category and metric, one column per model."""
    names = [k for k in next(iter(per_category.values())) if k not in ("images", "defective")]
    lines = [f"| category (images, defective) | metric | {' | '.join(names)} |", "|---|---|" + "---|" * len(names)]
    for g, v in per_category.items():
        lines += [f"| {g} ({v['images']}, {v['defective']}) | {m} | " + " | ".join(f"{v[n][m]:.4f}" for n in names)
                  + " |" for m in METRICS]
    return lines


def table(rows: list[dict]) -> list[str]:
    """Markdown table lines of comparison rows (values are seed means; each seed's value when there are several)."""
    lines = ["| metric | A | B | A value | B value | B - A | 95 % interval | rounds with B >= A | A seeds | B seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def seeds(values: list[float] | None) -> str:
        return ", ".join(f"{v:.4f}" for v in values) if values and len(values) > 1 else "-"

    return lines + [f"| {r['metric']} | {r['a']} | {r['b']} | {r['a_value']:.4f} | {r['b_value']:.4f} | "
                    f"{r['difference']:+.4f} | [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] | "
                    f"{r['share_b_at_least_a']:.1%} | {seeds(r.get('a_seeds'))} | {seeds(r.get('b_seeds'))} |"
                    for r in rows]


if __name__ == "__main__":
    fail_cleanly(main)()  # a bad recipe, override, image or model: one line, non-zero exit, nothing written
