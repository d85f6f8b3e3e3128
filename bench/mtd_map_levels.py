"""Which levels (blur, combiner) should feed an MTD model's anomaly map? Each variant on the proxy and on test.

For each trained checkpoint: one forward per batch captures the head's inputs (teacher and student
features); a head rebuilt with each ``map_levels`` subset (the model's own distance, combiner and
blur, unless ``--sigmas`` / ``--combines`` name others) then maps the same features. Reported
per variant: the proxy (image and pixel AUROC of synthetic anomalies made from the held-out
normals, never the test split) and the test metrics.
Also the mean and standard deviation of each level's distance over training normals: an
unweighted sum follows the level with the largest distances, whether or not it separates.

Selection rule, fixed before the subsets were compared: the variant with the highest proxy pixel
AUROC (ties: proxy image AUROC). The test columns are reported for every subset so the rule can be
judged; they choose nothing.

Run: .venv/bin/python bench/mtd_map_levels.py --model stfpm=bench/work/mtd-stfpm/model.pt \
    --model rd=bench/work/models/rd/model.pt [--subsets 3,2+3] [--sigmas 0,2,4,8] [--combines sum,product]
Writes bench/results/mtd_map_levels.{json,md} (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qtool.artifacts import bench_meta, sha256_file, versions_line, write_results
from qtool.commands.common import fail_cleanly
from qtool.data import ImageTransform
from qtool.data.datasets import load_splits
from qtool.metrics import aupro, image_auroc, pixel_auroc
from qtool.models import build_model, load_checkpoint
from qtool.models.head import COMBINERS
from qtool.proxy import proxy_rank, separation
from qtool.recipe import ModelConfig, load_recipe
from qtool.search import search_set_from_arrays

ROOT = Path(__file__).resolve().parents[1]


class Mapper:
    """Captures a model's head inputs and maps them with one head per level subset."""

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, size: int, subsets: list[list[int]] | None = None,
                 sigmas: list[float] | None = None, combines: list[str] | None = None) -> None:
        self.model, self.levels, self.inputs = model, list(cfg.levels), None
        every = [list(c) for r in range(len(self.levels), 0, -1) for c in itertools.combinations(self.levels, r)]
        own = [model.head.blur.sigma if model.head.blur is not None else 0.0]
        self.variants = [(sub, sigma, combine) for sub in (subsets or every) for sigma in (sigmas or own)
                         for combine in (combines or [model.head.combine_name])]
        self.heads = {}
        for sub, sigma, combine in self.variants:
            opts = {**cfg.options, "map_levels": sub, "map_sigma": sigma, "map_combine": combine}
            self.heads[(tuple(sub), sigma, combine)] = build_model(
                cfg.model_copy(update={"options": opts, "weights": "none"}), size).head.eval()
        model.head.register_forward_hook(self._capture)

    def _capture(self, module, args, output) -> None:
        self.inputs = args

    @torch.no_grad()
    def maps(self, images: np.ndarray, batch: int = 16) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
        """Per subset: (maps (N,S,S) float32, scores (N,))."""
        out: dict[tuple, list] = {k: [] for k in self.heads}
        for i in range(0, len(images), batch):
            self.model(torch.from_numpy(np.asarray(images[i : i + batch])))
            for k, head in self.heads.items():
                m, s = head(*self.inputs)
                out[k].append((m[:, 0].numpy(), s.numpy()))
        return {k: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v])) for k, v in out.items()}

    @torch.no_grad()
    def level_stats(self, images: np.ndarray, batch: int = 16) -> list[dict[str, float]]:
        """Mean and std of each level's (un-upsampled) distance over ``images``."""
        vals: list[list[np.ndarray]] = [[] for _ in self.levels]
        head = self.model.head
        for i in range(0, len(images), batch):
            self.model(torch.from_numpy(np.asarray(images[i : i + batch])))
            t, s = self.inputs
            for j in range(len(self.levels)):
                vals[j].append(head._distance(t[j], s[j]).sum(1).flatten().numpy())
        return [{"level": lv, "mean": float(np.concatenate(v).mean()), "std": float(np.concatenate(v).std())}
                for lv, v in zip(self.levels, vals)]


def bench(name: str, ckpt: Path, splits, transform, search, test, subsets=None, sigmas=None, combines=None) -> dict:
    """Proxy and test metrics of every (level subset, map sigma, combiner) variant of one checkpoint."""
    t0 = time.perf_counter()
    model, meta = load_checkpoint(ckpt)
    cfg = ModelConfig.model_validate(meta["model"])
    mapper = Mapper(model, cfg, int(meta["image_size"]), subsets, sigmas, combines)
    train_imgs = np.stack([transform.image(s.path) for s in splits.train[::5]])
    stats = mapper.level_stats(train_imgs)
    proxy = mapper.maps(search.images)
    images, masks, labels = test
    tested = mapper.maps(images)
    rows = []
    for sub, sigma, combine in mapper.variants:
        pm, ps = proxy[(tuple(sub), sigma, combine)]
        tm, ts = tested[(tuple(sub), sigma, combine)]
        sep = separation(pm, ps, search.masks, search.labels)
        rows.append({"map_levels": sub, "map_sigma": sigma, "map_combine": combine,
                     "proxy_image_auroc": sep["image_auroc"],
                     "proxy_pixel_auroc": sep["pixel_auroc"],
                     "image_auroc": image_auroc(labels, ts), "pixel_auroc": pixel_auroc(masks, tm),
                     "aupro": aupro(masks, tm)})
        print(name, rows[-1], flush=True)
    best = max(rows, key=proxy_rank)
    chosen = {k: best[k] for k in ("map_levels", "map_sigma", "map_combine")}
    return {"model": name, "checkpoint": str(ckpt), "sha256": sha256_file(ckpt), "options": cfg.options,
            "levels": cfg.levels, "combine": model.head.combine_name,
            "map_sigma": model.head.blur.sigma if model.head.blur is not None else 0.0,
            "level_stats_train_normals": stats, "subsets": rows, "proxy_choice": chosen,
            "seconds": time.perf_counter() - t0}


