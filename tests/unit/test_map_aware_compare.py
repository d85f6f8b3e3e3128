"""bench/map_aware_compare.py: margins against the best standard cell, and refusing to compare different models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import map_aware_compare as mc  # noqa: E402


def _run(map_aware: float, shift: float = 0.0, normals: int | None = None, four_bits: float | None = None) -> dict:
    """One setup at 8 bits (and 4 with ``four_bits``), source train: two standard cells and a map-aware one per
    width (same value on every metric)."""
    def cell(calib: str, v: float, bits: int = 8) -> dict:
        return {"calibrator": calib, "source": "train", "bits": bits, "image_auroc": v, "pixel_auroc": v,
                "aupro": v, "calib_seconds": 1.0}

    extra = [] if four_bits is None else [cell("entropy", 0.5, 4), cell("mse", 0.6, 4), cell("map-aware", four_bits, 4)]

    command = "python bench/map_aware.py --model mtd:stfpm=m.pt" + (f" --set ptq.search.normals={normals}"
                                                                    if normals else "")
    return {"meta": {"command": command},
            "setups": [{"setup": "mtd:stfpm", "proxy_rank_correlation": {"image_auroc": 0.5, "pixel_auroc": 0.6},
                        "cells": [cell("entropy", 0.70 + shift), cell("mse", 0.80 + shift),
                                  cell("map-aware", map_aware), *extra]}]}


def test_margins_counts_and_overrides():
    out = mc.compare(_run(0.75), _run(0.82, normals=128))["mtd:stfpm"]
    assert out["a"]["mean_minus_best"]["pixel_auroc"] == pytest.approx(-0.05)
    assert (out["a"]["at_or_above_best"], out["a"]["at_or_above_default"]) == (0, 3)
    assert out["b"]["mean_minus_best"]["image_auroc"] == pytest.approx(0.02)
    assert out["b"]["at_or_above_best"] == 3
    assert out["a"]["set"] == [] and out["b"]["set"] == ["ptq.search.normals=128"]
    assert out["standard_cells_checked"] == 2


def test_only_cells_both_runs_have_are_compared():
    out = mc.compare(_run(0.75, four_bits=0.2), _run(0.82))["mtd:stfpm"]
    assert out["compared"] == ["8 bits train"]
    assert out["a"]["mean_minus_best"]["image_auroc"] == pytest.approx(-0.05)  # the 4-bit cell (-0.4) left out
    assert out["a"]["cell_metrics"] == 3


def test_different_models_are_refused():
    with pytest.raises(SystemExit, match="standard cells differ"):
        mc.compare(_run(0.75), _run(0.75, shift=0.01))


def test_cli_bad_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{trunc")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_run(0.75)))
    with pytest.raises(SystemExit, match="not a readable results JSON"):
        mc.main([str(bad), str(good), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x.md").exists()
