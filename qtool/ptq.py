"""``qtool ptq``: the post-training quantization pipeline, one stage after another, each timed.

load (export a checkpoint first) -> prepare -> policy -> calibrate [-> search stages: a calibrator's
refine, mixed precision] -> weight rounding [-> bias correction] -> insert QDQ [-> proxy of that graph] -> lint
-> save, then SQNR of the quantized outputs against fp32 on held-out normals. Writes ``model.onnx``, ``report.json``,
``recipe.yaml`` and ``manifest.json`` into the run folder.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from qtool.artifacts import write_json, write_manifest
from qtool.bias_correction import BiasCorrector
from qtool.calib_data import CalibrationSet, calibration_draws, calibration_set, normal_pool
from qtool.calib_draws import Draw, choose_draw
from qtool.calibrate import calibrate, input_ranges, recipe_calibrator
from qtool.data import ImageTransform, iter_batches, load_splits
from qtool.errors import GraphError
from qtool.evaluate import OnnxPredictor
from qtool.graph import build_spec, get_profile, insert_qdq_report, lint, load_model, prepare, save_model
from qtool.modelio import open_model, stamp_data_config
from qtool.ptq_search import check_set_for, proxy_entry, run_search_stages, search_batches_for, search_set_for
from qtool.recipe import Recipe, dump_recipe
from qtool.weight_rounding import round_weights

log = logging.getLogger(__name__)
Progress = Callable[[int], None] | None


class StageTimer:
    """Wall time of each named pipeline stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block as stage ``name``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 3)


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    noise = float(np.sum((ref.astype(np.float64) - test) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-30) / noise)


def plan(spec: Any) -> dict[str, Any]:
    """Summary of a spec: quantized and float nodes per part and op type, tensors to calibrate."""
    quantized = Counter((d.part or "-", d.op_type) for d in spec.decisions if d.quantized)
    floating = Counter((d.part or "-", d.reason) for d in spec.decisions if not d.quantized)
    return {
        "profile": spec.profile.name,
        "activation_bits": spec.activation_bits,
        "weight_bits": spec.weight_bits,
        "emulated": spec.emulated,
        "quantized_nodes": {f"{p}/{op}": n for (p, op), n in sorted(quantized.items())},
        "float_nodes": {f"{p}: {why}": n for (p, why), n in sorted(floating.items())},
        "tensors_to_calibrate": len(spec.tensors_to_calibrate()),
        "weights": len(spec.weights),
        "head_reads_float": sorted(spec.float_readers),  # ptq.head_inputs=float: read before any Q/DQ
    }


def _source_model(model_path: Path, recipe: Recipe, out_dir: Path) -> tuple[Path, dict | None]:
    """The float ONNX to quantize: the file itself, or a checkpoint exported into the run folder."""
    opened = open_model(model_path)
    if opened.kind == "onnx":
        return model_path, opened.data
    from qtool.runs import run_export

    fp32 = out_dir / "fp32.onnx"
    run_export(model_path, fp32, recipe)
    return fp32, opened.data


