"""Re-score two cells of a grid under other synthetic anomalies: would that proxy rank them as the test does.

Map-aware's evidence gate compares two graphs on the search set's map distortion (paired bootstrap over its
images). This re-scores two cells' saved graphs (``ptq/model.onnx``) on search sets of the same normal images and
seed with anomalies of each given kind set (``Rescorer`` of ``bench/map_aware_rule_choice.py``), and reports per
kind set: both distortions, both separations and the evidence share of B over A (the gate's statistic), next to
the cells' test metrics (their ``cell.json``).

Run: .venv/bin/python bench/proxy_kinds_pair.py --setup bench/work/ma_c_rd/mtd-rd --a mse-bc-train-4bit
     --b maw-ev-train-4bit --kinds patch,scratch,noise --kinds crack,hole,stain --out bench/results/NAME
Writes NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from map_aware_rule_choice import Rescorer, read_json  # noqa: E402

from calibrators.evidence import EvidenceGate  # noqa: E402
from qtool.proxy import separation  # noqa: E402


def compare(setup: Path, a: str, b: str, kinds: list[str], threads: int) -> dict:
    """A's and B's proxy on anomalies of ``kinds``, and the share of resamples in which B distorts less."""
    rescorer, gate = Rescorer(kinds, threads), EvidenceGate(0.95)
    search, distortion = rescorer.search_set(setup / a / "ptq")
    row: dict = {"kinds": kinds}
    scored = {}
    for label, cell in (("a", a), ("b", b)):
        maps, scores = rescorer.outputs(setup / cell / "ptq" / "model.onnx", search)
        parts = distortion.parts(maps, scores)
        scored[label] = distortion.summary(parts)
        gate.record(scored[label], distortion, parts)
        row[label] = {**scored[label], **separation(maps, scores, search.masks, search.labels)}
    row["share_b_better"] = gate.share(scored["a"], scored["b"])
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", type=Path, required=True, help="WORK/SETUP of a bench/map_aware.py run")
    ap.add_argument("--a", required=True, help="cell folder name, e.g. mse-bc-train-4bit")
    ap.add_argument("--b", required=True)
    ap.add_argument("--kinds", action="append", required=True, help="comma-separated kinds; repeatable")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    test = {c: {k: read_json(args.setup / c / "cell.json").get(k) for k in ("image_auroc", "pixel_auroc", "aupro")}
            for c in (args.a, args.b)}
    rows = [compare(args.setup, args.a, args.b, [k.strip() for k in ks.split(",") if k.strip()], args.threads)
            for ks in args.kinds]
    payload = {"command": "python bench/proxy_kinds_pair.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "a": args.a, "b": args.b,
               "test": test, "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    lines = [f"# Proxy of two cells under other synthetic anomalies: {args.setup.name}", "",
             f"`{payload['command']}`", "",
             f"Test split: A = {args.a} " + ", ".join(f"{k} {v:.4f}" for k, v in test[args.a].items() if v is not None)
             + f"; B = {args.b} " + ", ".join(f"{k} {v:.4f}" for k, v in test[args.b].items() if v is not None), "",
             "| kinds | A distortion | B distortion | share B distorts less | A image / pixel | B image / pixel |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {', '.join(r['kinds'])} | {r['a']['loss']:.4f} | {r['b']['loss']:.4f} | "
                     f"{r['share_b_better']:.4f} | {r['a']['image_auroc']:.4f} / {r['a']['pixel_auroc']:.4f} | "
                     f"{r['b']['image_auroc']:.4f} / {r['b']['pixel_auroc']:.4f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
