"""Where a QAT run starts: its calibrator's ranges, or a PTQ run's graph (``qat.init_from``).

From a PTQ run the start is that run's QDQ graph: its ranges (``report.json``; per weight, the range rule
it used) and its biases (read back from its int32 biases, so bias correction's values carry over). The
run must have quantized the same model: the ``manifest.json`` input hash is checked against the
checkpoint and its ONNX export. Otherwise the recipe's calibrator runs on the calibration data (and a
graph-searching calibrator refines on the search set), as ``qtool ptq`` would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from qtool.artifacts import sha256_file
from qtool.qat.trace import QatError

Progress = Callable[[int], None] | None


def _run_folder(path: Path) -> Path:
    path = Path(path)
    return path if path.is_dir() else path.parent


def ranges_from_report(path: Path, profile: str, activation_bits: int) -> dict[str, Any]:
    """Per-tensor ``(lo, hi)`` from a PTQ run's ``report.json`` (or its folder), keyed by range owner.

    Per weight, the weight range rule PTQ used (the calibrator's choice where it made one).

    Raises:
        QatError: missing/unreadable report, or one made for another target or bit width.
    """
    path = Path(path)
    report_path = path / "report.json" if path.is_dir() else path
    try:
        report = json.loads(report_path.read_text())
        q = report["quantization"]
        tensors = q["tensors"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QatError(f"--init-from {path}: not a readable PTQ report ({type(e).__name__}: {e})") from None
    if q.get("profile") != profile or int(q.get("activation_bits", 8)) != activation_bits:
        raise QatError(f"--init-from {path}: the PTQ run is for target {q.get('profile')!r} at "
                       f"{q.get('activation_bits')} bits; this QAT run is {profile!r} at {activation_bits} bits")
    rules = {w: ((e.get("calibrator") or {}).get("chosen") or [None])[0] if e.get("range") == "given"
             else e.get("range") for w, e in q.get("weights", {}).items()}
    rules = {w: r for w, r in rules.items() if isinstance(r, str)}  # older reports name no rule: the spec's
    return {**{e.get("range_of", t): (float(e["lo"]), float(e["hi"])) for t, e in tensors.items()
               if not e.get("constant")}, **rules}


def check_same_model(path: Path, sources: list[Path]) -> str:
    """``"checked"`` when the PTQ run's manifest names one of ``sources`` (by SHA-256), ``"no manifest"`` without one.

    Raises:
        QatError: the PTQ run quantized another model.
    """
    manifest = _run_folder(path) / "manifest.json"
    try:
        wanted = json.loads(manifest.read_text())["inputs"]["model"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no manifest"
    if wanted not in {sha256_file(p) for p in sources if Path(p).is_file()}:
        raise QatError(f"--init-from {path}: that PTQ run quantized another model (input sha256 {wanted[:12]}...)")
    return "checked"


def biases_from_run(path: Path, prepared: onnx.ModelProto, spec: Any) -> tuple[onnx.ModelProto, int]:
    """``prepared`` with every int32-stored bias of ``spec`` set to the PTQ run's value (dequantized), and their count.

    Raises:
        QatError: the run has no readable ``model.onnx``, or lacks a bias of ``spec`` (or has another shape).
    """
    model_path = _run_folder(path) / "model.onnx"
    try:
        run = onnx.load(str(model_path))
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError, OSError ...: one line either way
        raise QatError(f"--init-from {path}: no readable PTQ model {model_path.name} ({type(e).__name__})") from None
    inits = {t.name: t for t in run.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(prepared)
    targets = {t.name: t for t in out.graph.initializer}
    for b in spec.biases.values():
        q, s = inits.get(f"{b.tensor}_quantized"), inits.get(f"{b.tensor}_quantized_scale")
        if q is None or s is None or b.tensor not in targets:
            raise QatError(f"--init-from {path}: its model has no int32 bias {b.tensor!r} (another model or spec)")
        value = (numpy_helper.to_array(q).astype(np.float64) * numpy_helper.to_array(s).astype(np.float64))
        old = numpy_helper.to_array(targets[b.tensor])
        if value.shape != old.shape:
            raise QatError(f"--init-from {path}: bias {b.tensor!r} has shape {value.shape}, this model's {old.shape}")
        targets[b.tensor].CopyFrom(numpy_helper.from_array(value.astype(old.dtype), b.tensor))
    return out, len(spec.biases)


def initial_ranges(recipe: Any, prepared: Any, spec: Any, splits: Any, transform: Any,
                   progress: Progress, from_run: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The starting ranges: the PTQ run's (``qat.init_from``) or the recipe's calibrator's, and how they were found.

    ``from_run``: the ``qat.init_from`` run's ranges when already read (:func:`ranges_from_report`).
    """
    cfg, ptq = recipe.qat, recipe.ptq
    if cfg.init_from:
        if from_run is None:
            from_run = ranges_from_report(Path(cfg.init_from), spec.profile.name, ptq.activation_bits)
        return from_run, {"init_from": cfg.init_from}
    from calibrators import WeightRange
    from qtool.calib_data import calibration_set
    from qtool.calibrate import calibrate, input_ranges, recipe_calibrator
    from qtool.ptq_search import search_batches_for
    from qtool.search import Harness, build_search_set

    calibrator_at = partial(recipe_calibrator, ptq, spec.profile)
    calibrator = calibrator_at()
    calib = calibration_set(splits, transform, ptq.calib_data)
    search = build_search_set(splits, transform, ptq.search) if calibrator.needs_graph else None
    found = calibrate(prepared, spec.tensors_to_calibrate(),
                      calib.batches(), calibrator, threads=recipe.eval.threads, group=ptq.calib_data.batch_size,
                      progress=progress,
                      search_batches=search_batches_for(search, calibrator, ptq.calib_data.batch_size))
    found.update(input_ranges(spec, calib.batches, calibrator_at))
    if search is not None:  # a graph-searching calibrator (map-aware) refines on the same spec
        found = calibrator.refine(found, Harness(prepared, spec, search, recipe.eval.threads).context())
    initial = {t: r if isinstance(r, WeightRange) else (float(r.lo), float(r.hi)) for t, r in found.items()}
    return initial, {"calibrator": ptq.calib, "calibration": calib.description}
