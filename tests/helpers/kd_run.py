"""One tiny trained STFPM run shared by every test module of a session (data, checkpoint, ONNX, PTQ runs).

pytest would build a session fixture once per module that imports it, so the artifacts are cached
here, in the process, keyed by name; tests get them through small fixtures calling these functions.
Tiny on purpose: 64 px images, two synthetic categories of 6 normals, levels [1, 2], one epoch.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

_CACHE: dict[str, object] = {}

RECIPE_TREE = {
    "version": 1,
    "name": "tiny",
    "seed": 0,
    "data": {"format": "mvtec", "image_size": 64},
    "model": {"levels": [1, 2]},
    "train": {"epochs": 1, "batch_size": 4, "threads": 1},
    "ptq": {"calib_data": {"num_samples": 4, "batch_size": 4}},
    "eval": {"batch_size": 8, "threads": 1},
}
SYNTH = {"categories": ["grid", "disc"], "n_train": 6, "n_test_good": 2, "n_test_defect": 2, "size": 64, "seed": 0}


@dataclass(frozen=True)
class Shared:
    """Paths of the shared run."""

    root: Path
    data: Path           # MVTec-layout synthetic dataset (do not modify: copy it first)
    recipe_file: Path    # YAML recipe pointing at ``data`` (format mvtec)
    checkpoint: Path     # trained model.pt (1 epoch)
    onnx: Path           # its export, with qtool.data metadata

    def recipe(self, *overrides: str):
        """The shared recipe as a Recipe, with extra ``key=value`` overrides."""
        from qtool.recipe import load_recipe

        return load_recipe(self.recipe_file, list(overrides))


def shared(tmp_path_factory) -> Shared:
    """Build (once per process) the synthetic data, the tiny trained checkpoint and its ONNX export."""
    if "shared" in _CACHE:
        return _CACHE["shared"]  # type: ignore[return-value]
    from qtool.data import generate_synthetic
    from qtool.recipe import SynthConfig, load_recipe
    from qtool.runs import run_train

    root = tmp_path_factory.mktemp("kd_shared")
    data = generate_synthetic(root / "data", SynthConfig(**SYNTH))
    tree = {**RECIPE_TREE, "data": {**RECIPE_TREE["data"], "root": str(data)}}
    recipe_file = root / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(tree, sort_keys=False))
    run_train(load_recipe(recipe_file), root / "train", export=True)
    out = Shared(root, data, recipe_file, root / "train" / "model.pt", root / "train" / "model.onnx")
    _CACHE["shared"] = out
    return out


def copy_data(src: Path, dst: Path) -> Path:
    """A private copy of a dataset folder (tests that corrupt files work on this)."""
    shutil.copytree(src, dst)
    return dst


def cli_ptq(tmp_path_factory, key: str, *args: str):
    """Run ``qtool ptq`` in-process once per ``key`` on the shared ONNX; returns (click Result, out dir)."""
    if ("ptq", key) in _CACHE:
        return _CACHE[("ptq", key)]
    from click.testing import CliRunner

    from qtool.cli import main

    s = shared(tmp_path_factory)
    out = tmp_path_factory.mktemp(f"ptq_{key}") / "run"
    result = CliRunner().invoke(main, ["ptq", "--model", str(s.onnx), "--recipe", str(s.recipe_file),
                                       "--out", str(out), *args])
    _CACHE[("ptq", key)] = (result, out)
    return result, out


def lib_ptq(tmp_path_factory, key: str, *overrides: str) -> tuple[dict, Path]:
    """Run :func:`qtool.ptq.run_ptq` once per ``key`` on the shared ONNX; returns (report, out dir)."""
    if ("lib", key) in _CACHE:
        return _CACHE[("lib", key)]  # type: ignore[return-value]
    from qtool.ptq import run_ptq

    s = shared(tmp_path_factory)
    out = tmp_path_factory.mktemp(f"lib_ptq_{key}") / "run"
    report = run_ptq(s.onnx, s.recipe(*overrides), out)
    _CACHE[("lib", key)] = (report, out)
    return report, out


def sha256(path: Path) -> str:
    """Independent SHA-256 of a file (not qtool's helper)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files_under(path: Path) -> list[str]:
    """Relative names of the regular files under ``path`` (empty if it does not exist)."""
    path = Path(path)
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []
