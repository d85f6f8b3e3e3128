"""Which int32 biases of QAT-exported QDQ models sit at the int32 limit, and how far the clamp moved them.

PTQ grows a weight scale where ``input_scale * weight_scale`` would push a bias past int32
(:func:`qtool.graph.insert_qdq.grow_for_int32_bias`, onnxruntime's rule). A QAT run that learns scales
(``qat.learn: ranges``) can move them below that floor; its bias fake quantization then clamps at int32
exactly as the export does, so the exported graph is the trained model, but the clamped channel's bias
is not the one it learned. Per ``qat/model.onnx`` under the given folders: each quantized layer with a
saturated int32 bias, how many channels, and the learned (latent, from ``qat.pt``) against the exported
float bias of each of them.

Whether the clamp can matter at all: for each saturated channel, the largest value its pre-activation can take
over the conv's quantized input range (interval arithmetic: every weight times the end of the input range that
maximises it, zero padding included, plus the bias), with the exported and with the learned bias. A channel whose
bound is at or below the floor of the Relu/Clip that follows (through the output's Q/DQ) under both biases is
**dead**: that activation is the floor for every input, so the clamp changes no output of the model.

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
from qtool.graph._index import GraphIndex

INT32_LIMIT = 2**31 - 1


def saturated_biases(run: Path) -> list[dict]:
    """Per quantized layer of ``run/model.onnx`` with int32 biases at the limit: channels, learned and exported."""
    model = onnx.load(str(run / "model.onnx"))
    idx = GraphIndex(model)  # producer and readers of every tensor
    producer, readers = idx.producer, {t: [n for n, _ in r] for t, r in idx.consumers.items()}
    init = {name: numpy_helper.to_array(t) for name, t in idx.initializers.items()}
    latent = torch.load(run / "qat.pt", map_location="cpu", weights_only=True)["qat_state_dict"]
    init.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})  # Clip bounds
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
        learned = None if learned is None else learned.double().numpy()[hit]
        reach = input_reach(node, producer, init, hit)
        floor = activation_floor(node, readers, init)
        bound_e = None if reach is None else reach + exported
        bound_l = None if reach is None or learned is None else reach + learned
        known = floor is not None and bound_e is not None and bound_l is not None
        dead = (bound_e <= floor) & (bound_l <= floor) if known else np.zeros(len(hit), bool)
        out.append({"layer": node.name, "channels": hit.tolist(), "exported": exported.tolist(),
                    "learned": None if learned is None else learned.tolist(), "floor": floor,
                    "bound_exported": None if bound_e is None else bound_e.tolist(),
                    "bound_learned": None if bound_l is None else bound_l.tolist(), "dead": dead.tolist()})
    return out


def _dequantized(name: str, producer: dict, init: dict) -> tuple[np.ndarray, np.ndarray, tuple[int, int], int] | None:
    """(scale, zero point, (qmin, qmax) of its integer type, axis) of the DequantizeLinear making ``name``; or None."""
    dq = producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
        return None
    scale, zp = init.get(dq.input[1]), init.get(dq.input[2])
    if scale is None or zp is None or zp.dtype.kind not in "iu":
        return None
    info = np.iinfo(zp.dtype)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    return scale.astype(np.float64), zp.astype(np.float64), (info.min, info.max), axis


def input_reach(node, producer: dict, init: dict, channels: np.ndarray) -> np.ndarray | None:
    """Per channel, the largest ``sum(w * x)`` of a Conv over its quantized input range (zero padding included).

    The input comes from a per-tensor DequantizeLinear (the range its integer type can hold); the weight from a
    DequantizeLinear of an integer initializer. None when either is not so (the bound is then unknown).
    """
    x, w = _dequantized(node.input[0], producer, init), _dequantized(node.input[1], producer, init)
    if x is None or w is None or x[0].size != 1 or producer[node.input[1]].input[0] not in init:
        return None
    (xs, xz, (qmin, qmax), _), (ws, wz, _, axis) = x, w
    lo, hi = float((qmin - xz) * xs), float((qmax - xz) * xs)
    q = init[producer[node.input[1]].input[0]].astype(np.float64)
    shape = [1] * q.ndim
    shape[axis] = -1
    weight = (q - wz.reshape(shape if wz.size > 1 else ())) * ws.reshape(shape if ws.size > 1 else ())
    per_weight = np.maximum(np.maximum(weight * lo, weight * hi), 0.0)  # 0: a padded position
    return per_weight.reshape(weight.shape[0], -1).sum(axis=1)[channels]


def activation_floor(node, readers: dict, values: dict) -> float | None:
    """The floor of the Relu/Clip that reads ``node``'s output (through its Q/DQ), when it is the only reader.

    ``readers``: tensor -> the nodes reading it; ``values``: constant tensors (initializers and Constant outputs).
    """
    tensor = node.output[0]
    while len(readers.get(tensor, [])) == 1:
        reader = readers[tensor][0]
        if reader.op_type == "Relu":
            return 0.0
        if reader.op_type == "Clip":
            low = values.get(reader.input[1]) if len(reader.input) > 1 and reader.input[1] else None
            return None if low is None else float(low)
        if reader.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            return None
        tensor = reader.output[0]
    return None


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
    dead = [d for r in hit for s in r["saturated"] for d in s["dead"]]
    live = sorted({r["run"] for r in hit for s in r["saturated"] if not all(s["dead"])})
    lines = ["# Saturated int32 biases in QAT-exported QDQ models", "", f"`{meta['command']}`", "",
             f"machine: {meta['machine']}; {len(hit)} of {len(rows)} runs have a bias channel at the int32 limit; "
             f"{sum(dead)} of {len(dead)} such channels are dead under both biases (the clamp changes no output); "
             f"runs with a saturated channel that is not: {len(live)}.", "",
             "Max pre-activation: the bound over the conv's quantized input range with the learned / exported bias; "
             "floor: of the Relu/Clip that follows.", "",
             "| run | layer | channels | learned bias | exported bias | max pre-activation (learned / exported) | "
             "floor | dead |", "|---|---|---|---|---|---|---|---|"]

    def values(v):
        return ", ".join(f"{x:.4f}" for x in v) if v is not None else "-"

    for r in hit:
        for s in r["saturated"]:
            bounds = ("-" if s["bound_learned"] is None or s["bound_exported"] is None else
                      ", ".join(f"{a:.3f} / {b:.3f}" for a, b in zip(s["bound_learned"], s["bound_exported"])))
            floor = "-" if s["floor"] is None else f"{s['floor']:g}"
            lines.append(f"| {r['run']} | {s['layer']} | {s['channels']} | {values(s['learned'])} | "
                         f"{values(s['exported'])} | {bounds} | {floor} | "
                         + ", ".join("yes" if d else "no" for d in s["dead"]) + " |")
    lines += ["", versions_line(meta["versions"])]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
