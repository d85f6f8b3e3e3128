"""One real sweep on the shared tiny KD run (helpers.kd_run), cached per process like the shared run itself.

Grid: fp32, fp16, int8 minmax on held-out normals and on noise, int8 entropy, an int4 cell and a
one-epoch QAT cell (7 cells), the checkpoint being exported once into the sweep's cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from helpers.kd_run import RECIPE_TREE, shared

_CACHE: dict[str, object] = {}

SWEEP = {
    "precisions": ["fp32", "fp16", "int8"],
    "calibrators": ["minmax", "entropy"],
    "calib_sources": ["train", "random-normal"],
    "exclude": [{"calibrator": "entropy", "calib_source": "random-normal"}],
    "include": [{"precision": "int4", "calibrator": "minmax"}, {"method": "qat", "calibrator": "minmax"}],
    "bench": {"iterations": 5, "warmup": 1, "threads": 1},
    "overlays": 2,
}
QAT = {"epochs": 1, "freeze_epochs": 0, "batch_size": 4}


@dataclass(frozen=True)
class SweepRun:
    """Paths and report of the shared sweep."""

    recipe_file: Path
    out: Path
    cache: Path
    report: dict


def sweep_recipe(path: Path, model: Path, data: Path, sweep: dict | None = None, **sections) -> Path:
    """Write a sweep recipe over the shared tiny data and ``model``; returns its path."""
    tree = {**RECIPE_TREE, "data": {**RECIPE_TREE["data"], "root": str(data)}, "qat": QAT,
            "sweep": {**(sweep or SWEEP), "models": [str(model)]}, **sections}
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def shared_sweep(tmp_path_factory) -> SweepRun:
    """Run (once per process) the shared sweep in-process with one job."""
    if "sweep" in _CACHE:
        return _CACHE["sweep"]  # type: ignore[return-value]
    from qtool.recipe import load_recipe
    from qtool.sweep.run import run_sweep

    kd = shared(tmp_path_factory)
    root = tmp_path_factory.mktemp("sweep_shared")
    recipe_file = sweep_recipe(root / "sweep.yaml", kd.checkpoint, kd.data)
    report = run_sweep(load_recipe(recipe_file), root / "out", jobs=1, cache_dir=root / "cache")
    run = SweepRun(recipe_file, root / "out", root / "cache", report)
    _CACHE["sweep"] = run
    return run