def write_markdown(path: Path, meta: dict, results: list[dict]) -> None:
    """The table of every model's subsets, the proxy's choice marked."""
    lines = ["# Which levels, blur and combiner feed the anomaly map (MTD, fp32)", "", f"`{meta['command']}`", "",
             f"machine: {meta['machine']}; proxy: {meta['proxy']}; rule: {meta['rule']}", ""]
    for r in results:
        stats = ", ".join(f"level {s['level']} {s['mean']:.3f} +- {s['std']:.3f}"
                          for s in r["level_stats_train_normals"])
        lines += [f"## {r['model']} ({r['combine']} of levels; checkpoint's map blur sigma {r['map_sigma']:g})", "",
                  f"`{r['checkpoint']}`; distance on training normals (mean +- std): {stats}", "",
                  "| map_levels | map_sigma | map_combine | proxy image | proxy pixel | image AUROC | pixel AUROC "
                  "| AUPRO | |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in r["subsets"]:
            picked = all(row[k] == v for k, v in r["proxy_choice"].items())
            marks = (("proxy's choice", picked), ("all levels", row["map_levels"] == r["levels"]))
            mark = "; ".join(m for m, hit in marks if hit)
            lines.append(f"| {row['map_levels']} | {row['map_sigma']:g} | {row['map_combine']} | "
                         f"{row['proxy_image_auroc']:.4f} | "
                         f"{row['proxy_pixel_auroc']:.4f} | "
                         f"{row['image_auroc']:.4f} | {row['pixel_auroc']:.4f} | {row['aupro']:.4f} | {mark} |")
        lines.append("")
    lines.append(versions_line(meta["versions"]))
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, score every subset of every model, write the results."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="name=checkpoint.pt")
    ap.add_argument("--recipe", default=str(ROOT / "recipes/mtd_stfpm.yaml"), help="data section and split")
    ap.add_argument("--normals", type=int, default=0, help="proxy normals (0: every held-out normal)")
    ap.add_argument("--subsets", type=lambda v: [[int(x) for x in g.split("+")] for g in v.split(",")], default=None,
                    help="level subsets to try, e.g. 3,2+3 (default: every non-empty subset)")
    ap.add_argument("--sigmas", type=lambda v: [float(x) for x in v.split(",")], default=None,
                    help="map blur sigmas to try, e.g. 0,2,4,8 (default: the checkpoint's own)")
    ap.add_argument("--combines", type=lambda v: v.split(","), default=None,
                    help="level combiners to try, e.g. sum,product (default: the checkpoint's own)")
    ap.add_argument("--kinds", default="patch,scratch,noise", help="synthetic anomaly kinds of the proxy")
    ap.add_argument("--out", default=str(ROOT / "bench/results/mtd_map_levels"))
    args = ap.parse_args(argv)
    unknown = [c for c in args.combines or [] if c not in COMBINERS]
    if unknown:
        sys.exit(f"error: --combines {','.join(args.combines)}: expected names among {', '.join(COMBINERS.names())}")
    torch.set_num_threads(2)
    recipe = load_recipe(Path(args.recipe))
    splits = load_splits(recipe.data)
    transform = ImageTransform(recipe.data)
    pool = splits.holdout[: args.normals or None]
    normals = np.stack([transform.image(s.path) for s in pool])
    search = search_set_from_arrays(normals, args.kinds.split(","), 0, [str(s.path) for s in pool])
    test = (np.stack([transform.image(s.path) for s in splits.test]),
            np.stack([transform.mask(s) for s in splits.test]), np.array([s.label for s in splits.test]))
    pairs = [m.split("=", 1) for m in args.model]
    results = [bench(name, Path(path), splits, transform, search, test, args.subsets, args.sigmas, args.combines)
               for name, path in pairs]
    meta = bench_meta("bench/mtd_map_levels.py", argv, n_test=len(splits.test),
                      proxy=f"{len(pool)} held-out normals + one synthetic anomaly each "
                            f"({args.kinds.replace(',', ', ')}; seed 0)",
                      rule="highest proxy pixel AUROC, ties by proxy image AUROC (fixed before comparing)",
                      subsets=args.subsets, sigmas=args.sigmas, combines=args.combines)
    write_results(Path(args.out), {"meta": meta, "results": results}, lambda p: write_markdown(p, meta, results))


if __name__ == "__main__":
    fail_cleanly(main)()  # a bad option, recipe or checkpoint: one line, non-zero exit, nothing written