def run_ptq(model_path: Path, recipe: Recipe, out_dir: Path, dry_run: bool = False,
            progress: Progress = None, search_progress: Progress = None) -> dict[str, Any]:
    """Quantize ``model_path`` (ONNX or qtool checkpoint) per ``recipe.ptq`` into ``out_dir``.

    ``progress`` counts calibration images; ``search_progress`` the steps of a graph search
    (map-aware calibration, mixed-precision scan), when there is one.

    Returns:
        The run report (also written to ``out_dir/report.json`` unless ``dry_run``).
    Raises:
        GraphError, CalibrationError, DataError, RegistryError: with one-line messages.
    """
    cfg = recipe.ptq
    out_dir = Path(out_dir)
    timer = StageTimer()
    profile = get_profile(cfg.target)
    warnings = [w for w in [_host_warning(profile)] if w]
    for w in warnings:
        log.warning(w)

    new_calibrator = partial(recipe_calibrator, cfg, profile)  # a fresh one per draw; bits for ptq.input_bits
    calibrator = new_calibrator()
    with timer.stage("load"):
        if not dry_run:
            out_dir.mkdir(parents=True, exist_ok=True)
        src, data_meta = _source_model(Path(model_path), recipe, out_dir)
        model = load_model(src)
    with timer.stage("prepare"):
        prepared = prepare(model, input_shape=cfg.input_shape or None)
    with timer.stage("policy"):
        spec = build_spec(prepared, cfg, profile)
    report: dict[str, Any] = {"model": str(model_path), "calibrator": cfg.calib, "target": profile.name,
                              "plan": plan(spec)}
    if dry_run:
        report["calibration"] = cfg.calib_data.model_dump(mode="json")
        return report

    data_cfg = recipe.data.model_copy(update={k: data_meta[k] for k in ("image_size", "resize", "scale_ref",
                                                                          "normalize") if data_meta and k in data_meta})
    splits = load_splits(data_cfg)
    transform = ImageTransform(data_cfg)
    search = search_set_for(calibrator, cfg, splits, transform)
    check = check_set_for(calibrator, cfg, splits, transform)

    def calibrate_on(calib: CalibrationSet, calibrator: Any = calibrator) -> Draw:
        """Ranges of ``calibrator`` on ``calib`` (and the search images it observes), with that set's corrector."""
        ranges = calibrate(prepared, spec.tensors_to_calibrate(), calib.batches(), calibrator,
                           threads=recipe.eval.threads, group=cfg.calib_data.batch_size, progress=progress,
                           search_batches=search_batches_for(search, calibrator, cfg.calib_data.batch_size))
        ranges.update(input_ranges(spec, calib.batches, new_calibrator))  # ptq.input_bits: at its own width
        corrector = (BiasCorrector(prepared, spec, calib.batches, recipe.eval.threads, cfg.bias_correction_max_mb)
                     if cfg.bias_correction else None)
        return Draw(calib, calibrator, ranges, corrector)

    with timer.stage("calibrate"):
        if cfg.calib_data.draws > 1:  # each draw a fresh calibrator; the least map distortion on the search set wins
            draw, report["calibration_draws"] = choose_draw(
                calibration_draws(splits, transform, cfg.calib_data),
                lambda c: calibrate_on(c, new_calibrator()), prepared, spec, search, recipe.eval.threads)
        else:
            draw = calibrate_on(calibration_set(splits, transform, cfg.calib_data))
    calib, calibrator, ranges, corrector = draw.calib, draw.calibrator, draw.ranges, draw.corrector
    searched: dict[str, Any] = {}
    if search is not None:
        ranges, spec, searched, harness = run_search_stages(
            calibrator, ranges, prepared, spec, search, cfg, recipe.eval.threads, timer.stage, search_progress,
            corrector, check)
        report["plan"] = plan(spec)  # mixed precision may have kept layers float
    with timer.stage("weight_rounding"):  # on the final grid, before the biases are corrected for it
        spec, report["weight_rounding"] = round_weights(cfg.weight_rounding, prepared, spec, ranges, calib.batches,
                                                        recipe.eval.threads)
    if corrector is not None:  # a correction the search made for these very ranges is reused
        with timer.stage("bias_correction"):
            prepared, report["bias_correction"] = corrector.correct(spec, ranges)
    with timer.stage("insert_qdq"):
        qdq, qreport = insert_qdq_report(prepared, spec, ranges)
    if search is not None:  # the proxy of the graph that is saved (bias-corrected when it is)
        with timer.stage("proxy"):
            searched["proxy"] = proxy_entry(harness, qdq)  # mixed precision judged this corrected graph already
    with timer.stage("lint"):
        issues = lint(qdq, profile)
    if issues and cfg.strict:
        raise GraphError(f"lint against profile {profile.name}: {issues[0].node}: {issues[0].message}"
                         f" ({len(issues)} issues)")
    out_model = out_dir / "model.onnx"
    with timer.stage("save"):
        save_model(qdq, out_model)
        if data_meta:
            stamp_data_config(out_model, data_meta)
    with timer.stage("sqnr"):
        fidelity = output_sqnr(src, out_model, splits, transform, recipe.eval.threads)
    for name, r in ranges.items():
        for section in ("tensors", "weights"):  # a weight's range may come from the calibrator too (map-aware)
            if name in qreport[section] and getattr(r, "meta", None):
                qreport[section][name]["calibrator"] = r.meta
    report.update({
        "calibration": calib.description,
        "calibrator_options": {"symmetric": profile.activation_symmetric, "num_bits": cfg.activation_bits,
                               **cfg.calib_options},
        "quantization": qreport,
        "lint": [{"node": i.node, "message": i.message} for i in issues],
        "warnings": warnings,
        "sqnr_db": fidelity,
        **searched,
        "stage_seconds": timer.seconds,
        "output": str(out_model),
    })
    write_json(out_dir / "report.json", report)
    dump_recipe(recipe, out_dir / "recipe.yaml")
    write_manifest(out_dir, {"model": Path(model_path)}, {"command": "ptq"})
    return report


def _host_warning(profile: Any) -> str | None:
    """The profile's accuracy warning for the CPU this runs on (see ``profiles.host_warning``)."""
    import platform

    from qtool.backends.base import cpu_info
    from qtool.graph.profiles import host_warning

    return host_warning(profile, cpu_info()["cpu_flags"], platform.machine())


def output_sqnr(fp32: Path, quantized: Path, splits: Any, transform: ImageTransform, threads: int,
                n_images: int = 8) -> dict[str, float]:
    """SQNR (dB) of the quantized model's map and scores vs fp32 on up to ``n_images`` held-out normals."""
    samples = normal_pool(splits, n_images)
    ref, q = OnnxPredictor(fp32, threads), OnnxPredictor(quantized, threads)
    maps_r, maps_q, sc_r, sc_q = [], [], [], []
    for images, _ in iter_batches(samples, transform, n_images):
        m_r, s_r = ref(images)
        m_q, s_q = q(images)
        maps_r.append(m_r), maps_q.append(m_q), sc_r.append(s_r), sc_q.append(s_q)
    return {"anomaly_map": sqnr_db(np.concatenate(maps_r), np.concatenate(maps_q)),
            "score": sqnr_db(np.concatenate(sc_r), np.concatenate(sc_q)), "images": len(samples)}
