"""Seeded synthetic anomaly data in the MVTec AD layout, generated atomically and reused when unchanged.

The folder holds a ``synth.json`` marker with the generating config; the same config reuses it,
another config regenerates it. Same config -> byte-identical files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qtool.data.synth_scenes import CATEGORIES, CategoryKind, paint_defect
from qtool.errors import DataError
from qtool.recipe import SynthConfig

logger = logging.getLogger(__name__)

MARKER = "synth.json"
SYNTH_VERSION = 1  # bump when the generator's output changes, so old folders are regenerated
_TRAIN, _TEST_GOOD, _TEST_DEFECT = 0, 1, 2


def _marker(cfg: SynthConfig) -> dict[str, Any]:
    return {"generator": "qtool.data.synth", "version": SYNTH_VERSION, "config": cfg.model_dump(mode="json")}


def marker_matches(root: Path, cfg: SynthConfig) -> bool:
    """True if ``root`` holds synthetic data generated from exactly ``cfg`` by this generator version."""
    try:
        return json.loads((Path(root) / MARKER).read_text()) == _marker(cfg)
    except (OSError, ValueError):
        return False


def _kinds(cfg: SynthConfig) -> dict[str, CategoryKind]:
    available = ", ".join(CATEGORIES.names())
    if not cfg.categories:
        raise DataError(f"synthetic data needs at least one category; available: {available}")
    out: dict[str, CategoryKind] = {}
    for name in cfg.categories:
        if name not in CATEGORIES:
            raise DataError(f"unknown synthetic category {name!r}; available: {available}")
        if name in out:
            raise DataError(f"synthetic category {name!r} is listed twice")
        out[name] = CATEGORIES.get(name)
    return out


def _rng(cfg: SynthConfig, category: str, part: int, index: int) -> np.random.Generator:
    # seeded per image, so a category's images do not depend on which other categories are made
    return np.random.default_rng([cfg.seed % (1 << 64), zlib.crc32(category.encode()), part, index])


def _finish(rng: np.random.Generator, image: np.ndarray, gray: bool) -> Image.Image:
    """Global brightness jitter and sensor noise, then 8-bit (grayscale or RGB)."""
    image = image * (1 + rng.normal(0.0, 0.03)) + rng.normal(0.0, 0.012, image.shape)
    arr = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(arr.mean(axis=2).round().astype(np.uint8) if gray else arr)


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


def _write_category(out: Path, name: str, kind: CategoryKind, cfg: SynthConfig) -> None:
    cat = out / name
    normals = ((_TRAIN, "train/good", cfg.n_train), (_TEST_GOOD, "test/good", cfg.n_test_good))
    for part, folder, count in normals:
        for i in range(count):
            rng = _rng(cfg, name, part, i)
            scene = kind.render(rng, cfg.size)
            _save(_finish(rng, scene.image, kind.gray), cat / folder / f"{i:03d}.png")
    for i in range(cfg.n_test_defect):
        defect = kind.defects[i % len(kind.defects)]
        j = i // len(kind.defects)
        rng = _rng(cfg, name, _TEST_DEFECT, i)
        scene = kind.render(rng, cfg.size)
        image, mask = paint_defect(rng, scene, defect)
        _save(_finish(rng, image, kind.gray), cat / "test" / defect / f"{j:03d}.png")
        mask_img = Image.fromarray(mask.astype(np.uint8) * 255)
        _save(mask_img, cat / "ground_truth" / defect / f"{j:03d}_mask.png")


def _install(tmp: Path, root: Path, cfg: SynthConfig) -> None:
    """Move the finished ``tmp`` folder onto ``root``, replacing an older synthetic folder there."""
    old: Path | None = None
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old.", dir=root.parent))
        os.replace(root, old / root.name)
    try:
        os.replace(tmp, root)
    except OSError as e:
        if marker_matches(root, cfg):  # another process generated the same data meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise DataError(f"cannot move synthetic data into {root}: {e.strerror}") from e
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def generate_synthetic(root: Path, cfg: SynthConfig) -> Path:
    """Generate (or reuse) seeded synthetic anomaly data in the MVTec AD layout at ``root``.

    Per category: ``cfg.n_train`` normals in ``train/good``, ``cfg.n_test_good`` in ``test/good`` and
    ``cfg.n_test_defect`` defective images spread round-robin over the category's defect kinds, each
    with a ``ground_truth/<kind>/<stem>_mask.png``. Written to a temporary folder, then renamed.

    Args:
        root: target folder; reused as is when its ``synth.json`` records the same config.
        cfg: categories (see ``CATEGORIES``), counts, image size and seed.

    Returns:
        ``root``.

    Raises:
        DataError: unknown category (the message lists the available ones), or ``root`` exists
            and is not a synthetic-data folder (it is never overwritten then).
    """
    root = Path(root)
    kinds = _kinds(cfg)
    if marker_matches(root, cfg):
        logger.info("reusing synthetic data at %s", root)
        return root
    foreign = root.exists() and not (root / MARKER).is_file() and (not root.is_dir() or any(root.iterdir()))
    if foreign:
        raise DataError(f"{root} exists and is not a synthetic-data folder (no {MARKER}); not overwritten")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the data folder is not
    try:
        for name, kind in kinds.items():
            _write_category(tmp, name, kind, cfg)
        (tmp / MARKER).write_text(json.dumps(_marker(cfg), indent=2) + "\n")
        _install(tmp, root, cfg)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("generated synthetic data at %s (%s)", root, ", ".join(kinds))
    return root
