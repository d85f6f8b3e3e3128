"""Side-by-side ONNX Runtime CPU latency of several ONNX files, interleaved round by round.

Uses the timing of ``bench/mtd_models.py`` (batch 1, fixed random image, thread spinning off).

Run: .venv/bin/python bench/ort_latency.py --onnx NAME=model.onnx [--onnx ...] --size 256 --out PATH
Writes PATH.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtd_models import ort_latency_ms

from qtool.artifacts import bench_meta, sha256_file, write_results


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, time the models interleaved, write the results."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    models = {name: (Path(path), args.size) for name, path in (o.split("=", 1) for o in args.onnx)}
    latency = ort_latency_ms(models, args.threads, args.warmup, args.iters)
    rows = [{"name": n, "onnx": str(p), "sha256": sha256_file(p), **latency[n]} for n, (p, _) in models.items()]
    meta = bench_meta("bench/ort_latency.py", argv, threads=args.threads, iters=args.iters, size=args.size)

    def markdown(path: Path) -> None:
        lines = ["# ONNX Runtime CPU latency, interleaved", "", f"`{meta['command']}`", "",
                 f"machine: {meta['machine']}; threads {args.threads}; batch 1; median of {args.iters} rounds", "",
                 "| model | ms median | min | p90 |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['median_ms']} | {r['min_ms']} | {r['p90_ms']} |" for r in rows]
        path.write_text("\n".join(lines) + "\n")

    write_results(Path(args.out), {"meta": meta, "rows": rows}, markdown)
    for r in rows:
        print(r["name"], r["median_ms"], r["min_ms"], r["p90_ms"])


if __name__ == "__main__":
    main()
