"""Why plain STFPM fails on MTD: a training-free probe of preprocessing choices.

For each variant (geometry x normalisation x feature levels) the frozen ImageNet teacher embeds
train normals into a patch memory bank; a test image scores the max over positions of the
nearest-neighbour distance to that bank (a teacher-only "perfect student" proxy). Reported per
variant: image AUROC on the MTD test split, and how strongly normal-image scores follow the
acquisition group (Spearman rho of score vs exp index): the failure anomalib's STFPM showed.

Run: .venv/bin/python bench/mtd_preprocessing.py [--train 200] [--size 256]
Writes bench/results/mtd_preprocessing.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from qtool.artifacts import package_versions, write_json
from qtool.data import ImageTransform, load_splits
from qtool.models.backbones import build_backbone
from qtool.recipe import DataConfig

MTD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mtd"


def embed(extractor, transform, samples, levels_used, batch=16):
    feats = []
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            x = torch.from_numpy(np.stack([transform.image(s.path) for s in samples[i : i + batch]]))
            fs = extractor(x)
            size = fs[1].shape[-2:]  # common stride-8 grid keeps the NN search cheap
            f = torch.cat([F.interpolate(fs[j], size=size, mode="bilinear", align_corners=False)
                           for j in levels_used], 1)
            f = F.avg_pool2d(f, 3, 1, 1)
            feats.append(f)
    return torch.cat(feats)


def nn_scores(bank, test, chunk=4096):
    b = bank
    out = []
    for f in test:
        q = f.flatten(1).T
        d = torch.cat([torch.cdist(q[i : i + chunk], b).amin(1) for i in range(0, len(q), chunk)])
        out.append(float(d.max()))
    return np.array(out)


def group(path):
    m = re.match(r"exp(\d)", Path(path).name)
    return int(m.group(1)) if m else -1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--bank", type=int, default=10000)
    ap.add_argument("--resize", default="stretch,scale")
    ap.add_argument("--normalize", default="imagenet,per-image")
    args = ap.parse_args()
    torch.set_num_threads(2)
    extractor = build_backbone("tf_efficientnet_lite0", [1, 2, 3]).eval()
    rows = []
    variants = [(g, n, (0, 1)) for g in args.resize.split(",") for n in args.normalize.split(",")]
    for geometry, norm, levels in variants:
        t0 = time.perf_counter()
        cfg = DataConfig(format="mtd", root=str(MTD), image_size=args.size, resize=geometry, normalize=norm)
        splits = load_splits(cfg)
        tr = ImageTransform(cfg)
        rng = np.random.default_rng(0)
        train = [splits.train[i] for i in sorted(rng.choice(len(splits.train), args.train, replace=False))]
        bank = embed(extractor, tr, train, levels)
        bank = bank.permute(0, 2, 3, 1).reshape(-1, bank.shape[1])
        bank = bank[torch.from_numpy(rng.choice(len(bank), min(args.bank, len(bank)), replace=False))]
        test = embed(extractor, tr, splits.test, levels)
        scores = nn_scores(bank, test)
        labels = np.array([s.label for s in splits.test])
        normal = labels == 0
        rho = spearmanr([group(s.path) for s, n in zip(splits.test, normal) if n], scores[normal]).statistic
        row = {"resize": geometry, "normalize": norm, "levels": [lv + 1 for lv in levels],
               "image_auroc": round(float(roc_auc_score(labels, scores)), 4),
               "normal_score_vs_group_spearman": round(float(rho), 3),
               "seconds": round(time.perf_counter() - t0, 1)}
        print(row, flush=True)
        rows.append(row)
    out = Path(__file__).parent / "results"
    meta = {"command": "python bench/mtd_preprocessing.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
            "machine": platform.processor() or platform.machine(), "versions": package_versions(), "args": vars(args)}
    write_json(out / "mtd_preprocessing.json", {"meta": meta, "rows": rows})
    lines = ["# MTD preprocessing probe (teacher-feature nearest neighbour, no training)", "",
             f"`{meta['command']}`", "", "| resize | normalize | levels | image AUROC | score~group rho | s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['resize']} | {r['normalize']} | {r['levels']} | {r['image_auroc']} | "
              f"{r['normal_score_vs_group_spearman']} | {r['seconds']} |" for r in rows]
    (out / "mtd_preprocessing.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
