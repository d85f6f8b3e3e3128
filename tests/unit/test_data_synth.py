"""Synthetic generator: determinism, masks, marker reuse and regeneration, bad categories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qtool.data import SYNTH_CATEGORIES, ImageTransform, generate_synthetic, read_mvtec
from qtool.data.synth import MARKER
from qtool.data.synth_scenes import CATEGORIES, paint_defect
from qtool.errors import DataError
from qtool.recipe import DataConfig, SynthConfig

ALL = ["grid", "stripes", "noise-texture", "disc"]


def _synth(categories: list[str] | None = None, **kw) -> SynthConfig:
    base = {"n_train": 2, "n_test_good": 1, "n_test_defect": 4, "size": 32, "seed": 7}
    return SynthConfig(categories=categories or ALL, **{**base, **kw})


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_config_gives_byte_identical_files(tmp_path: Path) -> None:
    assert set(ALL) <= set(SYNTH_CATEGORIES.names())
    a = _files(generate_synthetic(tmp_path / "a", _synth()))
    b = _files(generate_synthetic(tmp_path / "b", _synth()))
    assert a == b
    assert len([n for n in a if n.endswith("_mask.png")]) == 16
    c = _files(generate_synthetic(tmp_path / "c", _synth(seed=8)))
    assert c.keys() == a.keys() and c != a
    alone = _files(generate_synthetic(tmp_path / "d", _synth(["disc"])))
    assert all(alone[n] == a[n] for n in alone if n.startswith("disc/"))  # independent of other categories
    assert not list(tmp_path.glob(".*"))  # no temporary folders left


def test_masks_nonempty_for_defects_and_empty_for_normals(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "s", _synth())
    cfg = DataConfig(format="mvtec", root=str(root), image_size=32, holdout_fraction=0.0)
    s = read_mvtec(cfg)
    tf = ImageTransform(cfg)
    defects = {(x.category, x.defect) for x in s.test if x.label}
    assert ("disc", "cut") in defects and ("grid", "scratch") in defects and ("stripes", "color") in defects
    for x in s.test:
        m = tf.mask(x)
        if x.label:
            assert 0 < m.sum() < 0.5 * m.size, x.path
        else:
            assert m.sum() == 0
    normals = [tf.image(x.path) for x in s.train if x.category == "grid"]
    assert not np.array_equal(normals[0], normals[1])  # natural variation between normals


def test_marker_reuse_and_regeneration(tmp_path: Path) -> None:
    root = tmp_path / "s"
    generate_synthetic(root, _synth(["grid"]))
    sentinel = root / "grid" / "train" / "good" / "000.png"
    before = sentinel.stat().st_mtime_ns
    (root / "keep.txt").write_text("still here")
    generate_synthetic(root, _synth(["grid"]))
    assert sentinel.stat().st_mtime_ns == before and (root / "keep.txt").exists()
    generate_synthetic(root, _synth(["stripes"], n_train=3))
    assert not (root / "grid").exists() and not (root / "keep.txt").exists()
    assert len(list((root / "stripes" / "train" / "good").iterdir())) == 3
    assert '"stripes"' in (root / MARKER).read_text()


def test_bad_categories_and_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unknown synthetic category 'bolt'; available: .*disc.*grid"):
        generate_synthetic(tmp_path / "x", _synth(["grid", "bolt"]))
    with pytest.raises(DataError, match="twice"):
        generate_synthetic(tmp_path / "x", _synth(["grid", "grid"]))
    assert not (tmp_path / "x").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"mine exists and is not a synthetic-data folder"):
        generate_synthetic(foreign, _synth(["grid"]))
    assert (foreign / "precious.png").exists()


@pytest.mark.parametrize("category", ALL)
def test_defects_change_exactly_the_masked_pixels(category: str) -> None:
    kind = CATEGORIES.get(category)
    for i, defect in enumerate(kind.defects):
        rng = np.random.default_rng(i)
        scene = kind.render(rng, 48)
        image, mask = paint_defect(rng, scene, defect)
        changed = np.abs(image - scene.image).max(axis=2)
        assert mask.sum() >= 4 and not (mask & ~scene.foreground).any(), defect
        assert changed[~mask].max() == 0.0, defect
        assert np.median(changed[mask]) > 0.1, defect
