"""bench/cells_equal.py: a cell is equal only when all three metrics and the learning curve match."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import cells_equal as ce  # noqa: E402


def _cell(root: Path, column: str, metrics: tuple[float, float, float], curve: list[float]) -> None:
    folder = root / f"{column}-train-8bit"
    folder.mkdir(parents=True)
    row = dict(zip(ce.METRICS, metrics)) | {"history": [{"epoch": i, "holdout_loss": v} for i, v in enumerate(curve)]}
    (folder / "cell.json").write_text(json.dumps(row))


def test_equal_needs_every_metric_and_the_curve(tmp_path):
    _cell(tmp_path, "a", (0.7, 0.8, 0.5), [0.3, 0.2])
    _cell(tmp_path, "b", (0.7, 0.8, 0.5), [0.3, 0.2])
    _cell(tmp_path, "c", (0.7, 0.8, 0.5 + 1e-6), [0.3, 0.2])
    _cell(tmp_path, "d", (0.7, 0.8, 0.5), [0.3, 0.2000001])
    assert ce.compare(tmp_path, 8, "a", "b", "train", 1e-9)["equal"]
    off = ce.compare(tmp_path, 8, "a", "c", "train", 1e-9)
    assert not off["equal"] and off["same_curve"] and off["max_diff"] == pytest.approx(1e-6)
    assert not ce.compare(tmp_path, 8, "a", "d", "train", 1e-9)["equal"]


def test_a_missing_cell_is_one_line_and_nothing_is_written(tmp_path):
    _cell(tmp_path, "a", (0.7, 0.8, 0.5), [0.3])
    with pytest.raises(SystemExit, match="no .*b-train-8bit/cell.json"):
        ce.main(["--base", "a", "--variant", "b", "--cell", f"{tmp_path}:8", "--out", str(tmp_path / "out")])
    assert not list(tmp_path.glob("out*"))
