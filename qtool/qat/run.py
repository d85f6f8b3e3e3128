"""``qtool qat``: quantization-aware distillation of a trained checkpoint into a QDQ ONNX model.

export (as PTQ) -> prepare -> policy (same PtqConfig/profile as PTQ) -> initial ranges (the PTQ
calibrator on the same calibration data, or a PTQ run's graph: its ranges and biases;
:mod:`qtool.qat.start`) -> fx fake-quant graph -> QAT
epochs -> QDQ export -> lint -> save. The run folder mirrors ``qtool ptq``'s: ``model.onnx``,
``fp32.onnx`` (the input), ``qat_fp32.onnx`` (trained float), ``qat.pt`` (and ``last.pt``), ``report.json``,
``recipe.yaml``, ``manifest.json``; with ``qat.snapshots`` also ``snapshots/epoch_NNN.onnx``, the QDQ ONNX of the
start (000) and of every epoch (of the state the epoch offers: the tail average with ``qat.average_epochs``).
``sqnr_db`` compares with the input fp32 model (as PTQ's report does);
``sqnr_vs_qat_float_db`` with the trained float model, i.e. the quantization noise alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qtool.artifacts import write_json, write_manifest
from qtool.errors import GraphError, ModelError
from qtool.qat.checkpoint import qat_payload, save_qat_checkpoint
from qtool.qat.export import export_qdq, trained_float_graph
from qtool.qat.insert import QatModel, prepare_qat
from qtool.qat.keep import KEEP_RULES
from qtool.qat.objectives import LEARN_SETS, QAT_LOSSES, QatInputs, select_parameters
from qtool.qat.start import biases_from_run, check_same_model, initial_ranges, ranges_from_report
from qtool.qat.trace import QatError
from qtool.qat.train import QatOptimizer, build_optimizer, qat_train
from qtool.recipe import Recipe, dump_recipe

log = logging.getLogger(__name__)
Progress = Callable[[int], None] | None


def range_report(qm: QatModel, initial: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Per range owner: initial and final float range, scale and zero point."""
    out = {}
    for t, q in qm.act.items():
        lo, hi = q.range()
        out[t] = {"initial": list(initial[t]), "lo": lo, "hi": hi, "scale": float(q.get_scale().detach()),
                  "zero_point": int(q.zero_point), "dtype": q.params.dtype, "bits": q.params.bits,
                  "learnable": q.learnable}
    return out


