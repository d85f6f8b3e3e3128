"""bench/mtd_defect_types.py: per-type metrics and where the false positives lie, on hand-made maps."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import mtd_defect_types as dt  # noqa: E402


def _tiles():
    """Four 8x8 tiles: two defect-free, one 'hole' (a 2x2 region), one 'wide' (the left half)."""
    types = np.array(["good", "good", "hole", "wide"])
    masks = np.zeros((4, 8, 8), np.uint8)
    masks[2, 3:5, 3:5] = 1
    masks[3, :, :4] = 1
    return types, masks


def test_fp_sources_on_defective_tiles_and_overlap():
    types, masks = _tiles()
    maps = np.zeros((4, 8, 8), np.float32)
    maps[2] = 0.5            # the hole's tile is raised everywhere ...
    maps[2][masks[2] > 0] = 1.0  # ... and most at the hole
    maps[3][masks[3] > 0] = 1.0  # the wide defect exactly
    rows = dt.fp_sources(types, masks, maps, fprs=(0.2,))
    row = rows[0]
    # normal pixels: 64 + 64 + 60 + 32 = 220; the 60 raised ones (27 %) lie on the hole's tile
    assert row["fp_share"]["hole"] == pytest.approx(1.0)
    assert row["fp_share"]["good"] == 0.0
    assert row["region_overlap"] == {"hole": 1.0, "wide": 1.0}
    assert row["regions"] == {"hole": 1, "wide": 1}


def test_per_type_pairs_each_type_with_the_free_tiles():
    types, masks = _tiles()
    maps = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32) * 0.1
    maps[3][masks[3] > 0] += 1.0  # only the wide defect is found
    scores = maps.reshape(4, -1).max(1)
    out = dt.per_type(types, scores, masks, maps)
    assert set(out) == {"hole", "wide"} and out["wide"]["n"] == 1
    assert out["wide"]["pixel_auroc"] == 1.0 and out["wide"]["aupro"] > 0.99
    assert out["hole"]["pixel_auroc"] < 0.9


def test_bad_onnx_argument_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dt.main(["--onnx", f"m={tmp_path / 'missing.onnx'}", "--out", str(tmp_path / "r")])
    assert e.value.code == 1
    assert "expected NAME=PATH of an existing ONNX file" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
