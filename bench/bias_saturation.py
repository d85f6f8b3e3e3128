"""Which int32 biases of QAT-exported QDQ models sit at the int32 limit, and how far the clamp moved them.

PTQ grows a weight scale where ``input_scale * weight_scale`` would push a bias past int32
(:func:`qtool.graph.insert_qdq.grow_for_int32_bias`, onnxruntime's rule). A QAT run that learns scales
(``qat.learn: ranges``) can move them below that floor; its bias fake quantization then clamps at int32
exactly as the export does, so the exported graph is the trained model, but the clamped channel's bias
is not the one it learned. Per ``qat/model.onnx`` under the given folders: each quantized layer with a
saturated int32 bias, how many channels, and the learned (latent, from ``qat.pt``) against the exported
float bias of each of them.

Run: .venv/bin/python bench/bias_saturation.py --runs 'bench/work/pool_s*/*/mapdw-in8-*/qat' \
         --out bench/results/qat_bias_saturation
Writes PATH.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from qtool.artifacts import bench_meta, versions_line, write_results

INT32_LIMIT = 2**31 - 1


def saturated_biases(run: Path) -> list[dict]:
    """Per quantized layer of ``run/model.onnx`` with int32 biases at the limit: channels, learned and exported."""
    model = onnx.load(str(run / "model.onnx"))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    latent = torch.load(run / "qat.pt", map_location="cpu", weights_only=True)["qat_state_dict"]
    out = []
    for node in model.graph.node:
        dq = producer.get(node.input[2]) if len(node.input) > 2 else None
        if dq is None or dq.op_type != "DequantizeLinear" or init.get(dq.input[0]) is None:
            continue
        q = init[dq.input[0]]
        hit = np.flatnonzero(np.abs(q.astype(np.int64)) >= INT32_LIMIT) if q.dtype == np.int32 else []
        if not len(hit):
            continue
        exported = (q.astype(np.float64) * init[dq.input[1]].astype(np.float64).reshape(-1))[hit]
        name = module_name(node.name)
        learned = latent.get(f"{name}.parametrizations.bias.original")
        out.append({"layer": node.name, "channels": hit.tolist(), "exported": exported.tolist(),
                    "learned": None if learned is None else learned.double().numpy()[hit].tolist()})
    return out


def module_name(node: str) -> str:
    """The torch module of an exported node's scope (a scope that extends the one before it replaces it).

    ``/teacher/body/blocks.1/blocks.1.1/conv_pw/Conv`` -> ``teacher.body.blocks.1.1.conv_pw``.
    """
    parts: list[str] = []
    for seg in node.strip("/").split("/")[:-1]:
        if parts and seg.startswith(parts[-1] + "."):
            parts[-1] = seg
        else:
            parts.append(seg)
    return ".".join(parts)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, read every run, write the table."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="glob of QAT run folders (each with model.onnx and qat.pt)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    runs = sorted(Path(p) for p in glob.glob(args.runs) if (Path(p) / "model.onnx").is_file())
    if not runs:
        sys.exit(f"error: no QAT run folder matches {args.runs!r}")
    rows = []
    for r in runs:  # every run read before anything is written
        try:
            rows.append({"run": str(r), "saturated": saturated_biases(r)})
        except Exception as e:  # noqa: BLE001 (a truncated ONNX, a missing or foreign qat.pt: one line)
            sys.exit(f"error: {r}: cannot read its model.onnx / qat.pt ({type(e).__name__}: {str(e)[:120]})")
    meta = bench_meta("bench/bias_saturation.py", argv, runs=len(runs))
    write_results(Path(args.out), {"meta": meta, "rows": rows}, lambda path: write_markdown(path, meta, rows))


def write_markdown(path: Path, meta: dict, rows: list[dict]) -> None:
    """One line per saturated layer; the count of runs with none."""
    hit = [r for r in rows if r["saturated"]]
    lines = ["# Saturated int32 biases in QAT-exported QDQ models", "", f"`{meta['command']}`", "",
             f"machine: {meta['machine']}; {len(hit)} of {len(rows)} runs have a bias channel at the int32 limit.", "",
             "| run | layer | channels | learned bias | exported bias |", "|---|---|---|---|---|"]
    for r in hit:
        for s in r["saturated"]:
            learned = ", ".join(f"{v:.4f}" for v in s["learned"]) if s["learned"] is not None else "-"
            lines.append(f"| {r['run']} | {s['layer']} | {s['channels']} | {learned} | "
                         + ", ".join(f"{v:.4f}" for v in s["exported"]) + " |")
    lines += ["", versions_line(meta["versions"])]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