def run_qat(model_path: Path, recipe: Recipe, out_dir: Path, progress: Progress = None) -> dict[str, Any]:
    """Quantization-aware distillation of the checkpoint ``model_path`` per ``recipe.qat`` / ``recipe.ptq``.

    Returns:
        The run report (also ``out_dir/report.json``).

    Raises:
        ModelError: not a qtool checkpoint. GraphError, CalibrationError, DataError, QatError,
            SpecMapError: with one-line messages.
    """
    from qtool.data import ImageTransform, load_splits
    from qtool.graph import build_spec, get_profile, lint, load_model, prepare, save_model
    from qtool.modelio import stamp_data_config
    from qtool.models import load_checkpoint
    from qtool.ptq import StageTimer, output_sqnr, plan

    cfg, out_dir, timer = recipe.qat, Path(out_dir), StageTimer()
    if Path(model_path).suffix not in (".pt", ".pth"):
        raise ModelError(f"QAT needs a qtool checkpoint (.pt), got {model_path}")
    profile = get_profile(recipe.ptq.target)
    # a report for another target or width is refused before anything is written
    from_run = None
    if cfg.init_from:
        from_run = ranges_from_report(Path(cfg.init_from), profile.name, recipe.ptq.activation_bits)
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.train.threads)
    with timer.stage("load"):
        model, meta = load_checkpoint(Path(model_path))
        base = {k: v for k, v in meta.items() if k != "data_config"}
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
    data_cfg = recipe.data.model_copy(update={k: meta["data"][k] for k in ("image_size", "resize", "scale_ref",
                                                                            "normalize") if k in meta["data"]})
    splits = load_splits(data_cfg)
    category = meta.get("extra", {}).get("category", "all")
    if category != "all" and category in splits.categories():
        splits = splits.filter(category)
    loss = QAT_LOSSES.get(cfg.loss)
    needs = KEEP_RULES.get(cfg.keep).needs
    if not loss.provides(needs, recipe, splits):  # refused before anything is written
        what = {"holdout": "a holdout loss", "check": "a check set with synthetic anomalies"}[needs]
        raise QatError(f"qat.keep {cfg.keep} needs {what}: qat.loss {cfg.loss} has none here (a holdout split, "
                       "or with qat.loss map ptq.search.check_normals > 0)")
    with timer.stage("export"):
        out_dir.mkdir(parents=True, exist_ok=True)
        from qtool.export import export_onnx

        fp32 = out_dir / "fp32.onnx"
        export_onnx(model, fp32, int(meta["image_size"]), recipe.export.batch_size, recipe.export.opset)
        stamp_data_config(fp32, meta["data"])
    with timer.stage("prepare"):
        prepared = prepare(load_model(fp32))
    with timer.stage("policy"):
        spec = build_spec(prepared, recipe.ptq, profile)
    start: dict[str, Any] = {}
    if cfg.init_from:  # start from the PTQ run's graph: its biases too (bias correction's)
        start["model_check"] = check_same_model(Path(cfg.init_from), [Path(model_path), fp32])
        prepared, start["biases"] = biases_from_run(Path(cfg.init_from), prepared, spec)
    transform = ImageTransform(data_cfg)
    with timer.stage("init_ranges"):
        initial, init_desc = initial_ranges(recipe, prepared, spec, splits, transform, progress, from_run)
        init_desc.update(start)
    learn = LEARN_SETS.get(cfg.learn)
    with timer.stage("insert_fakequant"):
        qm = prepare_qat(model, prepared, spec, initial, cfg.learnable_scales, cfg.observer_momentum,
                         ranges_only=learn.ranges_only)
        trained = select_parameters(qm, learn)
    with timer.stage("objective"):
        data = loss.build(QatInputs(qm, model, recipe, splits, transform))
    sections = {"ptq": recipe.ptq.model_dump(mode="json"), "export": recipe.export.model_dump(mode="json"),
                "qat": cfg.model_dump(mode="json")}

    def save(name: str, extra: dict[str, Any]) -> Path:
        return save_qat_checkpoint(qat_payload(qm, base, base_state, extra=extra, **sections), out_dir / name)

    def snapshot(epoch: int) -> None:  # the QDQ ONNX of the current state (qat.snapshots)
        if cfg.snapshots:
            path = out_dir / "snapshots" / f"epoch_{epoch:03d}.onnx"
            path.parent.mkdir(exist_ok=True)
            save_model(export_qdq(qm, prepared)[0], path)
            stamp_data_config(path, meta["data"])

    def on_epoch(epoch: int, history: list[dict[str, float]], opt: QatOptimizer) -> None:
        with opt.averaged():  # the state the epoch offers (qat.average_epochs); last.pt keeps the raw one
            snapshot(epoch)
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
            save("last.pt", {"epoch": epoch, "history": history, "optimizer": opt.state_dict()})

    snapshot(0)
    with timer.stage("train"):
        history = qat_train(qm, data.images, cfg, data.holdout, recipe.seed, on_epoch, progress,
                            build_optimizer(qm, cfg, trained), objective=data.objective, check=data.check)
    kept = next((h["epoch"] for h in history if h.get("kept")), cfg.epochs)  # the state exported (qat.keep)
    ckpt = save("qat.pt", {"epoch": cfg.epochs, "kept_epoch": kept, "history": history, "category": category})
    with timer.stage("export_qdq"):
        qdq, qreport = export_qdq(qm, prepared)
        trained_fp32 = out_dir / "qat_fp32.onnx"  # the QAT-trained float model (BatchNorm folded)
        save_model(trained_float_graph(qm, prepared), trained_fp32)
        stamp_data_config(trained_fp32, meta["data"])
    with timer.stage("lint"):
        issues = lint(qdq, profile)
    if issues and recipe.ptq.strict:
        raise GraphError(f"lint against profile {profile.name}: {issues[0].node}: {issues[0].message}"
                         f" ({len(issues)} issues)")
    out_model = out_dir / "model.onnx"
    save_model(qdq, out_model)
    stamp_data_config(out_model, meta["data"])
    with timer.stage("sqnr"):
        fidelity = output_sqnr(fp32, out_model, splits, transform, recipe.eval.threads)
        own = output_sqnr(trained_fp32, out_model, splits, transform, recipe.eval.threads)
    epochs = [h for h in history if h["epoch"] > 0]
    report: dict[str, Any] = {
        "model": str(model_path), "target": profile.name, "plan": plan(spec), "spec_map": qm.smap.summary(),
        "init": init_desc, "qat": sections["qat"], "history": history, "kept_epoch": kept,
        "epoch_seconds": [round(h["seconds"], 3) for h in epochs],
        "mean_epoch_seconds": float(np.mean([h["seconds"] for h in epochs])) if epochs else 0.0,
        "train_images": len(data.images), "objective": data.description, "learn": cfg.learn,
        "trained_parameters": int(sum(p.numel() for p in trained)), "ranges": range_report(qm, initial),
        "quantization": qreport,
        "lint": [{"node": i.node, "message": i.message} for i in issues], "sqnr_db": fidelity,
        "sqnr_vs_qat_float_db": own,
        "stage_seconds": timer.seconds, "checkpoint": str(ckpt), "output": str(out_model),
    }
    write_json(out_dir / "report.json", report)
    dump_recipe(recipe, out_dir / "recipe.yaml")
    write_manifest(out_dir, {"model": Path(model_path)}, {"command": "qat"})
    return report
